"""The call's deadline as a context variable: set, nested, restored."""

from __future__ import annotations

import threading

from brownout._db.deadline import current_deadline, deadline_scope, remaining
from tests.support.fakes import FakeClock


def test_no_deadline_by_default() -> None:
    assert current_deadline() is None
    assert remaining() is None


def test_scope_sets_and_restores() -> None:
    with deadline_scope(100.0):
        assert current_deadline() == 100.0
    assert current_deadline() is None


def test_restored_after_an_exception() -> None:
    try:
        with deadline_scope(100.0):
            raise RuntimeError
    except RuntimeError:
        pass
    assert current_deadline() is None


def test_earlier_enclosing_deadline_wins() -> None:
    with deadline_scope(100.0):
        with deadline_scope(200.0):
            assert current_deadline() == 100.0
        with deadline_scope(50.0):
            assert current_deadline() == 50.0
        with deadline_scope(None):
            assert current_deadline() == 100.0
        assert current_deadline() == 100.0


def test_remaining_uses_the_given_clock() -> None:
    clock = FakeClock(start=10.0)
    with deadline_scope(10.3):
        assert remaining(clock) == 10.3 - 10.0
        clock.advance(0.5)
        left = remaining(clock)
        assert left is not None and left < 0


def test_deadline_is_per_thread() -> None:
    seen: list[float | None] = []
    with deadline_scope(100.0):
        t = threading.Thread(target=lambda: seen.append(current_deadline()))
        t.start()
        t.join(timeout=10)
    assert seen == [None]
