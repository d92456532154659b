"""Disconnect epochs: the connections one incident kills count once on the breaker, and are told as one burst."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from brownout._db import incidents
from brownout._db.incidents import EPOCH_KEY, DisconnectBurst, DisconnectEpochs


@pytest.fixture(autouse=True)
def no_verdict_left() -> Iterator[None]:
    incidents.clear()
    yield
    incidents.clear()


def connect(epochs: DisconnectEpochs) -> dict[str, object]:
    info: dict[str, object] = {}
    epochs.on_connect(None, SimpleNamespace(info=info))
    return info


def test_connections_remember_their_epoch() -> None:
    epochs = DisconnectEpochs()
    first = connect(epochs)
    epochs.on_disconnect(connect(epochs))
    assert first[EPOCH_KEY] == 0
    assert connect(epochs)[EPOCH_KEY] == 1


def test_one_incident_counts_once() -> None:
    epochs = DisconnectEpochs()
    busy = [connect(epochs) for _ in range(8)]
    verdicts = [epochs.on_disconnect(info) for info in busy]
    assert verdicts == [False] + [True] * 7
    assert epochs.value == 1


def test_casualty_verdict_is_taken_once() -> None:
    epochs = DisconnectEpochs()
    old, older = connect(epochs), connect(epochs)
    assert epochs.on_disconnect(old) is False
    assert incidents.take_casualty() is False
    assert epochs.on_disconnect(older) is True
    assert incidents.take_casualty() is True
    assert incidents.take_casualty() is False


def test_fresh_connection_after_an_incident_counts_again() -> None:
    epochs = DisconnectEpochs()
    epochs.on_disconnect(connect(epochs))
    fresh = connect(epochs)
    assert epochs.on_disconnect(fresh) is False
    assert epochs.value == 2


def test_failed_connect_always_counts() -> None:
    epochs = DisconnectEpochs()
    assert [epochs.on_disconnect(None) for _ in range(3)] == [False] * 3
    assert epochs.value == 3


def test_clear_forgets_a_verdict() -> None:
    epochs = DisconnectEpochs()
    old = connect(epochs)
    epochs.on_disconnect(connect(epochs))
    epochs.on_disconnect(old)
    incidents.clear()
    assert incidents.take_casualty() is False


def test_verdict_is_per_thread() -> None:
    epochs = DisconnectEpochs()
    old = connect(epochs)
    epochs.on_disconnect(connect(epochs))
    epochs.on_disconnect(old)
    seen: list[bool] = []
    t = threading.Thread(target=lambda: seen.append(incidents.take_casualty()))
    t.start()
    t.join(timeout=10)
    assert seen == [False]
    assert incidents.take_casualty() is True


def test_an_old_link_failing_after_the_window_counts_again() -> None:
    now = [100.0]
    epochs = DisconnectEpochs(window_seconds=2.0, clock=lambda: now[0])
    old = [connect(epochs) for _ in range(3)]
    assert epochs.on_disconnect(old[0]) is False
    now[0] += 1.9
    assert epochs.on_disconnect(old[1]) is True  # same incident
    assert incidents.take_casualty() is True
    now[0] += 0.2  # 2.1 s after the incident: news again (a real outage, met link by link)
    assert epochs.on_disconnect(old[2]) is False
    assert incidents.take_casualty() is False


def test_a_slow_connect_is_excused_only_within_the_window_of_an_incident() -> None:
    now = [100.0]
    epochs = DisconnectEpochs(window_seconds=2.0, clock=lambda: now[0])
    assert epochs.excuse_slow_connect() is False  # no incident yet: a silent database, it counts
    assert incidents.take_casualty() is False
    epochs.on_disconnect(connect(epochs))
    now[0] += 1.9
    assert epochs.excuse_slow_connect() is True  # the incident's reconnect storm
    assert incidents.take_casualty() is True
    now[0] += 0.2
    assert epochs.excuse_slow_connect() is False  # the window is over: slow connects count again
    assert epochs.value == 1  # an excused connect is no new incident


class Timers:
    """A `schedule` that runs nothing by itself: the test fires what is due."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, run: Callable[[], None]) -> None:
        self.pending.append((delay, run))

    def fire(self) -> None:
        due, self.pending = self.pending, []
        for _, run in due:
            run()


