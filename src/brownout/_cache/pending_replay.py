"""Queued writes whose pending entry Redis missed, recorded again as soon as Redis answers.

Why: the 202 for a queued write is sent once RabbitMQ holds the write, whether
or not Redis took its pending entry (Redis is only a shortcut). Without this,
a pending entry lost to one missed 50 ms deadline was lost for good: until the
worker applied the write, a read on any process found neither a row nor a
pending entry and answered 404 for a write this service had acknowledged
(seen in the chaos run under CPU starvation). Here the envelope waits in
memory (bounded) and a thread records it again once the link's skip window
is over; meanwhile this process's own reads still see it (`item`).

What is still possible: a read on another process inside that window (about
the Redis skip window, 1 s by default), or after this process died, answers
404 for the write until the worker applies it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from brownout._cache.redis_link import RedisLink, RedisUnavailable
from brownout._dispatch.envelope import Envelope

log = logging.getLogger(__name__)


class PendingReplay:
    def __init__(
        self,
        link: RedisLink,
        record: Callable[[Envelope], None],
        describe: Callable[[Envelope], dict[str, Any] | None],
        *,
        limit: int = 10_000,
        interval_seconds: float = 0.2,
    ) -> None:
        self._link = link
        self._record = record
        self._describe = describe  # the pending item a creation shows (None for marks)
        self._limit = limit
        self._interval = interval_seconds
        self._waiting: OrderedDict[str, Envelope] = OrderedDict()  # command id -> envelope, oldest first
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def add(self, envelope: Envelope) -> None:
        with self._lock:
            self._waiting[str(envelope.command_id)] = envelope
            while len(self._waiting) > self._limit:
                self._waiting.popitem(last=False)
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("pending replay full (%d): the oldest unrecorded pending entries are dropped", self._limit)
        self._wake.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)

    def item(self, entity_id: str) -> dict[str, Any] | None:
        """The pending item of a queued creation this process could not record yet."""
        with self._lock:
            envelopes = list(self._waiting.values())
        for envelope in reversed(envelopes):
            if str(envelope.entity_id) == entity_id and (item := self._describe(envelope)) is not None:
                return item
        return None

    def flush(self) -> int:
        """Record what is waiting, oldest first; stop at the first Redis failure. Returns how many were recorded."""
        done = 0
        while self._link.available:
            with self._lock:
                if not self._waiting:
                    break
                command_id, envelope = next(iter(self._waiting.items()))
            try:
                self._record(envelope)
            except RedisUnavailable:
                break
            with self._lock:
                if self._waiting.get(command_id) is envelope:
                    del self._waiting[command_id]
            done += 1
        if done:
            log.info("recorded %d pending entries that Redis had missed (%d still waiting)", done, len(self))
        return done

    def start(self) -> PendingReplay:
        self._thread = threading.Thread(target=self._run, name="brownout-pending-replay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()  # a last chance for what is left

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            while len(self) and not self._stop.wait(self._interval):
                self.flush()
