"""The breaker's transition table, driven by a fake clock; then its thread safety.

No test sleeps: time is a FakeClock, jitter a scripted rng, and the threaded
tests wait on Barriers and Events with timeouts.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy.exc

from brownout._db.circuit_breaker import BreakerListener, BreakerState, CircuitBreaker
from brownout._db.errors import CircuitOpenError, ErrorKind
from tests.support.fakes import FakeClock, ScriptedRandom

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class TransientError(ConnectionResetError):
    """classify() -> DISCONNECT: counts as a failure."""


class PermanentError(ValueError):
    """classify() -> PERMANENT: a bug or bad data, never a sign of a sick database."""


class RecordingListener(BreakerListener):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_transition(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        self.events.append(("transition", breaker.name, old, new))

    def on_failure(self, breaker: CircuitBreaker, kind: ErrorKind) -> None:
        self.events.append(("failure", breaker.name, kind))

    def on_rejected(self, breaker: CircuitBreaker) -> None:
        self.events.append(("rejected", breaker.name))

    def transitions(self) -> list[tuple[BreakerState, BreakerState]]:
        return [(e[2], e[3]) for e in self.events if e[0] == "transition"]


class Calls:
    """A guarded function that records each call and then raises or returns as told."""

    def __init__(self) -> None:
        self.count = 0

    def ok(self) -> Callable[[], str]:
        def fn() -> str:
            self.count += 1
            return "ok"

        return fn

    def raising(self, exc: BaseException) -> Callable[[], str]:
        def fn() -> str:
            self.count += 1
            raise exc

        return fn


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def listener() -> RecordingListener:
    return RecordingListener()


@pytest.fixture
def breaker(clock: FakeClock, listener: RecordingListener) -> CircuitBreaker:
    return CircuitBreaker(name="db", clock=clock, open_jitter=0.0, listeners=[listener])


def fail(breaker: CircuitBreaker, times: int = 1, exc: Exception | None = None) -> None:
    for _ in range(times):
        error = exc or TransientError("connection reset by peer")
        with pytest.raises(type(error)):
            breaker.call(Calls().raising(error))


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        assert breaker.call(Calls().ok()) == "ok"


def open_breaker(breaker: CircuitBreaker) -> None:
    fail(breaker, breaker.failure_threshold)
    assert breaker.state is OPEN


# -- CLOSED ------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    b = CircuitBreaker()
    assert (b.failure_threshold, b.open_seconds, b.success_threshold) == (5, 60.0, 2)
    assert b.state is CLOSED and b.forced is None


@pytest.mark.parametrize(
    "kwargs",
    [{"failure_threshold": 0}, {"success_threshold": 0}, {"open_seconds": 0}, {"open_jitter": -0.1}, {"open_jitter": 1.5}],
)
def test_rejects_nonsense_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)


def test_closed_stays_closed_below_threshold(breaker: CircuitBreaker) -> None:
    fail(breaker, 4)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 4
    succeed(breaker)  # still lets calls through


def test_success_resets_the_consecutive_count(breaker: CircuitBreaker) -> None:
    fail(breaker, 4)
    succeed(breaker)
    assert breaker.snapshot()["consecutive_failures"] == 0
    fail(breaker, 4)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_fifth_consecutive_transient_failure_opens(breaker: CircuitBreaker, listener: RecordingListener) -> None:
    fail(breaker, 5)
    assert breaker.state is OPEN
    assert listener.transitions() == [(CLOSED, OPEN)]


def test_failure_is_reraised_unchanged(breaker: CircuitBreaker) -> None:
    exc = TransientError("boom")
    with pytest.raises(TransientError) as info:
        breaker.call(Calls().raising(exc))
    assert info.value is exc


def test_call_returns_the_result(breaker: CircuitBreaker) -> None:
    assert breaker.call(lambda: 42) == 42


# -- OPEN ----------------------------------------------------------------------


def test_open_refuses_without_calling_and_retry_after_counts_down(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    calls = Calls()
    for step, expected in [(0, 60.0), (10, 50.0), (39.5, 10.5), (10, 0.5)]:
        clock.advance(step)
        with pytest.raises(CircuitOpenError) as info:
            breaker.call(calls.ok())
        assert info.value.retry_after == pytest.approx(expected)
        assert info.value.state == "open" and info.value.name == "db"
        assert breaker.retry_after() == pytest.approx(expected)
    assert calls.count == 0
    with pytest.raises(CircuitOpenError):
        breaker.before_call()


def test_open_until_exactly_open_seconds_then_one_trial(
    breaker: CircuitBreaker, clock: FakeClock, listener: RecordingListener
) -> None:
    open_breaker(breaker)
    clock.advance(59.999)
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    assert breaker.state is OPEN
    clock.advance(0.001)
    permit = breaker.before_call()
    assert permit > 0  # the trial
    assert breaker.state is HALF_OPEN
    assert listener.transitions() == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    # ... and it is the only one while it runs.
    with pytest.raises(CircuitOpenError) as info:
        breaker.before_call()
    assert info.value.state == "half_open"
    assert info.value.retry_after > 0
    assert breaker.retry_after() > 0


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_jitter_stretches_open_time_within_bounds(clock: FakeClock, fraction: float) -> None:
    jitter = 0.1
    rng = ScriptedRandom(fraction)
    b = CircuitBreaker(clock=clock, open_jitter=jitter, rng=rng)
    open_breaker(b)
    assert rng.draws == 1
    open_for = 60.0 * (1 + jitter * fraction)
    assert 60.0 <= open_for <= 60.0 * (1 + jitter)
    assert b.retry_after() == pytest.approx(open_for)
    clock.advance(open_for - 0.001)
    with pytest.raises(CircuitOpenError) as info:
        b.before_call()
    assert info.value.retry_after == pytest.approx(0.001, abs=1e-6)
    clock.advance(0.001)
    assert b.before_call() > 0


def test_jitter_spreads_a_fleet(clock: FakeClock) -> None:
    """Breakers that opened at the same instant do not all probe at the same instant."""
    open_times = set()
    for seed in range(20):
        b = CircuitBreaker(clock=clock, open_jitter=0.1, rng=random.Random(seed))
        open_breaker(b)
        wait = b.retry_after()
        assert 60.0 <= wait <= 66.0
        open_times.add(round(wait, 6))
    assert len(open_times) > 10


# -- HALF_OPEN -------------------------------------------------------------------


def test_trial_failure_reopens_for_a_fresh_period(breaker: CircuitBreaker, clock: FakeClock, listener: RecordingListener) -> None:
    open_breaker(breaker)
    clock.advance(60)
    calls = Calls()
    with pytest.raises(TransientError):
        breaker.call(calls.raising(TransientError("reset")))
    assert calls.count == 1
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(60.0)  # counted from the trial's failure
    clock.advance(59)
    with pytest.raises(CircuitOpenError):
        breaker.call(calls.ok())
    assert calls.count == 1
    clock.advance(1)
    succeed(breaker)
    assert listener.transitions() == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)]


def test_two_trial_successes_close(breaker: CircuitBreaker, clock: FakeClock, listener: RecordingListener) -> None:
    open_breaker(breaker)
    clock.advance(60)
    succeed(breaker)
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["half_open_successes"] == 1
    succeed(breaker)
    assert breaker.state is CLOSED
    assert listener.transitions()[-1] == (HALF_OPEN, CLOSED)
    snap = breaker.snapshot()
    assert snap["consecutive_failures"] == 0 and snap["half_open_successes"] == 0
    # Closed again for real: takes a full threshold of failures to reopen.
    fail(breaker, 4)
    assert breaker.state is CLOSED


def test_half_open_failure_after_one_success_reopens(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(60)
    succeed(breaker)
    fail(breaker)
    assert breaker.state is OPEN
    clock.advance(60)
    succeed(breaker)  # the count of successes started again
    assert breaker.state is HALF_OPEN


def test_success_threshold_is_configurable(clock: FakeClock) -> None:
    b = CircuitBreaker(clock=clock, success_threshold=1, failure_threshold=1)
    fail(b)
    clock.advance(60)
    succeed(b)
    assert b.state is CLOSED


# -- what counts -------------------------------------------------------------------


def test_permanent_errors_neither_open_nor_reset(breaker: CircuitBreaker, listener: RecordingListener) -> None:
    fail(breaker, 4)
    fail(breaker, 1, PermanentError("bad data"))
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 4  # not reset either
    fail(breaker, 1)
    assert breaker.state is OPEN
    kinds = [e[2] for e in listener.events if e[0] == "failure"]
    assert ErrorKind.PERMANENT not in kinds and len(kinds) == 5


def test_many_permanent_errors_never_open(breaker: CircuitBreaker) -> None:
    fail(breaker, 50, PermanentError("bad data"))
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 0


def test_permanent_error_in_half_open_frees_the_trial_without_verdict(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(60)
    fail(breaker, 1, PermanentError("constraint"))
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["half_open_successes"] == 0
    first = breaker.before_call()  # the slot is free again, at once
    assert first > 0
    breaker.record_success(first)
    assert breaker.snapshot()["half_open_successes"] == 1


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), asyncio.CancelledError(), SystemExit(1)])
def test_base_exception_frees_the_trial_and_counts_nothing(
    breaker: CircuitBreaker, clock: FakeClock, listener: RecordingListener, interrupt: BaseException
) -> None:
    fail(breaker, 4)
    with pytest.raises(type(interrupt)):
        breaker.call(Calls().raising(interrupt))
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 4
    fail(breaker)
    assert breaker.state is OPEN
    clock.advance(60)
    events_before = len(listener.events)
    with pytest.raises(type(interrupt)):
        breaker.call(Calls().raising(interrupt))
    assert breaker.state is HALF_OPEN
    assert not any(e[0] == "failure" for e in listener.events[events_before:])
    assert breaker.before_call() > 0  # trial slot was freed, no open period restarted


def test_abandoned_trial_is_replaced_after_open_seconds_and_its_verdict_ignored(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    open_breaker(breaker)
    clock.advance(60)
    lost = breaker.before_call()  # its holder never reports
    clock.advance(59.9)
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    clock.advance(0.1)
    replacement = breaker.before_call()
    assert replacement > 0 and replacement != lost
    # The lost trial comes back: neither its failure nor its success counts.
    breaker.record_failure(lost, ErrorKind.DISCONNECT)
    assert breaker.state is HALF_OPEN
    breaker.record_success(lost)
    assert breaker.snapshot()["half_open_successes"] == 0
    breaker.release(lost)
    with pytest.raises(CircuitOpenError):  # nor does its release free the replacement's slot
        breaker.before_call()
    breaker.record_success(replacement)
    assert breaker.snapshot()["half_open_successes"] == 1


def test_late_report_of_a_pre_open_call_does_not_extend_the_open_period(breaker: CircuitBreaker, clock: FakeClock) -> None:
    slow = breaker.before_call()  # began while CLOSED
    open_breaker(breaker)
    clock.advance(30)
    breaker.record_failure(slow, ErrorKind.DISCONNECT)
    assert breaker.retry_after() == pytest.approx(30.0)
    breaker.record_success(slow)
    assert breaker.state is OPEN


def test_stale_trial_permit_after_reset_is_ignored(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(60)
    trial = breaker.before_call()
    breaker.reset()
    breaker.record_failure(trial, ErrorKind.DISCONNECT)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 0


# -- listeners -----------------------------------------------------------------------


def test_listeners_see_transitions_failures_and_rejections(
    breaker: CircuitBreaker, clock: FakeClock, listener: RecordingListener
) -> None:
    fail(breaker, 4, TransientError("x"))
    fail(breaker, 1, sqlalchemy.exc.TimeoutError("QueuePool limit reached"))
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: None)
    clock.advance(60)
    succeed(breaker, 2)
    assert listener.events == [
        *[("failure", "db", ErrorKind.DISCONNECT)] * 4,
        ("failure", "db", ErrorKind.TRANSIENT),
        ("transition", "db", CLOSED, OPEN),
        ("rejected", "db"),
        ("rejected", "db"),
        ("transition", "db", OPEN, HALF_OPEN),
        ("transition", "db", HALF_OPEN, CLOSED),
    ]


def test_listener_added_later_is_called(breaker: CircuitBreaker) -> None:
    late = RecordingListener()
    breaker.add_listener(late)
    fail(breaker)
    assert late.events == [("failure", "db", ErrorKind.DISCONNECT)]


class ExplodingListener(BreakerListener):
    def __init__(self) -> None:
        self.calls = 0

    def on_transition(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        self.calls += 1
        raise RuntimeError("metrics backend down")

    def on_failure(self, breaker: CircuitBreaker, kind: ErrorKind) -> None:
        self.calls += 1
        raise RuntimeError("metrics backend down")

    def on_rejected(self, breaker: CircuitBreaker) -> None:
        self.calls += 1
        raise RuntimeError("metrics backend down")


def test_a_raising_listener_breaks_nothing(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    after = RecordingListener()
    exploding = ExplodingListener()
    b = CircuitBreaker(name="db", clock=clock, listeners=[exploding, after])
    exc = TransientError("x")
    for _ in range(5):
        with pytest.raises(TransientError) as info:  # the real error, not the listener's
            b.call(Calls().raising(exc))
        assert info.value is exc
    assert b.state is OPEN
    with pytest.raises(CircuitOpenError):
        b.call(lambda: None)
    clock.advance(60)
    assert b.call(lambda: "ok") == "ok"
    assert exploding.calls == 5 + 1 + 1 + 1  # failures, ->OPEN, rejection, ->HALF_OPEN
    # Listeners after the broken one still hear everything.
    assert [e[0] for e in after.events].count("failure") == 5
    assert after.transitions() == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    assert "listener" in caplog.text


# -- operator overrides -------------------------------------------------------------


def test_force_open_refuses_until_reset(breaker: CircuitBreaker, clock: FakeClock, listener: RecordingListener) -> None:
    calls = Calls()
    breaker.force_open()
    assert breaker.state is OPEN and breaker.forced is OPEN
    clock.advance(3600)  # no trial, however long
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(calls.ok())
    assert info.value.retry_after == pytest.approx(60.0)
    assert breaker.retry_after() == pytest.approx(60.0)
    assert calls.count == 0
    breaker.reset()
    assert breaker.state is CLOSED and breaker.forced is None
    succeed(breaker)
    assert listener.transitions() == [(CLOSED, OPEN), (OPEN, CLOSED)]


def test_force_open_over_a_naturally_open_breaker(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    breaker.force_open()
    clock.advance(120)
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    assert breaker.state is OPEN


def test_force_closed_lets_everything_through_and_counts_nothing(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    breaker.force_closed()
    assert breaker.state is CLOSED and breaker.forced is CLOSED
    fail(breaker, 20)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 0
    succeed(breaker)
    breaker.reset()
    assert breaker.forced is None
    fail(breaker, 5)  # counting again
    assert breaker.state is OPEN


def test_trial_reported_after_force_closed_is_ignored(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(60)
    trial = breaker.before_call()
    breaker.force_closed()
    breaker.record_failure(trial, ErrorKind.SSL)
    assert breaker.state is CLOSED
    breaker.reset()
    assert breaker.state is CLOSED


def test_reset_clears_counters(breaker: CircuitBreaker) -> None:
    fail(breaker, 4)
    breaker.reset()
    fail(breaker, 4)
    assert breaker.state is CLOSED


# -- snapshot ------------------------------------------------------------------------


def test_snapshot_fields(breaker: CircuitBreaker, clock: FakeClock) -> None:
    assert breaker.snapshot() == {
        "name": "db",
        "state": "closed",
        "forced": None,
        "consecutive_failures": 0,
        "half_open_successes": 0,
        "wary": False,
        "retry_after_seconds": 0.0,
    }
    fail(breaker, 5)
    clock.advance(12.3456)
    assert breaker.snapshot() == {
        "name": "db",
        "state": "open",
        "forced": None,
        "consecutive_failures": 0,
        "half_open_successes": 0,
        "wary": False,
        "retry_after_seconds": 47.654,
    }
    clock.advance(60)
    succeed(breaker)
    snap = breaker.snapshot()
    assert (snap["state"], snap["half_open_successes"], snap["retry_after_seconds"]) == ("half_open", 1, 0.0)
    breaker.force_open()
    snap = breaker.snapshot()
    assert (snap["state"], snap["forced"], snap["retry_after_seconds"]) == ("open", "open", 60.0)
    breaker.force_closed()
    assert breaker.snapshot()["forced"] == "closed"


def test_state_values_are_stable_labels() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]


# -- concurrency ---------------------------------------------------------------------


@pytest.fixture
def fast_thread_switching() -> Iterator[None]:
    """Switch threads as often as CPython allows, so races show up in few rounds."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def test_exactly_one_trial_when_many_threads_arrive_together(clock: FakeClock, fast_thread_switching: None) -> None:
    threads_n, rounds = 32, 200
    listener = RecordingListener()
    b = CircuitBreaker(name="db", clock=clock, listeners=[listener])
    open_breaker(b)
    start = threading.Barrier(threads_n + 1, timeout=10)
    done = threading.Barrier(threads_n + 1, timeout=10)
    results: list[list[object]] = [[None] * threads_n for _ in range(rounds)]

    def worker(i: int) -> None:
        for r in range(rounds):
            start.wait()
            try:
                results[r][i] = b.before_call()
            except CircuitOpenError as exc:
                results[r][i] = exc
            except BaseException as exc:  # pragma: no cover - reported by the assertion below
                results[r][i] = exc
            done.wait()

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads_n)]
    for t in workers:
        t.start()
    try:
        for r in range(rounds):
            clock.advance(60)  # due for HALF_OPEN
            listener.events.clear()
            start.wait()
            done.wait()
            permits = [x for x in results[r] if isinstance(x, int)]
            refused = [x for x in results[r] if isinstance(x, CircuitOpenError)]
            assert len(permits) == 1 and permits[0] > 0, f"round {r}: {len(permits)} trials granted"
            assert len(refused) == threads_n - 1, f"round {r}: {results[r]!r:.500}"
            assert listener.transitions() == [(OPEN, HALF_OPEN)]
            assert sum(e[0] == "rejected" for e in listener.events) == threads_n - 1
            b.record_failure(permits[0], ErrorKind.SSL)  # reopen for the next round
            assert b.state is OPEN
    except BaseException:
        start.abort()  # let the workers out; an abort after a clean run would break their last wait
        done.abort()
        raise
    finally:
        for t in workers:
            t.join(timeout=10)
    assert not any(t.is_alive() for t in workers)


