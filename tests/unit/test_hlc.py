"""Acceptance stamps: strictly increasing per process, ordered by wall clock across processes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from brownout._dispatch.hlc import HybridClock, compose, datetime_of, wall_us_of


def test_stamps_increase_within_a_microsecond_and_across_a_clock_step_back() -> None:
    now = [1_700_000_000.000001]
    clock = HybridClock(wall=lambda: now[0])
    first, second = clock.now(), clock.now()
    now[0] -= 5.0  # NTP steps the clock back
    third = clock.now()
    assert first < second < third
    assert wall_us_of(third) == wall_us_of(first)  # the logical counter carried on


def test_later_wall_clock_wins_across_processes() -> None:
    a = HybridClock(wall=lambda: 1_700_000_000.000100)
    b = HybridClock(wall=lambda: 1_700_000_000.000101)
    for _ in range(16):  # a busy process counts on within its microsecond; one microsecond later still wins
        earlier = a.now()
    assert b.now() > earlier


def test_observe_never_lets_a_process_stamp_at_or_below_what_it_saw() -> None:
    slow = HybridClock(wall=lambda: 1_700_000_000.0)
    seen = compose(1_800_000_000_000_000, 5)
    slow.observe(seen)
    assert slow.now() > seen


def test_logical_overflow_borrows_the_next_microsecond() -> None:
    clock = HybridClock(wall=lambda: 1_700_000_000.0)
    stamps = [clock.now() for _ in range(17)]
    assert stamps == sorted(set(stamps))
    assert wall_us_of(stamps[-1]) == wall_us_of(stamps[0]) + 1


def test_two_clocks_on_the_same_wall_clock_never_stamp_alike() -> None:
    a = HybridClock(wall=lambda: 1_700_000_000.0, node=1)
    b = HybridClock(wall=lambda: 1_700_000_000.0, node=2)
    from_a = {a.now() for _ in range(1000)}
    from_b = {b.now() for _ in range(1000)}
    assert not from_a & from_b


def test_observing_another_nodes_stamp_puts_the_next_one_above_it() -> None:
    a = HybridClock(wall=lambda: 1_700_000_000.0, node=200)
    b = HybridClock(wall=lambda: 1_700_000_000.0, node=3)
    seen = a.now()
    b.observe(seen)
    assert b.now() > seen


def test_stamps_of_the_earlier_layout_keep_their_order_against_new_ones() -> None:
    """A write queued by the previous release (12-bit counter, no node) a microsecond earlier sorts first."""
    old = compose(1_700_000_000_000_000, 4095)
    assert HybridClock(wall=lambda: 1_700_000_000.000001, node=0).now() > old


def test_stamps_carry_the_acceptance_time() -> None:
    clock = HybridClock(wall=lambda: datetime(2026, 11, 29, 12, 0, 0, 250000, tzinfo=UTC).timestamp())
    assert datetime_of(clock.now()) == datetime(2026, 11, 29, 12, 0, 0, 250000, tzinfo=UTC)
    assert clock.now() < 2**63


def test_many_threads_get_unique_increasing_stamps() -> None:
    clock = HybridClock()
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