def watched(now: list[float]) -> tuple[DisconnectEpochs, list[DisconnectBurst], Timers]:
    bursts: list[DisconnectBurst] = []
    timers = Timers()
    epochs = DisconnectEpochs(window_seconds=2.0, clock=lambda: now[0], on_burst=bursts.append, schedule=timers)
    return epochs, bursts, timers


def test_a_burst_is_told_once_when_its_window_closes_with_every_connection_it_cost() -> None:
    now = [100.0]
    epochs, bursts, timers = watched(now)
    busy = [connect(epochs) for _ in range(8)]
    for info in busy:
        epochs.on_disconnect(info, kind="ssl")
    epochs.excuse_slow_connect()
    assert [delay for delay, _ in timers.pending] == [pytest.approx(2.01)]
    assert bursts == []  # not over yet: a casualty may still come
    now[0] += 2.1
    timers.fire()
    assert len(bursts) == 1
    burst = bursts[0]
    assert (burst.kind, burst.connections, burst.casualties, burst.slow_connects) == ("ssl", 8, 7, 1)
    timers.fire()
    assert len(bursts) == 1


def test_a_timer_that_runs_early_waits_for_the_rest_of_the_window() -> None:
    now = [100.0]
    epochs, bursts, timers = watched(now)
    old = [connect(epochs) for _ in range(3)]
    epochs.on_disconnect(old[0])
    now[0] += 1.5
    timers.fire()  # early on this clock
    assert bursts == [] and [delay for delay, _ in timers.pending] == [pytest.approx(0.51)]
    epochs.on_disconnect(old[1])  # a casualty still in the window
    now[0] += 0.6
    timers.fire()
    assert [(b.kind, b.connections) for b in bursts] == [("disconnect", 2)]


def test_the_next_bump_ends_a_burst_at_once() -> None:
    now = [100.0]
    epochs, bursts, timers = watched(now)
    first = [connect(epochs) for _ in range(2)]
    epochs.on_disconnect(first[0], kind="ssl")
    epochs.on_disconnect(first[1], kind="ssl")
    epochs.on_disconnect(connect(epochs))  # a fresh connection fails: a new incident
    assert [(b.kind, b.connections) for b in bursts] == [("ssl", 2)]
    now[0] += 3
    timers.fire()  # the first burst's timer finds it told; the second's tells it
    assert [(b.kind, b.connections) for b in bursts] == [("ssl", 2), ("disconnect", 1)]


def test_a_burst_begun_by_a_failed_connect_counts_only_the_connections_lost() -> None:
    now = [100.0]
    epochs, bursts, timers = watched(now)
    pooled = connect(epochs)
    epochs.on_disconnect(None, connecting=True)
    epochs.on_disconnect(pooled)  # an old connection failing with it
    now[0] += 3
    timers.fire()
    assert [b.connections for b in bursts] == [1]


def test_no_burst_is_kept_nor_timer_started_while_nobody_listens() -> None:
    timers = Timers()
    bursts: list[DisconnectBurst] = []
    epochs = DisconnectEpochs(on_burst=bursts.append, watch=lambda: False, schedule=timers)
    epochs.on_disconnect(connect(epochs), kind="ssl")
    epochs.on_disconnect(connect(epochs), kind="ssl")
    assert timers.pending == [] and bursts == []
    assert epochs.value == 2  # the epochs count as before


def test_a_report_that_fails_never_reaches_the_failing_call() -> None:
    def broken(burst: DisconnectBurst) -> None:
        raise RuntimeError("no Sentry today")

    def no_threads(delay: float, run: Callable[[], None]) -> None:
        raise RuntimeError("can't start new thread")

    epochs = DisconnectEpochs(on_burst=broken, schedule=no_threads)
    old = connect(epochs)
    assert epochs.on_disconnect(connect(epochs)) is False
    assert epochs.on_disconnect(old) is True
    assert epochs.on_disconnect(connect(epochs)) is False  # ends the first burst: its report raises, unseen
    assert epochs.value == 2
