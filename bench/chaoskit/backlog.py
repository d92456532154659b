"""The backlog: acknowledged-but-queued writes not yet applied, watched in the database and RabbitMQ."""

from __future__ import annotations

import contextlib
import threading

import pika

from bench.chaoskit.helpers import now
from bench.chaoskit.progress import Live
from bench.chaoskit.urls import admin_connect, rabbit_parameters


class Backlog:
    """Queued (202) writes not yet in applied_commands, asked of the database directly every 0.25 s."""

    def __init__(self, admin_url: str, dbname: str, queue: str, rabbit_url: str, live: Live) -> None:
        self.admin_url, self.dbname, self.queue, self.rabbit_url, self.live = admin_url, dbname, queue, rabbit_url, live
        self.pending: set[str] = set()
        self.samples: list[tuple[float, int]] = []
        self.depth: list[tuple[float, int]] = []
        self.current = 0
        self.peak = 0
        self.queue_messages = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backlog", daemon=True)

    def start(self) -> Backlog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = None
        channel_conn = channel = None
        last_depth = 0.0
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = admin_connect(self.admin_url, self.dbname)
                self.pending.update(self.live.take_queued())
                if self.pending:
                    with conn.cursor() as cur:
                        cur.execute(
                            "SELECT command_id::text FROM applied_commands WHERE command_id = ANY(%s::uuid[])",
                            (list(self.pending),),
                        )
                        self.pending.difference_update(row[0] for row in cur.fetchall())
                self.current = len(self.pending)
                self.peak = max(self.peak, self.current)
                self.samples.append((now(), self.current))
                if now() - last_depth >= 1.0:
                    last_depth = now()
                    if channel_conn is None or channel is None:
                        channel_conn = pika.BlockingConnection(rabbit_parameters(self.rabbit_url))
                        channel = channel_conn.channel()
                    declared = channel.queue_declare(self.queue, passive=True)
                    self.queue_messages = int(declared.method.message_count)
                    self.depth.append((now(), self.queue_messages))
            except Exception:  # the harness's own links go around the proxies; a hiccup is retried next tick
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()
                with contextlib.suppress(Exception):
                    if channel_conn is not None:
                        channel_conn.close()
                conn = channel_conn = channel = None
            self._stop.wait(0.25)
        with contextlib.suppress(Exception):
            if conn is not None:
                conn.close()
        with contextlib.suppress(Exception):
            if channel_conn is not None:
                channel_conn.close()
