"""How many writes wait in the queue, for readiness and the operator.

A short-lived connection with deadlines on every step (pika's defaults wait
10 s to connect and 15 s for the handshake), asked at most once per
`cache_seconds` so a readiness probe hammered by a load balancer costs
RabbitMQ one connection per interval, not one per probe. A blocking
connection's calls after the handshake have no deadline of their own, so the
question runs on a short-lived thread that the caller waits for at most
`timeout` (the connection's heartbeat then ends a stuck one).

A cluster's nodes are tried in pika's order, each with `timeout`, starting one
node further round the probe's shuffled ring at each read
(``brownout._dispatch.rabbitmq_nodes``): a refused or reset node costs
milliseconds. Only RabbitMQ's own answer that the queue does not exist (a
passive declare refused) reads as a missing queue; a node that cannot be
reached reads as RabbitMQ unreachable.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions
from dramatiq.common import dq_name

from brownout._dispatch.rabbitmq_nodes import NodeRing
from brownout._redaction import mask_secrets


class QueueDepth:
    def __init__(
        self,
        *,
        url: str | Sequence[str],
        queue_name: str,
        timeout: float,
        cache_seconds: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        def configure(parameters: Any) -> None:
            parameters.socket_timeout = timeout
            parameters.stack_timeout = timeout
            parameters.blocked_connection_timeout = timeout
            parameters.connection_attempts = 1  # of the whole list: each node once
            parameters.heartbeat = max(1, round(timeout))

        self._nodes = NodeRing(url, rng=rng, configure=configure)
        self._queue_name = queue_name
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._where = self._nodes.where
        self._lock = threading.Lock()
        self._last: tuple[float, dict[str, Any]] | None = None

    def read(self) -> dict[str, Any]:
        """{"ok": True, "messages": n, "consumers": c, "delayed": d} or {"ok": False, "error": ...}; never raises."""
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self._cache_seconds:
                return self._last[1]
            result = self._ask_within_deadline()
            self._last = (time.monotonic(), result)
            return result

    def _ask_within_deadline(self) -> dict[str, Any]:
        answer: list[dict[str, Any]] = []
        thread = threading.Thread(target=lambda: answer.append(self._ask()), name="brownout-queue-depth", daemon=True)
        thread.start()
        thread.join(self._timeout * 2)  # connect and question each have `timeout`
        if not answer:
            return {"ok": False, "error": f"RabbitMQ at {self._where} did not answer within {self._timeout * 2:.1f} s"}
        return answer[0]

    def _ask(self) -> dict[str, Any]:
        try:
            connection = pika.BlockingConnection(self._nodes.next_order())
        except (pika.exceptions.AMQPError, OSError) as exc:
            return {"ok": False, "error": mask_secrets(f"{type(exc).__name__} connecting to {self._where}: {exc}")}
        try:
            channel = connection.channel()
            frame = channel.queue_declare(self._queue_name, passive=True)
            answer = {"ok": True, "messages": frame.method.message_count, "consumers": frame.method.consumer_count}
            # The delay queue (deferrals) has the same maximum length: full, it refuses every deferral.
            try:
                delayed = channel.queue_declare(dq_name(self._queue_name), passive=True)
            except pika.exceptions.ChannelClosedByBroker:  # not declared yet: nobody deferred anything
                return answer
            return answer | {"delayed": delayed.method.message_count}
        except pika.exceptions.ChannelClosedByBroker as exc:
            return {"ok": False, "error": f"queue {self._queue_name!r}: {exc.reply_text}"}
        except (pika.exceptions.AMQPError, OSError) as exc:
            return {"ok": False, "error": mask_secrets(f"{type(exc).__name__}: {exc}")}
        finally:
            try:
                connection.close()
            except Exception:  # noqa: S110 - best-effort close once the answer is decided; its failure changes nothing
                pass
