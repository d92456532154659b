"""Queue arguments shared by every declarer, and the reconnect backoff: pure, no services."""

from __future__ import annotations

import random

import pytest
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker
from dramatiq.common import dq_name, xq_name

from brownout._dispatch.publisher import reconnect_delay
from brownout._dispatch.queues import (
    DEFAULT_DELIVERY_LIMIT,
    BrownoutRabbitmqBroker,
    dead_letter_queue_arguments,
    max_length_arguments,
    queue_arguments,
    queue_declarations,
)
from brownout._settings import Settings

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"  # never connected to: building a broker does not connect


def test_max_length_arguments_bound_and_reject() -> None:
    assert max_length_arguments(max_length=7) == {"x-max-length": 7, "x-overflow": "reject-publish"}


@pytest.mark.parametrize("max_length", [0, -1])
def test_max_length_must_be_positive(max_length: int) -> None:
    with pytest.raises(ValueError):
        max_length_arguments(max_length=max_length)
    with pytest.raises(ValueError):
        queue_arguments("q", max_length=max_length)
    with pytest.raises(ValueError):
        queue_declarations("q", max_length=max_length)


def test_queue_arguments_are_dramatiqs_plus_the_bound() -> None:
    broker = BrownoutRabbitmqBroker(url=URL, max_length=7)
    dramatiqs: dict[str, object] = RabbitmqBroker._build_queue_arguments(broker, "writes")
    assert queue_arguments("writes", max_length=7) == {**dramatiqs, "x-max-length": 7, "x-overflow": "reject-publish"}
    assert broker._build_queue_arguments("writes") == queue_arguments("writes", max_length=7)
    assert broker._build_queue_arguments(dq_name("writes")) == queue_arguments(dq_name("writes"), max_length=7)


def test_queue_arguments_dead_letter_to_the_xq() -> None:
    arguments = queue_arguments("writes", max_length=3)
    assert arguments["x-dead-letter-exchange"] == ""
    assert arguments["x-dead-letter-routing-key"] == xq_name("writes")


def test_declarations_in_dramatiqs_order() -> None:
    declarations = queue_declarations("writes", max_length=7)
    assert [declaration.name for declaration in declarations] == ["writes", dq_name("writes"), xq_name("writes")]
    assert all(declaration.durable for declaration in declarations)
    queue, delay, dead = declarations
    assert queue.arguments == queue_arguments("writes", max_length=7)
    assert delay.arguments == queue.arguments
    assert delay.arguments is not queue.arguments  # a copy: changing one cannot change the other
    assert dead.arguments == {"x-message-ttl": DEAD_MESSAGE_TTL}


def test_broker_refuses_priority_and_unconfirmed() -> None:
    assert BrownoutRabbitmqBroker(url=URL, max_length=7).confirm_delivery is True
    with pytest.raises(ValueError):
        BrownoutRabbitmqBroker(url=URL, max_length=7, max_priority=5)
    with pytest.raises(ValueError):
        BrownoutRabbitmqBroker(url=URL, max_length=7, confirm_delivery=False)
    with pytest.raises(ValueError):
        BrownoutRabbitmqBroker(url=URL, max_length=0)


def test_classic_is_the_default_and_unchanged() -> None:
    classic = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "writes.XQ",
        "x-max-length": 7,
        "x-overflow": "reject-publish",
    }
    assert queue_arguments("writes", max_length=7) == classic
    assert list(queue_arguments("writes", max_length=7)) == list(classic)  # same keys, same order
    assert queue_arguments("writes", max_length=7, queue_type="classic", delivery_limit=3) == classic  # no limit on classic
    assert dead_letter_queue_arguments() == {"x-message-ttl": DEAD_MESSAGE_TTL}
    assert queue_declarations("writes", max_length=7) == queue_declarations("writes", max_length=7, queue_type="classic")
    broker = BrownoutRabbitmqBroker(url=URL, max_length=7)
    assert broker.queue_type == "classic"
    assert broker._build_queue_arguments("writes") == classic
    assert broker.dead_letter_queue_arguments == {"x-message-ttl": DEAD_MESSAGE_TTL}


