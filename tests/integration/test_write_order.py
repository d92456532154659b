"""Per-entity order across a fleet: two real web processes, the direct and the queued
paths, a breaker that closes while a backlog exists, and a rejected write in between.

The order mechanism keeps no state of its own (stamps travel with the writes,
see src/brownout/_dispatch/hlc.py), so there is no order store to restart: losing Redis
or a process's memory cannot reorder anything.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from app.dispatch.notifications import CREATE, MARK_READ, MARK_UNREAD
from app.schema import notifications, upgrade_database
from brownout._db import Database
from brownout._schema import applied_commands
from brownout._settings import Settings
from tests.conftest import database_url
from tests.support import web_process
from tests.support.rabbit import apply_backlog
from tests.support.tcp_proxy import FaultProxy

RABBIT = "amqp://guest:guest@127.0.0.1:5672/%2F"
NOTE = {"user_id": 7, "email": "grace@example.com", "subject": "Order", "body": "matters"}


class Web:
    """Drive one web process."""

    def __init__(self, context: Any, fields: dict[str, Any]) -> None:
        self.commands: mp.Queue[Any] = context.Queue()
        self.results: mp.Queue[Any] = context.Queue()
        self.process = context.Process(target=web_process.serve, args=(fields, self.commands, self.results), daemon=True)
        self.process.start()

    def call(self, op: str, *args: Any) -> tuple[str, Any]:
        self.commands.put((op, args))
        kind, value = self.results.get(timeout=60)
        assert kind != "error", value
        return kind, value

    def submit(self, name: str, payload: dict[str, Any]) -> tuple[str, Any]:
        return self.call("submit", name, payload, uuid.uuid4().hex)

    def stop(self) -> None:
        self.commands.put(None)
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


def test_two_web_processes_keep_per_entity_order(
    make_database: Callable[..., Database], make_settings: Callable[..., Settings], pg_database: str, queue_name: str
) -> None:
    upgrade_database(database_url(pg_database))
    database = make_database()
    context = mp.get_context("spawn")
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=5672) as rabbit:
        fields = make_settings().model_dump() | {
            "rabbitmq_url": f"amqp://guest:guest@127.0.0.1:{rabbit.port}/%2F",
            "queue_name": queue_name,
            "queue_max_length": 1000,
        }
        a, b = Web(context, fields), Web(context, fields)
        try:
            kind, created = a.submit(CREATE, NOTE)
            assert kind == "Applied"
            target = {"notification_id": created["id"]}
            submitted: list[tuple[str, str, bool]] = []  # (command_id, kind, read value), in acceptance order

            def write(web: Web, name: str) -> str:
                kind, outcome = web.submit(name, target)
                if kind in ("Applied", "Queued"):
                    submitted.append((outcome["command_id"], kind, name == MARK_READ))
                return kind

            # 1. the database is "down" for both processes: everything queues, alternating processes
            a.call("open")
            b.call("open")
            assert [write(web, name) for web, name in ((a, MARK_READ), (b, MARK_UNREAD), (a, MARK_READ))] == ["Queued"] * 3
            # a creation queued now, and a write that needs it
            kind, pending = b.submit(CREATE, NOTE | {"subject": "queued creation"})
            assert kind == "Queued"
            # 2. RabbitMQ goes away too: the write is rejected (503), leaving a gap nobody waits for
            rabbit.refuse()
            rabbit.reset_existing()
            assert write(a, MARK_UNREAD) == "Rejected"
            rabbit.pass_through()
            assert write(b, MARK_UNREAD) == "Queued"
            # 3. the breaker closes while the backlog is still queued: new writes apply directly
            a.call("close")
            b.call("close")
            assert [write(web, name) for web, name in ((b, MARK_READ), (a, MARK_UNREAD), (b, MARK_READ))] == ["Applied"] * 3
            # the creation is still queued: marking it read waits in the queue behind it
            kind, _ = a.submit(MARK_READ, {"notification_id": pending["id"]})
            assert kind == "Queued"
        finally:
            a.stop()
            b.stop()

    outcomes = apply_backlog(queue_name, database)
    assert "pending" not in outcomes, "FIFO drain: the creation comes before the write that needs it"

    with database.session() as s:
        stamps = dict(s.execute(select(applied_commands.c.command_id, applied_commands.c.accepted_stamp)).all())
        ordered = [stamps[uuid.UUID(command_id)] for command_id, _, _ in submitted]
        assert ordered == sorted(ordered), "acceptance stamps must follow acceptance order across processes"
        read = s.execute(select(notifications.c.read).where(notifications.c.id == uuid.UUID(created["id"]))).scalar_one()
        assert read is submitted[-1][2], "the read state must be the one accepted last"
        effective = (
            s.execute(
                select(applied_commands.c.accepted_stamp)
                .where(applied_commands.c.entity_key == f"notification:{created['id']}", applied_commands.c.outcome == "applied")
                .order_by(applied_commands.c.apply_seq)
            )
            .scalars()
            .all()
        )
        assert effective == sorted(effective), "a write took effect after a later-accepted one"
        queued_ids = [uuid.UUID(c) for c, kind, _ in submitted if kind == "Queued"]
        superseded = (
            s.execute(select(applied_commands.c.outcome).where(applied_commands.c.command_id.in_(queued_ids))).scalars().all()
        )
        assert len(superseded) == len(queued_ids) and set(superseded) == {"superseded"}
        second = s.execute(select(notifications.c.read).where(notifications.c.id == uuid.UUID(pending["id"]))).scalar_one()
        assert second is True
