"""Removing what a benchmark run created on the shared servers: its database, its queues, its Redis keys."""

from __future__ import annotations

from collections.abc import Iterable

import pika
import redis

from bench.chaoskit.urls import admin_connect, rabbit_parameters


def drop_database(base_db: str, dbname: str) -> None:
    conn = admin_connect(base_db, "postgres")
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    conn.close()


def delete_queues(base_rabbit: str, queues: Iterable[str]) -> None:
    """Each queue with Dramatiq's delay and dead-letter queues beside it."""
    from dramatiq.common import dq_name, xq_name

    connection = pika.BlockingConnection(rabbit_parameters(base_rabbit))
    try:
        channel = connection.channel()
        for queue in queues:
            for name in (queue, dq_name(queue), xq_name(queue)):
                channel.queue_delete(name)
    finally:
        connection.close()


def delete_redis_keys(base_redis: str, prefix: str) -> None:
    client = redis.Redis.from_url(base_redis, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()
