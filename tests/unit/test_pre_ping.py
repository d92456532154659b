"""Which checkouts are pinged: the decision only (the pings themselves are tested on PostgreSQL)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from brownout._db.incidents import DisconnectEpochs
from brownout._db.pre_ping import CheckoutPinger
from tests.support.fakes import FakeClock


class CountingConnection:
    """Stands in for a DBAPI connection: counts pings, runs nothing."""

    def __init__(self) -> None:
        self.pings = 0

    def cursor(self) -> Any:
        self.pings += 1
        return SimpleNamespace(execute=lambda sql: None, close=lambda: None)


def test_fresh_and_recently_returned_connections_are_not_pinged() -> None:
    clock = FakeClock()
    pinger = CheckoutPinger(behind_pooler=False, epochs=DisconnectEpochs(), idle_seconds=1.0, clock=clock)
    conn, record = CountingConnection(), SimpleNamespace(info={})
    pinger.on_connect(conn, record)
    pinger.on_checkout(conn, record, None)
    assert conn.pings == 0  # brand new
    pinger.on_checkin(conn, record)
    clock.advance(0.5)
    pinger.on_checkout(conn, record, None)
    assert conn.pings == 0  # answered half a second ago
    pinger.on_checkin(conn, record)
    clock.advance(1.0)
    pinger.on_checkout(conn, record, None)
    assert conn.pings == 1  # idle for a second: prove it is alive


def test_zero_idle_seconds_pings_every_reused_connection() -> None:
    clock = FakeClock()
    pinger = CheckoutPinger(behind_pooler=True, epochs=DisconnectEpochs(), idle_seconds=0.0, clock=clock)
    conn, record = CountingConnection(), SimpleNamespace(info={})
    pinger.on_connect(conn, record)
    pinger.on_checkout(conn, record, None)
    for _ in range(3):
        pinger.on_checkin(conn, record)
        pinger.on_checkout(conn, record, None)
    assert conn.pings == 3
