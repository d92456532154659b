"""RabbitMQ helpers for tests: an admin connection, reading a queue, applying a backlog."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pika
from dramatiq.common import dq_name, xq_name

from app.dispatch.notifications import build_registry
from brownout._db import Database
from brownout._dispatch.apply import apply_envelope
from brownout._dispatch.commands import DependencyPending
from brownout._dispatch.envelope import Envelope
from brownout._dispatch.queues import BrownoutRabbitmqBroker

RABBITMQ_URL = os.environ.get("BROWNOUT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def admin_connection() -> pika.BlockingConnection:
    """A plain connection for the test's own checks, with short deadlines."""
    parameters = pika.URLParameters(RABBITMQ_URL)
    parameters.socket_timeout = parameters.stack_timeout = 5.0
    parameters.blocked_connection_timeout = 5.0
    return pika.BlockingConnection(parameters)


def delete_queue_set(queue_name: str) -> None:
    """Delete a queue with its Dramatiq .DQ and .XQ (missing ones are fine), classic or quorum.

    ``queue.delete`` is the same for both types; no ``if_unused``/``if_empty``, so a
    quorum queue with messages or consumers goes too.
    """
    connection = admin_connection()
    try:
        channel = connection.channel()
        for queue in (queue_name, dq_name(queue_name), xq_name(queue_name)):
            channel.queue_delete(queue)
    finally:
        connection.close()


def take_all(queue_name: str) -> list[tuple[Any, bytes]]:
    """Every message now in the queue, as (properties, body), acknowledged."""
    connection = admin_connection()
    try:
        channel = connection.channel()
        found: list[tuple[Any, bytes]] = []
        while True:
            method, properties, body = channel.basic_get(queue_name, auto_ack=True)
            if method is None:
                return found
            found.append((properties, body))
    finally:
        connection.close()


def apply_backlog(queue_name: str, database: Database, *, max_length: int = 1000) -> list[str]:
    """Apply everything queued, in queue order, as a Dramatiq consumer of the real queue.

    Returns each write's outcome ("applied", "superseded", "duplicate",
    "conflict" or "pending"). The worker proper (health gate, dead letters)
    is worker/; this is only the shared apply step behind a real consumer.
    """
    from brownout._dispatch.apply import KeyConflict

    broker = BrownoutRabbitmqBroker(url=RABBITMQ_URL, max_length=max_length)
    broker.declare_queue(queue_name)
    consumer = broker.consume(queue_name, prefetch=1, timeout=1000)
    registry = build_registry()
    outcomes: list[str] = []
    try:
        for proxy in consumer:
            if proxy is None:
                break
            envelope = Envelope.from_message(proxy)
            with database.session() as s:
                try:
                    written = apply_envelope(s, registry, envelope, path="queued")
                    outcomes.append("duplicate" if written.duplicate else written.outcome)
                except DependencyPending:
                    outcomes.append("pending")
                except KeyConflict:
                    outcomes.append("conflict")
            consumer.ack(proxy)
    finally:
        consumer.close()
        broker.close()
    return outcomes


def ready_count(queue_name: str) -> int:
    """Messages ready in the queue (not delivered), read without consuming anything."""
    connection = admin_connection()
    try:
        return int(connection.channel().queue_declare(queue_name, passive=True).method.message_count)
    finally:
        connection.close()


def queue_types(queue_names: list[str] | tuple[str, ...]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{name: (type, arguments)}`` of the named queues that exist, as RabbitMQ itself reports them.

    A passive declare cannot tell a quorum queue from a classic one, and the management
    plugin is not enabled on the test machine; ``rabbitmqctl list_queues`` (same host as
    RABBITMQ_URL: the local node) can. Skips the test when rabbitmqctl is missing or not allowed.
    """
    import pytest

    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl not installed: cannot read queue types")
    command = [rabbitmqctl, "--quiet", "list_queues", "--formatter", "json", "name", "type", "arguments"]
    try:
        listed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        pytest.skip(f"rabbitmqctl list_queues failed: {exc}")
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for row in json.loads(listed.stdout or "[]"):
        if row["name"] in queue_names:
            # arguments: [[name, AMQP type, value], ...]
            found[row["name"]] = (row["type"], {name: value for name, _kind, value in row["arguments"]})
    return found