def test_quorum_arguments_of_the_queue_and_its_delay_queue() -> None:
    arguments = queue_arguments("writes", max_length=7, queue_type="quorum", delivery_limit=50)
    assert arguments == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "writes.XQ",
        "x-max-length": 7,
        "x-overflow": "reject-publish",  # supported by quorum queues, and needed by at-least-once
        "x-queue-type": "quorum",
        "x-delivery-limit": 50,
        "x-dead-letter-strategy": "at-least-once",
    }
    assert "x-max-priority" not in arguments  # quorum queues have no message priorities
    assert arguments["x-overflow"] != "reject-publish-dlx"  # not supported by quorum queues


def test_quorum_declarations_make_all_three_queues_quorum() -> None:
    queue, delay, dead = queue_declarations("writes", max_length=7, queue_type="quorum", delivery_limit=50)
    assert [queue.name, delay.name, dead.name] == ["writes", dq_name("writes"), xq_name("writes")]
    assert queue.durable and delay.durable and dead.durable  # quorum queues cannot be transient
    assert queue.arguments == queue_arguments("writes", max_length=7, queue_type="quorum", delivery_limit=50)
    assert delay.arguments == queue.arguments and delay.arguments is not queue.arguments
    assert dead.arguments == {"x-message-ttl": DEAD_MESSAGE_TTL, "x-queue-type": "quorum", "x-delivery-limit": 50}
    assert dead.arguments == dead_letter_queue_arguments(queue_type="quorum", delivery_limit=50)


def test_the_quorum_broker_declares_what_the_quorum_publisher_declares() -> None:
    broker = BrownoutRabbitmqBroker(url=URL, max_length=7, queue_type="quorum", delivery_limit=50)
    queue, delay, dead = queue_declarations("writes", max_length=7, queue_type="quorum", delivery_limit=50)
    assert broker.confirm_delivery is True
    assert broker._build_queue_arguments("writes") == queue.arguments  # Q, and Q.DQ (Dramatiq passes the canonical name)
    assert broker.dead_letter_queue_arguments == dead.arguments
    dramatiqs: dict[str, object] = RabbitmqBroker._build_queue_arguments(broker, "writes")  # type: ignore[no-untyped-call]
    assert dramatiqs.items() <= broker._build_queue_arguments("writes").items()


def test_the_delivery_limit_is_explicit_by_default() -> None:
    assert queue_arguments("writes", max_length=7, queue_type="quorum")["x-delivery-limit"] == DEFAULT_DELIVERY_LIMIT
    assert Settings.model_fields["queue_delivery_limit"].default == DEFAULT_DELIVERY_LIMIT  # one default, not two


def test_unknown_queue_types_and_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError):
        queue_arguments("writes", max_length=7, queue_type="stream")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        queue_declarations("writes", max_length=7, queue_type="quorum", delivery_limit=0)
    with pytest.raises(ValueError):
        BrownoutRabbitmqBroker(url=URL, max_length=7, queue_type="quorum", delivery_limit=0)
    with pytest.raises(ValueError):
        BrownoutRabbitmqBroker(url=URL, max_length=7, queue_type="lazy")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        queue_arguments("writes", max_length=0, queue_type="quorum")


def test_queue_type_and_delivery_limit_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        queue_arguments("writes", 7, "quorum")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        queue_declarations("writes", 7, "quorum")  # type: ignore[call-arg]


@pytest.mark.parametrize("failures", range(12))
def test_reconnect_delay_in_the_upper_half_of_its_ceiling(failures: int) -> None:
    rng = random.Random(failures)
    ceiling = min(4.0, 0.5 * 2**failures)
    for _ in range(200):
        delay = reconnect_delay(failures, rng=rng, base=0.5, cap=4.0)
        assert ceiling / 2 <= delay <= ceiling


def test_reconnect_delay_respects_the_cap_even_after_many_failures() -> None:
    rng = random.Random(7)
    assert all(reconnect_delay(failures, rng=rng, base=0.5, cap=4.0) <= 4.0 for failures in (10, 33, 1000, 10**6))


def test_reconnect_delay_grows_with_failures() -> None:
    # Same draw each time (re-seeded): only the ceiling changes, doubling until the cap.
    delays = [reconnect_delay(failures, rng=random.Random(1), base=0.5, cap=4.0) for failures in range(6)]
    assert delays[:4] == sorted(delays[:4]) and len(set(delays[:4])) == 4
    assert delays[1] == pytest.approx(2 * delays[0])
    assert delays[3] == delays[4] == delays[5]  # capped


def test_reconnect_delay_defaults() -> None:
    delay = reconnect_delay(0, rng=random.Random(3))
    assert 0.25 <= delay <= 0.5
