"""A Dramatiq broker and the Workers started on it, for tests that run the worker in-process.

Every such test needs the same: the worker's broker class on the local RabbitMQ with
CurrentMessage (the actors read it), Workers started on some queues, and at the end
every Worker stopped before the broker closes. The `make_worker_rig` fixture
(tests/conftest.py) does the teardown.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import dramatiq
from dramatiq.middleware import CurrentMessage

from brownout._dispatch.queues import BrownoutRabbitmqBroker
from tests.support.rabbit import RABBITMQ_URL


class WorkerRig:
    def __init__(
        self, *, max_length: int = 1000, url: str | Sequence[str] = RABBITMQ_URL, rng: random.Random | None = None
    ) -> None:
        self.broker = BrownoutRabbitmqBroker(url=url, max_length=max_length, rng=rng)
        self.broker.add_middleware(CurrentMessage())
        self.workers: list[dramatiq.Worker] = []

    def start(self, queues: set[str], *, threads: int) -> dramatiq.Worker:
        worker = dramatiq.Worker(self.broker, queues=queues, worker_threads=threads, worker_timeout=100)
        worker.start()
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        """Stop every Worker started here: their channels close, so RabbitMQ takes back what they left unacknowledged."""
        while self.workers:
            self.workers.pop().stop(timeout=10_000)

    def close(self) -> None:
        self.stop_workers()
        self.broker.close()