def test_guarded_call_is_not_under_the_lock(breaker: CircuitBreaker) -> None:
    inside = threading.Event()
    release = threading.Event()
    outcome: dict[str, object] = {}

    def slow() -> str:
        inside.set()
        assert release.wait(timeout=10), "never released"
        return "slow"

    def run(name: str, fn: Callable[[], object]) -> None:
        try:
            outcome[name] = breaker.call(fn)
        except BaseException as exc:  # pragma: no cover - shows up in the assertions
            outcome[name] = exc

    slow_thread = threading.Thread(target=run, args=("slow", slow), daemon=True)
    slow_thread.start()
    try:
        assert inside.wait(timeout=10)
        # While the slow call is in progress, others complete, failures included.
        fast = threading.Thread(target=run, args=("fast", lambda: "fast"), daemon=True)
        fast.start()
        fast.join(timeout=10)
        assert not fast.is_alive(), "a call waited for another call's I/O"
        assert outcome["fast"] == "fast"
        failing = threading.Thread(target=run, args=("failing", Calls().raising(TransientError("x"))), daemon=True)
        failing.start()
        failing.join(timeout=10)
        assert not failing.is_alive()
        assert isinstance(outcome["failing"], TransientError)
        snap: dict[str, object] = {}
        snapper = threading.Thread(target=lambda: snap.update(breaker.snapshot()), daemon=True)
        snapper.start()
        snapper.join(timeout=10)
        assert snap["consecutive_failures"] == 1
        assert "slow" not in outcome
    finally:
        release.set()
        slow_thread.join(timeout=10)
    assert outcome["slow"] == "slow"
    assert breaker.snapshot()["consecutive_failures"] == 0  # its success came last


