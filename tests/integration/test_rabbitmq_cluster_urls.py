"""Every AMQP client given a node list with a dead node in it, against the machine's real RabbitMQ.

The list is the real node beside one that is gone: a port nothing listens on (refused) or a proxy that
accepts and resets (`tests/support/rabbit_nodes.py`, which also counts the attempts it got). `InOrder`
keeps the list's order, so "first" means the dead node is really tried first; the reset node's count
shows it was. Each client must do its work anyway: a confirmed publish, a worker consuming, the outbox
relay, the queue-depth probe, a dead-letter replay. No real multi-node cluster runs here.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from sqlalchemy import select

from app.dispatch.notifications import CREATE, build_registry
from app.schema import upgrade_database
from brownout import _dead_letters_cli as dead_letters_cli
from brownout._db import Database
from brownout._dispatch import dead_letters
from brownout._dispatch.dispatcher import Applied, Dispatcher
from brownout._dispatch.outbox import SEND_EMAIL_ACTOR
from brownout._dispatch.publisher import Publisher
from brownout._dispatch.queue_depth import QueueDepth
from brownout._schema import outbox
from brownout._worker.batched_delivery import batched
from brownout._worker.outbox import OutboxRelay, OutboxRelayMiddleware
from tests.conftest import database_url
from tests.integration.test_publisher import message
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, ready_count, take_all
from tests.support.rabbit_nodes import InOrder, node_url, refusing_node_url, resetting_node, with_dead_node
from tests.support.tcp_proxy import FaultProxy
from tests.support.worker_rig import WorkerRig

POSITIONS = ["first", "last"]
PUBLISH_DEADLINE = 2.0  # the publisher's default confirm timeout (BROWNOUT_PUBLISH_TIMEOUT_SECONDS)
NOTE = {"user_id": 3, "email": "lin@example.com", "subject": "Clustered", "body": "hello"}


@pytest.fixture
def resetting() -> Iterator[FaultProxy]:
    yield from resetting_node()


@pytest.fixture(params=["refused", "reset"])
def gone(request: pytest.FixtureRequest) -> tuple[str, FaultProxy | None]:
    """(URL of a dead node, the proxy behind it when it is one that counts its attempts)."""
    if request.param == "refused":
        return refusing_node_url(), None
    proxy: FaultProxy = request.getfixturevalue("resetting")
    return node_url(proxy.port), proxy


@pytest.fixture
def db(make_database: Callable[..., Database], pg_database: str) -> Database:
    upgrade_database(database_url(pg_database))
    return make_database()


def tried(proxy: FaultProxy) -> bool:
    return proxy.connection_count > 0


@pytest.mark.parametrize("position", POSITIONS)
def test_a_publish_is_confirmed_within_its_deadline_with_a_node_gone(
    position: str, gone: tuple[str, FaultProxy | None], make_publisher: Callable[..., Publisher], queue_name: str
) -> None:
    dead, proxy = gone
    publisher = make_publisher(url=with_dead_node(dead, position), rng=InOrder())

    started = time.monotonic()
    publisher.publish(message(queue_name, "clustered"))  # raises PublishRejected past the deadline
    elapsed = time.monotonic() - started

    assert elapsed < PUBLISH_DEADLINE
    assert [dramatiq.Message.decode(body).args for _, body in take_all(queue_name)] == [("clustered",)]
    if proxy is not None:
        assert tried(proxy) == (position == "first")  # one node per attempt: the live one first needs no other


def test_with_every_node_gone_a_publish_is_unreachable_not_a_missing_queue(
    make_publisher: Callable[..., Publisher], queue_name: str, resetting: FaultProxy
) -> None:
    from brownout._dispatch.publisher import PublishRejected, RejectReason

    dead = [refusing_node_url(), node_url(resetting.port)]
    publisher = make_publisher(url=dead, rng=InOrder())
    started = time.monotonic()
    with pytest.raises(PublishRejected) as rejected:
        publisher.publish(message(queue_name, "nowhere"))
    assert rejected.value.reason is RejectReason.UNREACHABLE
    assert time.monotonic() - started < PUBLISH_DEADLINE + 0.5
    assert tried(resetting), "both nodes were tried before giving up"


@pytest.mark.parametrize("position", POSITIONS)
def test_the_worker_consumes_in_batches_with_a_node_gone(
    position: str,
    resetting: FaultProxy,
    make_worker_rig: Callable[..., WorkerRig],
    make_publisher: Callable[..., Publisher],
    queue_name: str,
) -> None:
    dead = node_url(resetting.port)
    rig = make_worker_rig(url=with_dead_node(dead, position), rng=InOrder())
    received: list[int] = []
    lock = threading.Lock()

    def record_batch(messages: list[dramatiq.Message[Any]]) -> None:
        with lock:
            received.extend(m.args[0] for m in messages)

    dramatiq.actor(record_batch, broker=rig.broker, queue_name=queue_name, actor_name="record_batch", max_retries=0)
    rig.broker.consume_with(queue_name, batched(actor_name="record_batch", max_batch=4))
    publisher = make_publisher()  # the live node: these messages are the worker's to take
    for number in range(10):
        publisher.publish(message(queue_name, number, actor_name="record_batch"))

    rig.start({queue_name}, threads=2)

    assert wait_until(lambda: len(received) == 10, timeout=15)
    assert sorted(received) == list(range(10))
    assert wait_until(lambda: ready_count(queue_name) == 0)
    if position == "first":
        assert tried(resetting), "the worker's first connection began at the dead node"


@pytest.mark.parametrize("position", POSITIONS)
def test_the_outbox_relay_publishes_with_a_node_gone(position: str, resetting: FaultProxy, db: Database, queue_name: str) -> None:
    dead = node_url(resetting.port)
    publisher = Publisher(url=with_dead_node(dead, position), queue_name=queue_name, max_length=1000, rng=InOrder())
    relay = OutboxRelay(database=db, publisher=publisher, queue_name=queue_name, publish_timeout=PUBLISH_DEADLINE)
    created = Dispatcher(database=db, publisher=None, registry=build_registry(), queue_name="unused", request_deadline=2.0)
    assert isinstance(created.submit(CREATE, NOTE), Applied)
    publisher.start()
    try:
        assert relay.relay_once() == 1
    finally:
        publisher.close()

    [(_, body)] = take_all(queue_name)
    assert dramatiq.Message.decode(body).actor_name == SEND_EMAIL_ACTOR
    with db.session() as s:
        assert s.execute(select(outbox.c.published_at)).scalar_one() is not None
    assert tried(resetting) == (position == "first")


@pytest.mark.parametrize("order", ["dead;live", "live;dead"])
def test_the_outbox_relay_built_from_settings_takes_the_node_list(
    order: str, make_settings: Callable[..., Any], db: Database, queue_name: str
) -> None:
    """As the worker wires it: RABBITMQ_URL's `;` form, in whatever order the relay's publisher shuffles it."""
    urls = {"dead": refusing_node_url(), "live": RABBITMQ_URL}
    settings = make_settings(
        rabbitmq_url=";".join(urls[name] for name in order.split(";")),
        email_queue_name=queue_name,
        outbox_relay_interval_seconds=0.2,
    )
    middleware = OutboxRelayMiddleware.from_settings(settings, db)
    created = Dispatcher(database=db, publisher=None, registry=build_registry(), queue_name="unused", request_deadline=2.0)
    assert isinstance(created.submit(CREATE, NOTE), Applied)
    middleware.after_worker_boot(None, None)  # type: ignore[arg-type]
    try:
        assert wait_until(lambda: middleware.relay is not None and middleware.relay.published == 1, timeout=10)
    finally:
        middleware.before_worker_shutdown(None, None)  # type: ignore[arg-type]
    assert len(take_all(queue_name)) == 1


@pytest.mark.parametrize("position", POSITIONS)
def test_the_queue_depth_probe_reads_with_a_node_gone(
    position: str, gone: tuple[str, FaultProxy | None], make_publisher: Callable[..., Publisher], queue_name: str
) -> None:
    dead, proxy = gone
    publisher = make_publisher()
    for number in range(3):
        publisher.publish(message(queue_name, number))
    probe = QueueDepth(url=with_dead_node(dead, position), queue_name=queue_name, timeout=2.0, rng=InOrder())

    answer = probe.read()

    assert answer["ok"] is True and answer["messages"] == 3
    if proxy is not None:
        assert tried(proxy) == (position == "first")


def test_the_queue_depth_probe_tells_a_missing_queue_from_nodes_that_are_gone(resetting: FaultProxy, queue_name: str) -> None:
    dead = node_url(resetting.port)
    # 5 s a node, not 2: this tells answers apart, and under four test workers 4 s in all once ran out
    missing = QueueDepth(url=[dead, RABBITMQ_URL], queue_name=queue_name, timeout=5.0, rng=InOrder()).read()
    assert missing["ok"] is False and f"queue {queue_name!r}" in missing["error"] and "NOT_FOUND" in missing["error"]
    unreachable = QueueDepth(url=[dead, refusing_node_url()], queue_name=queue_name, timeout=2.0, rng=InOrder()).read()
    assert unreachable["ok"] is False and "connecting to" in unreachable["error"] and "NOT_FOUND" not in unreachable["error"]


@pytest.mark.parametrize("position", POSITIONS)
def test_a_dead_letter_replay_publishes_with_a_node_gone(
    position: str,
    resetting: FaultProxy,
    db: Database,
    make_settings: Callable[..., Any],
    queue_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = node_url(resetting.port)
    failed = dramatiq.Message(queue_name=queue_name, actor_name="apply_write", args=({"n": 1},), kwargs={}, options={})
    with db.session() as s:
        letter = dead_letters.store(s, failed, "its cause, fixed since")
    settings = make_settings(rabbitmq_url=";".join(with_dead_node(dead, position)))
    parser = argparse.ArgumentParser()
    dead_letters_cli.add_parser(parser.add_subparsers(dest="command"))

    code = dead_letters_cli.run(parser.parse_args(["dead-letters", "replay", str(letter)]), settings, db, rng=InOrder())

    assert code == 0, capsys.readouterr().out
    [(_, body)] = take_all(queue_name)
    assert dramatiq.Message.decode(body).message_id == failed.message_id
    assert tried(resetting) == (position == "first")
