"""The publisher when RabbitMQ refuses, resets, goes silent or restarts, through a TCP
proxy in front of the machine's RabbitMQ (which itself is never touched).

Every publish must end within its own deadline (plus scheduling margin on a shared
2-core machine), and the first publish after RabbitMQ comes back must succeed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pika
import pytest

from brownout._dispatch.publisher import Publisher, PublisherState, PublishRejected
from tests.integration.test_publisher import message
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, take_all
from tests.support.tcp_proxy import FaultProxy
from tests.support.throwaway_rabbit import ThrowawayRabbit, require_rabbitmq_scripts


@pytest.fixture
def rabbit_proxy() -> Iterator[FaultProxy]:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=pika.URLParameters(RABBITMQ_URL).port) as proxy:
        yield proxy


@pytest.fixture
def make_publisher(rabbit_proxy: FaultProxy, make_publisher: Callable[..., Publisher]) -> Callable[..., Publisher]:
    """The shared factory (tests/conftest.py), reaching RabbitMQ through the proxy."""
    parameters = pika.URLParameters(RABBITMQ_URL)
    url = RABBITMQ_URL.replace(f"{parameters.host}:{parameters.port}", f"127.0.0.1:{rabbit_proxy.port}")
    return lambda **overrides: make_publisher(**({"url": url} | overrides))


def timed_publish(publisher: Publisher, queue_name: str, **options: Any) -> tuple[str, float]:
    """("queued" or the rejection reason, seconds taken)."""
    started = time.monotonic()
    try:
        publisher.publish(message(queue_name, "x"), **options)
        return "queued", time.monotonic() - started
    except PublishRejected as rejected:
        return rejected.reason, time.monotonic() - started


def test_refused_is_rejected_at_once(make_publisher: Any, rabbit_proxy: FaultProxy, queue_name: str) -> None:
    rabbit_proxy.refuse()
    publisher = make_publisher()

    first = timed_publish(publisher, queue_name)
    later = [timed_publish(publisher, queue_name) for _ in range(5)]

    assert first[0] == "unreachable" and first[1] < 3.0
    assert all(reason == "unreachable" and elapsed < 3.0 for reason, elapsed in later)


def test_reset_on_connect_is_rejected_at_once(make_publisher: Any, rabbit_proxy: FaultProxy, queue_name: str) -> None:
    rabbit_proxy.reset()
    publisher = make_publisher()

    reason, elapsed = timed_publish(publisher, queue_name)

    assert reason == "unreachable" and elapsed < 3.0


def test_silent_on_connect_is_rejected_within_the_deadline(
    make_publisher: Any, rabbit_proxy: FaultProxy, queue_name: str
) -> None:
    rabbit_proxy.silence()
    publisher = make_publisher()

    reason, elapsed = timed_publish(publisher, queue_name)
    assert reason == "unreachable" and elapsed < 3.5
    # That attempt timed out, so the next ones wait for the backoff instead of a connect.
    assert wait_until(lambda: publisher.state is PublisherState.DISCONNECTED, timeout=3)
    reason, elapsed = timed_publish(publisher, queue_name)
    assert reason == "unreachable" and elapsed < 0.5


def test_silence_on_an_open_connection_times_out_at_the_deadline_then_recovers(
    make_publisher: Any, rabbit_proxy: FaultProxy, queue_name: str
) -> None:
    publisher = make_publisher(confirm_timeout=1.0)
    assert timed_publish(publisher, queue_name)[0] == "queued"
    rabbit_proxy.silence()

    reason, elapsed = timed_publish(publisher, queue_name)

    assert reason == "timeout"
    assert 0.9 <= elapsed < 2.0
    # The probe finds no answer and drops the link long before a heartbeat check would.
    assert wait_until(lambda: publisher.state is not PublisherState.READY, timeout=3)
    rabbit_proxy.pass_through()
    assert wait_until(lambda: timed_publish(publisher, queue_name)[0] == "queued", timeout=15, interval=0.2)


def test_the_first_publish_after_connections_are_cut_succeeds(
    make_publisher: Any, rabbit_proxy: FaultProxy, queue_name: str
) -> None:
    publisher = make_publisher()
    assert timed_publish(publisher, queue_name)[0] == "queued"

    rabbit_proxy.reset_existing()  # RabbitMQ restarted under us, and is back at once
    rabbit_proxy.pass_through()

    assert timed_publish(publisher, queue_name)[0] == "queued"
    assert rabbit_proxy.connection_count == 2


def test_the_first_publish_after_a_restart_succeeds(make_publisher: Any, rabbit_proxy: FaultProxy, queue_name: str) -> None:
    publisher = make_publisher()
    assert timed_publish(publisher, queue_name)[0] == "queued"
    rabbit_proxy.refuse()  # RabbitMQ goes down: open connections cut, new ones refused
    rabbit_proxy.reset_existing()
    assert timed_publish(publisher, queue_name)[0] == "unreachable"
    threading.Event().wait(2.0)  # down for a while: background attempts back off

    rabbit_proxy.pass_through()

    reason, elapsed = timed_publish(publisher, queue_name)
    assert reason == "queued" and elapsed < 2.0
    assert [dramatiq.Message.decode(body).args for _, body in take_all(queue_name)] == [("x",), ("x",)]


def test_twenty_threads_all_return_within_their_deadline_when_rabbitmq_goes_silent(
    make_publisher: Any, rabbit_proxy: FaultProxy, queue_name: str
) -> None:
    deadline = 1.5
    # Room for what 20 threads confirm in 0.3 s (about 1 ms a confirm): a full queue is not this test's fault.
    publisher = make_publisher(confirm_timeout=deadline, max_length=1_000_000)
    assert timed_publish(publisher, queue_name)[0] == "queued"
    silenced = threading.Event()
    stop = threading.Event()
    results: list[tuple[str, float]] = []
    lock = threading.Lock()

    def keep_publishing() -> None:
        while not stop.is_set():
            outcome = timed_publish(publisher, queue_name)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=keep_publishing) for _ in range(20)]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.3)
    rabbit_proxy.silence()
    silenced.set()
    threading.Event().wait(deadline * 2)
    stop.set()
    for thread in threads:
        thread.join(deadline + 2.0)

    assert not any(thread.is_alive() for thread in threads)
    assert max(elapsed for _, elapsed in results) < deadline + 1.0
    reasons = {reason for reason, _ in results}
    assert "queued" in reasons and "timeout" in reasons
    assert reasons <= {"queued", "timeout", "unreachable"}


def test_close_is_bounded_while_rabbitmq_is_silent(make_publisher: Any, rabbit_proxy: FaultProxy, queue_name: str) -> None:
    publisher = make_publisher()
    assert timed_publish(publisher, queue_name)[0] == "queued"
    rabbit_proxy.silence()

    started = time.monotonic()
    publisher.close()

    assert time.monotonic() - started < 2.5
    assert publisher.state is PublisherState.CLOSED
    assert wait_until(lambda: rabbit_proxy.open_connections == 0, timeout=2)


@pytest.fixture(scope="module")
def throwaway_rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayRabbit]:
    require_rabbitmq_scripts()
    node = ThrowawayRabbit(tmp_path_factory.mktemp("rabbitmq"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


def test_an_alarm_blocks_publishing_and_publishes_fail_fast(throwaway_rabbit: ThrowawayRabbit) -> None:
    queue = f"bo-test-{uuid.uuid4().hex[:10]}"
    with Publisher(url=throwaway_rabbit.url, queue_name=queue, max_length=100, confirm_timeout=1.0) as publisher:
        assert timed_publish(publisher, queue)[0] == "queued"
        throwaway_rabbit.ctl("set_vm_memory_high_watermark", "0")  # memory alarm: publishers are blocked
        try:
            # RabbitMQ blocks a connection when it next publishes: that message is stuck
            # unconfirmed (outcome unknown), and connection.blocked makes the rest fail fast.
            reason, elapsed = timed_publish(publisher, queue)
            assert reason == "timeout" and elapsed < 2.0
            assert wait_until(lambda: publisher.state is PublisherState.BLOCKED, timeout=5)
            outcomes = [timed_publish(publisher, queue) for _ in range(5)]
            assert all(reason == "blocked" and elapsed < 0.5 for reason, elapsed in outcomes)
        finally:
            throwaway_rabbit.ctl("set_vm_memory_high_watermark", "0.4")
        assert wait_until(lambda: publisher.state is PublisherState.READY, timeout=10)
        assert timed_publish(publisher, queue)[0] == "queued"


def test_the_first_publish_after_a_real_rabbitmq_restart_succeeds(throwaway_rabbit: ThrowawayRabbit) -> None:
    queue = f"bo-test-{uuid.uuid4().hex[:10]}"
    with Publisher(url=throwaway_rabbit.url, queue_name=queue, max_length=100) as publisher:
        assert timed_publish(publisher, queue)[0] == "queued"
        throwaway_rabbit.ctl("stop_app")  # closes every connection (CONNECTION_FORCED), then refuses
        try:
            reason, elapsed = timed_publish(publisher, queue)
            assert reason == "unreachable" and elapsed < 1.0
            threading.Event().wait(2.0)  # down for a while: background attempts back off
        finally:
            throwaway_rabbit.ctl("start_app")

        reason, elapsed = timed_publish(publisher, queue)
        assert reason == "queued" and elapsed < 2.0


def test_the_worker_brokers_own_publishes_end_within_their_deadline_under_an_alarm(
    throwaway_rabbit: ThrowawayRabbit,
) -> None:
    """A deferral is the worker's own publish (Dramatiq's blocking connection, confirms on). Under a resource
    alarm pika waited for the unblock without a deadline: the batch sat until Dramatiq's TimeLimit (10 min)
    killed it, and every write of it went to Q.XQ. Now each attempt gives up at the broker's deadline and
    the enqueue raises a BrokerError, which the apply actor turns into holding that one write."""
    from dramatiq.errors import BrokerError

    from brownout._dispatch.queues import BrownoutRabbitmqBroker

    queue = f"bo-test-{uuid.uuid4().hex[:10]}"
    broker = BrownoutRabbitmqBroker(url=throwaway_rabbit.url, max_length=100, publish_deadline=1.0)
    try:
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="a", args=(), kwargs={}, options={}))
        throwaway_rabbit.ctl("set_vm_memory_high_watermark", "0")
        started = time.monotonic()
        try:
            with pytest.raises(BrokerError):
                broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="a", args=(), kwargs={}, options={}), delay=1000)
            assert time.monotonic() - started < 3 * 1.0 + 5.0  # three attempts of 1 s, plus reconnects
        finally:
            throwaway_rabbit.ctl("set_vm_memory_high_watermark", "0.4")
    finally:
        broker.close()