def test_trial_call_is_not_under_the_lock(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """While the trial runs, refusals are immediate rather than queued behind it."""
    open_breaker(breaker)
    clock.advance(60)
    inside = threading.Event()
    release = threading.Event()
    outcome: dict[str, object] = {}

    def trial() -> str:
        inside.set()
        assert release.wait(timeout=10)
        return "trial"

    t = threading.Thread(target=lambda: outcome.update(trial=breaker.call(trial)), daemon=True)
    t.start()
    try:
        assert inside.wait(timeout=10)

        def refused() -> None:
            try:
                breaker.call(lambda: "x")
            except CircuitOpenError as exc:
                outcome["refused"] = exc

        r = threading.Thread(target=refused, daemon=True)
        r.start()
        r.join(timeout=10)
        assert not r.is_alive()
        assert isinstance(outcome["refused"], CircuitOpenError)
    finally:
        release.set()
        t.join(timeout=10)
    assert outcome["trial"] == "trial"
    assert breaker.snapshot()["half_open_successes"] == 1


# -- wary: one call at a time after a failure of this process's own -------------------


def test_after_a_failure_one_call_at_a_time_until_one_succeeds(breaker: CircuitBreaker, listener: RecordingListener) -> None:
    fail(breaker)
    assert breaker.state is CLOSED and breaker.wary
    first = breaker.before_call()
    assert first < 0, "the wary call's own permit"
    with pytest.raises(CircuitOpenError) as refused:
        breaker.before_call()  # a second call while the first is in flight: refused, not sent
    assert refused.value.state == "wary" and refused.value.retry_after > 0
    assert ("rejected", "db") in listener.events
    breaker.record_success(first)
    assert not breaker.wary
    permits = [breaker.before_call() for _ in range(3)]
    assert permits == [0, 0, 0], "a success ends it: calls flow again"


def test_the_wary_calls_failures_are_sequential_and_still_open_it(breaker: CircuitBreaker) -> None:
    fail(breaker)
    for _ in range(breaker.failure_threshold - 1):
        permit = breaker.before_call()
        with pytest.raises(CircuitOpenError):
            breaker.before_call()
        breaker.record_failure(permit, ErrorKind.DISCONNECT)  # its verdict frees the slot for the next call
    assert breaker.state is OPEN and not breaker.wary


def test_a_success_of_an_older_call_ends_it_too(breaker: CircuitBreaker) -> None:
    older = breaker.before_call()  # in flight before the failure
    fail(breaker)
    breaker.record_success(older)
    assert not breaker.wary and breaker.before_call() == 0


def test_a_released_wary_call_frees_the_slot_and_a_vanished_one_is_replaced(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker)
    breaker.release(breaker.before_call())  # cancelled, or a permanent error: no verdict, the slot is free
    breaker.before_call()  # taken, and its holder never comes back
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    clock.advance(breaker.open_seconds)
    assert breaker.before_call() < 0, "replaced after open_seconds, as a trial is"


def test_wary_can_be_turned_off_and_does_not_apply_when_forced_closed(clock: FakeClock) -> None:
    plain = CircuitBreaker(name="db", clock=clock, wary=False)
    fail(plain)
    assert not plain.wary and plain.before_call() == 0 and plain.before_call() == 0
    forced = CircuitBreaker(name="db", clock=clock)
    forced.force_closed()
    fail(forced)
    assert forced.before_call() == 0 and forced.before_call() == 0


def test_the_retry_of_a_call_lost_to_a_counted_incident_is_not_held_back(breaker: CircuitBreaker) -> None:
    """An SSL kill drops the pool: the first disconnect counts (wary), the others are its casualties, retried on
    fresh connections at once (src/brownout/_db/incidents.py) even while another thread holds the wary call."""
    fail(breaker)
    breaker.before_call()  # the wary call, in flight
    assert breaker.before_call(casualty=True) == 0
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
