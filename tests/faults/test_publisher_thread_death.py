"""The publisher's I/O thread dies (a bug in pika, or in the link's own recovery): the next write learns it at once.

The bug is injected the only way a bug can be: a callback that raises on the I/O loop (pika lets it out of
`ioloop.start()`), and a recovery that raises too. Before, the thread was gone for good: every later publish
handed its request to a closed loop, which accepts callbacks silently, and waited out its whole deadline
for a 503. Now the publish is rejected at once, a new thread on a fresh link takes over, and the restart
is counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from brownout._dispatch.publisher import Publisher, PublisherState, PublishRejected, RejectReason
from brownout._dispatch.publisher_link import PublisherLink
from tests.integration.test_publisher import message
from tests.support.polling import wait_until
from tests.support.rabbit import take_all

CONFIRM_TIMEOUT = 20.0  # what a write would wait on a dead thread: far above "at once"


def test_a_dead_io_thread_is_noticed_at_once_and_restarted(
    make_publisher: Callable[..., Publisher], queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = make_publisher(confirm_timeout=CONFIRM_TIMEOUT)
    restarts: list[int] = []
    publisher.on_restart = lambda: restarts.append(publisher.restarts)
    publisher.publish(message(queue_name, "before"))
    thread = publisher._thread
    assert thread is not None

    def broken_recovery(self: PublisherLink, exc: BaseException, *, abort: bool) -> None:
        raise RuntimeError("injected: recovery fails")

    monkeypatch.setattr(PublisherLink, "_lost", broken_recovery)
    ioloop = publisher._link.ioloop
    assert ioloop is not None

    def bug() -> None:
        raise RuntimeError("injected: a bug on the I/O loop")

    ioloop.add_callback_threadsafe(bug)
    thread.join(timeout=10)
    assert not thread.is_alive(), "the injected bug did not end the I/O thread"
    monkeypatch.undo()

    started = time.monotonic()
    with pytest.raises(PublishRejected) as rejected:
        publisher.publish(message(queue_name, "while it restarts"))
    assert time.monotonic() - started < CONFIRM_TIMEOUT / 4, "the write waited on a dead thread"
    assert rejected.value.reason is RejectReason.UNREACHABLE and rejected.value.retry_after >= 1
    assert publisher.restarts == 1 and restarts == [1]

    def publishes() -> bool:
        try:
            publisher.publish(message(queue_name, "after"), timeout=2.0)
            return True
        except PublishRejected:
            return False

    assert wait_until(publishes, timeout=15)
    assert publisher.state is PublisherState.READY
    bodies = [body for _, body in take_all(queue_name)]
    assert len(bodies) == 2  # "before" and "after"; the rejected write was never handed to RabbitMQ
