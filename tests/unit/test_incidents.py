"""Disconnect epochs: the connections one incident kills count once on the breaker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from brownout._db import incidents
from brownout._db.incidents import EPOCH_KEY, DisconnectEpochs


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
