"""The adaptive drain's AIMD controller on a fake clock, its limiter with threads, the middleware's bookkeeping.

No test sleeps: time is a FakeClock; the threaded tests wait on Events and
Barriers with timeouts.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from brownout._db.circuit_breaker import CircuitBreaker
from brownout._db.errors import ErrorKind
from brownout._worker.drain import AdaptiveDrain, AimdController, Limiter, p90
from brownout._worker.health_gate import DatabaseUnavailable
from tests.support.fakes import FakeClock

TARGET = 0.1
FAST = 0.01
SLOW = 0.5


def controller(clock: FakeClock, **options: Any) -> AimdController:
    fields: dict[str, Any] = {"min_limit": 1, "max_limit": 8, "latency_target": TARGET, "window": 3, "clock": clock}
    fields.update(options)
    return AimdController(**fields)


def complete(c: AimdController, clock: FakeClock, duration: float, n: int = 1) -> int:
    """*n* messages, one after another, each taking *duration*."""
    for _ in range(n):
        started = clock()
        clock.advance(duration)
        c.on_success(started)
    return c.limit


def limits(c: AimdController) -> list[int]:
    return [limit for _, limit in c.history]


# -- the controller -------------------------------------------------------------


def test_slow_start_then_one_more_per_window_of_fast_successes() -> None:
    clock = FakeClock()
    c = controller(clock)
    assert c.limit == 1
    seen = []
    for _ in range(9):
        complete(c, clock, FAST, n=3)
        seen.append(c.limit)
    assert seen == [2, 3, 4, 5, 6, 7, 8, 8, 8], "+1 per window of 3, ceiling 8"
    assert limits(c) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_an_incomplete_window_does_not_increase() -> None:
    clock = FakeClock()
    c = controller(clock)
    assert complete(c, clock, FAST, n=2) == 1
    assert complete(c, clock, FAST) == 2


def test_a_failure_halves_with_a_floor() -> None:
    clock = FakeClock()
    c = controller(clock, min_limit=2, max_limit=16, window=1)
    complete(c, clock, FAST, n=14)
    assert c.limit == 16
    seen = []
    for _ in range(5):
        started = clock()
        clock.advance(FAST)
        seen.append(c.on_failure(started))
    assert seen == [8, 4, 2, 2, 2]


def test_odd_limits_halve_down() -> None:
    clock = FakeClock()
    c = controller(clock, window=1)
    complete(c, clock, FAST, n=6)
    assert c.limit == 7
    started = clock()
    assert c.on_failure(started) == 3


def test_a_window_whose_p90_is_above_target_halves() -> None:
    clock = FakeClock()
    c = controller(clock, window=10)
    for _ in range(3):
        complete(c, clock, FAST, n=10)
    assert c.limit == 4
    complete(c, clock, FAST, n=8)
    complete(c, clock, SLOW, n=1)
    assert c.limit == 4, "one slow message is not a full window yet"
    complete(c, clock, SLOW, n=1)
    assert c.limit == 2, "p90 of 8 fast and 2 slow is slow"


def test_one_slow_message_in_a_window_is_not_enough() -> None:
    clock = FakeClock()
    c = controller(clock, window=10)
    complete(c, clock, FAST, n=9)
    complete(c, clock, SLOW, n=1)
    assert c.limit == 2, "p90 of 9 fast and 1 slow is fast: an increase"


def test_at_most_one_decrease_for_messages_admitted_before_it() -> None:
    """A burst of failures from messages in flight together halves once, not down to the floor."""
    clock = FakeClock()
    c = controller(clock, window=1)
    complete(c, clock, FAST, n=7)
    assert c.limit == 8
    admitted = [clock() for _ in range(8)]  # eight in flight together
    clock.advance(0.5)
    assert [c.on_failure(started) for started in admitted] == [4] * 8
    assert [c.on_success(started) for started in admitted] == [4] * 8, "late outcomes of the old burst are ignored"
    clock.advance(0.001)
    started = clock()  # admitted under the new limit: evidence again
    clock.advance(0.001)
    assert c.on_failure(started) == 2


def test_a_stall_halves_once_per_admission_epoch() -> None:
    clock = FakeClock()
    c = controller(clock, window=1, stall_after=1.0)
    complete(c, clock, FAST, n=7)
    in_flight = [clock() for _ in range(8)]
    clock.advance(1.0)
    assert c.on_tick(in_flight) == 8, "not longer than stall_after yet"
    clock.advance(0.01)
    assert c.on_tick(in_flight) == 4
    clock.advance(5.0)
    assert c.on_tick(in_flight) == 4, "the same stalled messages do not decrease again"
    newer = clock()
    clock.advance(1.01)
    assert c.on_tick([*in_flight, newer]) == 2, "a message admitted after the decrease stalls too"
    assert c.on_tick([]) == 2


def test_default_stall_after_is_ten_targets() -> None:
    assert AimdController(latency_target=0.2, clock=FakeClock()).stall_after == pytest.approx(2.0)


def test_restart_is_slow_start_and_ignores_older_outcomes() -> None:
    clock = FakeClock()
    c = controller(clock, window=1)
    complete(c, clock, FAST, n=5)
    before = clock()
    clock.advance(0.01)
    assert c.restart() == 1
    assert c.on_failure(before) == 1
    assert c.on_success(before) == 1, "an old success does not count towards the new window"
    assert complete(c, clock, FAST) == 2


def test_history_records_each_change_with_its_time() -> None:
    clock = FakeClock(start=100.0)
    c = controller(clock, window=1)
    clock.advance(1.0)
    complete(c, clock, FAST)
    started = clock()
    clock.advance(1.0)
    c.on_failure(started)
    c.restart()  # already at the floor: no new entry
    assert list(c.history) == [(100.0, 1), (101.01, 2), (102.01, 1)]


def test_min_and_max_are_validated() -> None:
    with pytest.raises(ValueError):
        AimdController(min_limit=0, clock=FakeClock())
    with pytest.raises(ValueError):
        AimdController(min_limit=5, max_limit=4, clock=FakeClock())
    with pytest.raises(ValueError):
        AimdController(latency_target=0, clock=FakeClock())


def test_p90_is_nearest_rank() -> None:
    assert p90([1.0]) == 1.0
    assert p90([float(i) for i in range(1, 11)]) == 9.0
    assert p90([float(i) for i in range(1, 21)]) == 18.0


# -- the limiter --------------------------------------------------------------------


def hold_permits(limiter: Limiter, n: int) -> None:
    for _ in range(n):
        assert limiter.acquire(timeout=0)


def test_acquire_within_the_limit_and_not_beyond() -> None:
    limiter = Limiter(2)
    hold_permits(limiter, 2)
    assert limiter.in_use == 2
    assert not limiter.acquire(timeout=0.05)
    limiter.release()
    assert limiter.acquire(timeout=0)


def test_release_without_a_permit_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        Limiter(1).release()


def test_a_release_wakes_a_waiter() -> None:
    limiter = Limiter(1)
    hold_permits(limiter, 1)
    got = threading.Event()

    def wait() -> None:
        if limiter.acquire(timeout=5):
            got.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert not got.wait(0.05)
    limiter.release()
    assert got.wait(5)
    waiter.join(5)
    assert limiter.in_use == 1


def test_raising_the_limit_admits_waiters_and_lowering_it_holds_new_ones() -> None:
    limiter = Limiter(1)
    hold_permits(limiter, 1)
    admitted = threading.Semaphore(0)

    def wait() -> None:
        if limiter.acquire(timeout=5):
            admitted.release()

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for w in waiters:
        w.start()
    limiter.set_limit(4)
    for _ in range(3):
        assert admitted.acquire(timeout=5)
    for w in waiters:
        w.join(5)
    assert limiter.in_use == 4
    limiter.set_limit(2)
    limiter.release()
    limiter.release()
    assert limiter.in_use == 2
    assert not limiter.acquire(timeout=0.05), "2 in use under a limit of 2"
    limiter.release()
    assert limiter.acquire(timeout=0)


def test_close_releases_every_waiter_without_a_permit() -> None:
    limiter = Limiter(1)
    hold_permits(limiter, 1)
    results: list[bool] = []
    lock = threading.Lock()

    def wait() -> None:
        outcome = limiter.acquire()
        with lock:
            results.append(outcome)

    waiters = [threading.Thread(target=wait) for _ in range(4)]
    for w in waiters:
        w.start()
    limiter.close()
    for w in waiters:
        w.join(5)
        assert not w.is_alive()
    assert results == [False] * 4
    assert limiter.in_use == 1
    limiter.reopen()
    limiter.release()
    assert limiter.acquire(timeout=0)


def test_concurrent_holders_never_exceed_the_limit() -> None:
    limiter = Limiter(3)
    lock = threading.Lock()
    holding = 0
    peak = 0
    start = threading.Barrier(8)

    def work() -> None:
        nonlocal holding, peak
        start.wait(5)
        for _ in range(200):
            assert limiter.acquire(timeout=5)
            with lock:
                holding += 1
                peak = max(peak, holding)
            with lock:
                holding -= 1
            limiter.release()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak <= 3 and limiter.peak <= 3
    assert limiter.in_use == 0


# -- the middleware's bookkeeping (no worker) -------------------------------------------


class Message:
    message_id = "m"
    actor_name = "apply_command"


class EmailMessage:
    message_id = "e"
    actor_name = "send_email"


def test_only_the_named_actors_are_limited() -> None:
    drain = AdaptiveDrain(actor_names={"apply_command"}, clock=FakeClock())
    email: Any = EmailMessage()
    for _ in range(3):
        drain.before_process_message(None, email)  # type: ignore[arg-type]
    assert drain.limiter.in_use == 0, "an email job takes no permit"
    drain.after_process_message(None, email, exception=DatabaseUnavailable("smtp"))  # type: ignore[arg-type]
    assert drain.limiter.in_use == 0 and drain.limit == 1
    drain.before_process_message(None, Message())  # type: ignore[arg-type]
    assert drain.limiter.in_use == 1


def test_the_middleware_feeds_outcomes_and_releases_permits() -> None:
    clock = FakeClock()
    drain = AdaptiveDrain(min_concurrency=1, max_concurrency=4, latency_target=TARGET, window=2, clock=clock)
    broker: Any = None
    message: Any = Message()
    for _ in range(2):
        drain.before_process_message(broker, message)
        assert drain.limiter.in_use == 1
        clock.advance(FAST)
        drain.after_process_message(broker, message)
        assert drain.limiter.in_use == 0
    assert drain.limit == 2 and drain.limiter.limit == 2
    drain.before_process_message(broker, message)
    drain.after_process_message(broker, message, exception=DatabaseUnavailable("down"))
    assert drain.limit == 1, "the database went away: slow start"
    drain.before_process_message(broker, message)
    drain.after_skip_message(broker, message)
    assert drain.limiter.in_use == 0
    drain.after_process_message(broker, message)  # no permit held: nothing to release
    assert drain.limiter.in_use == 0


def test_a_failed_attempt_reported_by_the_breaker_halves_the_limit() -> None:
    clock = FakeClock()
    drain = AdaptiveDrain(min_concurrency=1, max_concurrency=8, window=1, clock=clock)
    breaker = CircuitBreaker(clock=clock)
    breaker.add_listener(drain.breaker_listener)
    message: Any = Message()
    for _ in range(5):
        drain.before_process_message(None, message)  # type: ignore[arg-type]
        clock.advance(FAST)
        drain.after_process_message(None, message)  # type: ignore[arg-type]
    assert drain.limit == 6
    drain.before_process_message(None, message)  # type: ignore[arg-type]
    clock.advance(FAST)
    breaker.record_failure(0, ErrorKind.TRANSIENT)  # an attempt inside execute_with_retry failed
    assert drain.limit == 3 and drain.limiter.limit == 3
    breaker.record_failure(0, ErrorKind.TRANSIENT)  # its retry fails too: same admission epoch
    assert drain.limit == 3
    drain.after_process_message(None, message)  # type: ignore[arg-type]  # then it succeeds, late
    assert drain.limit == 3
    breaker.record_failure(0, ErrorKind.TRANSIENT)  # a thread without a permit: not the drain's
    assert drain.limit == 3


def test_a_tick_sees_a_stall_and_a_pause() -> None:
    clock = FakeClock()
    drain = AdaptiveDrain(max_concurrency=8, window=1, stall_after=1.0, clock=clock)
    message: Any = Message()
    for _ in range(3):
        drain.before_process_message(None, message)  # type: ignore[arg-type]
        clock.advance(FAST)
        drain.after_process_message(None, message)  # type: ignore[arg-type]
    assert drain.limit == 4
    drain.before_process_message(None, message)  # type: ignore[arg-type]
    clock.advance(1.5)
    drain.tick()
    assert drain.limit == 2, "a stalled message halves"

    class Consumer:
        paused = True

    class Worker:
        consumers = {"q": Consumer()}

    drain.after_process_message(None, message)  # type: ignore[arg-type]
    drain.tick(Worker())  # type: ignore[arg-type]
    assert drain.limit == 1
    assert [limit for _, limit in drain.history] == [1, 2, 3, 4, 2, 1]
