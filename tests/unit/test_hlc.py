"""Acceptance stamps: strictly increasing per process, ordered by wall clock across processes."""

from __future__ import annotations

import threading

import pytest

from app.dispatch.hlc import HybridClock, compose, wall_ms_of


def test_stamps_increase_within_a_millisecond_and_across_a_clock_step_back() -> None:
    now = [1_700_000_000.000]
    clock = HybridClock(wall=lambda: now[0], node=7)
    first, second = clock.now(), clock.now()
    now[0] -= 5.0  # NTP steps the clock back
    third = clock.now()
    assert first < second < third
    assert wall_ms_of(third) == wall_ms_of(first)  # the logical counter carried on
    assert first & 0x3FF == 7


def test_later_wall_clock_wins_across_processes() -> None:
    a = HybridClock(wall=lambda: 1000.000, node=1023)
    b = HybridClock(wall=lambda: 1000.001, node=0)
    assert b.now() > a.now()


def test_observe_never_lets_a_process_stamp_below_what_it_saw() -> None:
    slow = HybridClock(wall=lambda: 1000.0, node=1)
    seen = compose(2_000_000, 5, 9)
    slow.observe(seen)
    assert slow.now() > seen


def test_logical_overflow_borrows_the_next_millisecond() -> None:
    clock = HybridClock(wall=lambda: 1.0, node=0)
    stamps = [clock.now() for _ in range(4097)]
    assert stamps == sorted(set(stamps))
    assert wall_ms_of(stamps[-1]) == 1001


def test_many_threads_get_unique_increasing_stamps() -> None:
    clock = HybridClock(node=3)
    per_thread: list[list[int]] = [[] for _ in range(8)]

    def take(bucket: list[int]) -> None:
        bucket.extend(clock.now() for _ in range(2000))

    threads = [threading.Thread(target=take, args=(bucket,)) for bucket in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [s for bucket in per_thread for s in bucket]
    assert len(set(everything)) == len(everything)
    assert all(bucket == sorted(bucket) for bucket in per_thread)


def test_node_must_fit() -> None:
    with pytest.raises(ValueError):
        HybridClock(node=1024)
