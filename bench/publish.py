"""What a confirmed publish costs: `python bench/publish.py`.

Prints the latency of `Publisher.publish` (hand-over to the I/O thread, publish,
RabbitMQ's confirm) as p50 / p99 / max in milliseconds, and the throughput:
- sequential: one caller, one message in flight at a time;
- concurrent: several threads at once (FastAPI's threadpool), confirms pipelined
  on the one channel.

Against RABBITMQ_URL (default: the local set-up's guest account), on a throwaway
queue (bo-bench-<hex>, with its .DQ and .XQ) that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
from typing import Any

import dramatiq
import pika
from dramatiq.common import dq_name, xq_name

from brownout._dispatch.publisher import Publisher

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def publish_timed(publisher: Publisher, queue_name: str, count: int, samples: list[float]) -> None:
    for i in range(count):
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue_name, actor_name="bench", args=(i,), kwargs={}, options={}
        )
        started = time.perf_counter()
        publisher.publish(message)
        samples.append(time.perf_counter() - started)


def report(label: str, samples: list[float], wall: float) -> None:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(
        f"{label:<24} n={len(samples):<6} p50={statistics.median(ordered) * 1e3:7.3f} ms  "
        f"p99={p99 * 1e3:7.3f} ms  max={ordered[-1] * 1e3:7.3f} ms  {len(samples) / wall:8.0f} msg/s"
    )


def delete_queues(url: str, queue_name: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for name in (queue_name, dq_name(queue_name), xq_name(queue_name)):
            channel.queue_delete(name)
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="sequential publishes")
    parser.add_argument("--threads", type=int, default=8, help="concurrent callers")
    parser.add_argument("--per-thread", type=int, default=250, help="publishes per concurrent caller")
    args = parser.parse_args()

    url = os.environ.get("RABBITMQ_URL", LOCAL_URL)
    queue_name = f"bo-bench-{uuid.uuid4().hex[:10]}"
    total = args.messages + args.threads * args.per_thread + 10
    try:
        with Publisher(url=url, queue_name=queue_name, max_length=total) as publisher:
            publish_timed(publisher, queue_name, 10, [])  # connect and warm up

            sequential: list[float] = []
            started = time.perf_counter()
            publish_timed(publisher, queue_name, args.messages, sequential)
            report("sequential", sequential, time.perf_counter() - started)

            concurrent: list[float] = []
            threads = [
                threading.Thread(target=publish_timed, args=(publisher, queue_name, args.per_thread, concurrent))
                for _ in range(args.threads)
            ]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            report(f"{args.threads} threads", concurrent, time.perf_counter() - started)
    finally:
        delete_queues(url, queue_name)


if __name__ == "__main__":
    main()
