"""A real three-node RabbitMQ cluster: the command queue (quorum) survives the loss of its leader's node.

The cluster (tests/support/rabbit_cluster.py) is started once for the module, its nodes are SIGKILLed and
brought back by the tests, and each test starts with every node running. The shared broker on 5672 is not used.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.schema import notifications
from brownout._db import Database
from brownout._dispatch.publisher import Publisher, PublishRejected
from brownout._schema import applied_commands
from brownout._settings import Settings
from tests.faults.test_worker_signals import REPOSITORY, kill_group
from tests.integration.test_publisher import message
from tests.support.api_server import AS_SERVICE, serve_in_thread, settings_env
from tests.support.polling import wait_until
from tests.support.rabbit_cluster import RabbitCluster
from tests.support.rabbit_nodes import InOrder
from tests.support.throwaway_rabbit import ThrowawayRabbit, require_rabbitmq_scripts

COMMANDS = "app.dispatch.notifications:build_registry"

PUBLISH_DEADLINE = 2.0
FIRST_CONFIRM_BOUND = 10.0  # seconds from a leader's kill to a confirmed publish on a survivor (target: under 5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    require_rabbitmq_scripts()
    started = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        started.start()
        yield started
    finally:
        started.stop()


@pytest.fixture
def running(cluster: RabbitCluster) -> RabbitCluster:
    """The cluster with every node up (a test before may have left one down)."""
    down = [node for node in cluster.nodes if not node.running]
    for node in down:
        node.launch()
    for node in down:
        node.wait_ready()
    if len(cluster.running_names()) != len(cluster.nodes):
        raise RuntimeError(f"nodes missing from the cluster: {cluster.running_names()}")
    return cluster


@pytest.fixture
def cluster_queue() -> str:
    return f"bo-cluster-{uuid.uuid4().hex[:10]}"


def publish_until_confirmed(publisher: Publisher, queue: str, number: int, give_up_at: float) -> list[str]:
    """Publish *number* until confirmed; return the rejection reasons seen before."""
    reasons: list[str] = []
    while time.monotonic() < give_up_at:
        try:
            publisher.publish(message(queue, number, actor_name="apply_command"), timeout=PUBLISH_DEADLINE)
            return reasons
        except PublishRejected as rejected:
            reasons.append(rejected.reason)
            time.sleep(0.1)
    raise AssertionError(f"no confirmed publish by the deadline; rejections: {reasons[-5:]} of {len(reasons)}")


def test_a_publisher_whose_node_led_the_queue_publishes_on_a_survivor_soon_after_the_kill(
    running: RabbitCluster, cluster_queue: str
) -> None:
    """Its node dies with the queue's leader; it reconnects to a survivor during the election. RabbitMQ nacks
    publishes on a channel opened then for as long as that channel lives: the publisher must reopen it."""
    urls = [node.url for node in running.nodes]
    with Publisher(
        url=urls, queue_name=cluster_queue, max_length=10000, queue_type="quorum", confirm_timeout=PUBLISH_DEADLINE, rng=InOrder()
    ) as publisher:
        publisher.publish(message(cluster_queue, 0, actor_name="apply_command"))
        leader = running.leader(cluster_queue)
        assert leader is running.nodes[0], "declared through the first node, which leads it"

        leader.kill()
        killed_at = time.monotonic()
        reasons = publish_until_confirmed(publisher, cluster_queue, 1, killed_at + 30)
        first_confirm = time.monotonic() - killed_at
        print(f"first confirm {first_confirm:.1f}s after the leader kill ({len(reasons)} rejected first: {set(reasons)})")

        for number in range(2, 12):  # and it stays confirmed
            publisher.publish(message(cluster_queue, number, actor_name="apply_command"), timeout=PUBLISH_DEADLINE)

    assert first_confirm < FIRST_CONFIRM_BOUND
    assert running.leader(cluster_queue) is not leader


# The API under a steady stream of queued writes while nodes die -------------------------------------------

CLIENT_PAUSE = 0.05  # between one writer's requests; a 503 is retried after it too (Retry-After is checked, not obeyed)
ANSWER_BOUND = PUBLISH_DEADLINE + 3.0  # the publish deadline, plus room on two busy cores
MARKS = ("read", "unread", "read")


@dataclass
class Answer:
    kind: str
    key: str
    started: float
    ended: float
    status: int
    retry_after: str | None
    command_id: str | None


@dataclass
class Writer:
    """One client: creates a notification, then marks it read, unread, read; a 503 is sent again with the same
    Idempotency-Key (what a client does), so each notification's writes are acknowledged one after the other."""

    url: str
    name: str
    stop: threading.Event
    answers: list[Answer] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)  # notification id -> its last acknowledged mark
    subjects: list[str] = field(default_factory=list)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self.write_until_stopped()
        except BaseException as exc:  # the test reads it: a writer that stopped early would hide the answers
            self.error = exc

    def write_until_stopped(self) -> None:
        with httpx.Client(base_url=self.url, headers=AS_SERVICE, timeout=30) as client:
            for number in itertools.count():
                if self.stop.is_set():
                    return
                subject = f"{self.name}-{number}"
                created = self.send(client, "create", f"{subject}-c", "/notifications", {**NOTE, "subject": subject})
                self.subjects.append(subject)
                for step, mark in enumerate(MARKS):
                    self.send(client, mark, f"{subject}-{step}", f"/notifications/{created['id']}/{mark}", None)
                self.finished[created["id"]] = MARKS[-1]

    def send(self, client: httpx.Client, kind: str, key: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        while True:
            started = time.monotonic()
            response = client.post(path, json=body, headers={"Idempotency-Key": key})
            answer = Answer(kind, key, started, time.monotonic(), response.status_code, response.headers.get("retry-after"), None)
            if response.status_code == 202:
                answer.command_id = response.json()["command_id"]
            self.answers.append(answer)
            time.sleep(CLIENT_PAUSE)
            if response.status_code == 202:
                result: dict[str, Any] = response.json()
                return result
            if response.status_code != 503:
                raise AssertionError(f"{kind} answered {response.status_code}: {response.text}")


NOTE = {"user_id": 7, "email": "ada@example.com", "subject": "", "body": "cluster"}


def first_ack_after(answers: list[Answer], moment: float) -> float:
    """Seconds from *moment* to the answer of the first write sent after it and acknowledged."""
    acked = [answer.ended for answer in answers if answer.status == 202 and answer.started > moment]
    assert acked, "no write acknowledged after that moment"
    return min(acked) - moment


def applied_ids(db: Database, command_ids: set[str]) -> set[str]:
    with db.session() as session:
        rows = session.execute(select(applied_commands.c.command_id))
        return {str(row.command_id) for row in rows} & command_ids


def rejoin(cluster: RabbitCluster, *nodes: ThrowawayRabbit) -> float:
    """Start *nodes* again on their data; the moment of their launch."""
    launched = time.monotonic()
    for node in nodes:
        node.launch()
    for node in nodes:
        node.wait_ready()
    assert wait_until(lambda: {node.node for node in nodes} <= set(cluster.running_names()), timeout=60, interval=0.5)
    return launched


@pytest.fixture
def cluster_worker(running: RabbitCluster, tmp_path: Path) -> Iterator[Callable[[dict[str, str]], None]]:
    """The production worker (the Procfile's line) on the cluster, killed at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(env: dict[str, str]) -> None:
        with (tmp_path / "worker.log").open("wb") as log:
            command = [".venv/bin/dramatiq", "brownout._worker.main", "--processes", "1", "--threads", "4"]
            command += ["--queues", env["BROWNOUT_QUEUE_NAME"]]
            started.append(
                subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    try:
        yield spawn
    finally:
        for process in started:
            kill_group(process)
        if (tmp_path / "worker.log").exists():
            print(f"--- worker log (tail)\n{(tmp_path / 'worker.log').read_text(errors='replace')[-3000:]}")


@pytest.mark.timeout(300)
def test_queued_writes_survive_leader_kills_and_wait_out_a_lost_majority(
    running: RabbitCluster,
    api_settings: Callable[..., Settings],
    make_database: Callable[..., Database],
    cluster_worker: Callable[[dict[str, str]], None],
    app_name: str,
) -> None:
    cluster = running
    fields = {"rabbitmq_url": cluster.url, "queue_type": "quorum", "publish_timeout_seconds": PUBLISH_DEADLINE}
    fields["rate_limit_writes"] = ""  # one key carries the whole stream
    settings = api_settings(**fields)
    queue = settings.queue_name
    worker_fields = settings.model_dump() | {"db_application_name": f"{app_name}-worker", "commands": COMMANDS}
    db = make_database()
    stop = threading.Event()
    writers = [Writer("", f"w{index}-{uuid.uuid4().hex[:6]}", stop) for index in range(2)]
    threads: list[threading.Thread] = []
    figures: dict[str, float] = {}
    with serve_in_thread(settings) as api:
        api.brownout.database.breaker.force_open()  # every write is queued
        cluster_worker(settings_env(worker_fields))
        for writer in writers:
            writer.url = api.url
            threads.append(threading.Thread(target=writer.run, name=writer.name, daemon=True))
            threads[-1].start()

        def answers() -> list[Answer]:
            errors = [writer.error for writer in writers if writer.error is not None]
            if errors:
                raise AssertionError(f"a writer stopped: {errors[0]!r}")
            return [answer for writer in writers for answer in list(writer.answers)]

        def acked_ids(since: float = 0.0) -> set[str]:
            return {answer.command_id for answer in answers() if answer.command_id and answer.started > since}

        try:
            assert wait_until(lambda: len(applied_ids(db, acked_ids())) >= 20, timeout=30, interval=0.2), "queued and applied"

            # The node leading the command queue, then another leader, each killed and brought back.
            killed: list[ThrowawayRabbit] = []
            for round_ in (1, 2):
                leader = cluster.leader(queue)
                victim = leader if leader not in killed else next(n for n in cluster.nodes if n not in killed)
                victim.kill()
                killed_at = time.monotonic()
                killed.append(victim)
                # Until the worker has applied a write sent after the kill: the publishers and the consumer are
                # on the surviving majority (a bound, not a pause: the kill's figure is asserted below).
                assert wait_until(
                    lambda since=killed_at: applied_ids(db, acked_ids(since)),
                    timeout=30,
                    interval=0.2,
                ), "the worker applies from the surviving majority"
                figures[f"kill {round_}: first acknowledged write (s)"] = first_ack_after(answers(), killed_at)
                rejoin(cluster, victim)
            assert killed[0] is not killed[1]

            # Two of three down: no majority. Nothing sent meanwhile is acknowledged; the service comes back alone.
            leader = cluster.leader(queue)
            down = [leader, next(node for node in cluster.nodes if node is not leader)]
            for node in down:
                node.kill()
            lost_at = time.monotonic()
            # Until four writes sent after the loss were answered (each waits out the publish deadline).
            assert wait_until(lambda: sum(a.started > lost_at for a in answers()) >= 4, timeout=30, interval=0.2)
            during = [answer for answer in answers() if answer.started > lost_at]
            assert during and all(answer.status == 503 for answer in during), "no acknowledgement without a majority"
            figures["no majority: writes answered 503"] = len(during)
            back_at = rejoin(cluster, down[0])
            assert wait_until(lambda: any(a.status == 202 and a.started > back_at for a in answers()), timeout=60)
            figures["no majority: first acknowledged write after a node's launch (s)"] = first_ack_after(answers(), back_at)
            rejoin(cluster, down[1])
            time.sleep(3)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert not any(thread.is_alive() for thread in threads)

    everything = answers()
    acknowledged = acked_ids()
    assert {answer.status for answer in everything} <= {202, 503}
    assert all(answer.retry_after and float(answer.retry_after) > 0 for answer in everything if answer.status == 503)
    slowest = max(answer.ended - answer.started for answer in everything)
    assert slowest < ANSWER_BOUND, f"a write waited {slowest:.1f}s"
    assert wait_until(lambda: applied_ids(db, acknowledged) == acknowledged, timeout=60, interval=0.5), (
        f"{len(acknowledged - applied_ids(db, acknowledged))} acknowledged writes not applied"
    )
    subjects = [subject for writer in writers for subject in writer.subjects]
    finished = {nid: mark for writer in writers for nid, mark in writer.finished.items()}
    with db.session() as session:
        rows = session.execute(select(notifications.c.id, notifications.c.subject, notifications.c.read)).all()
        recorded = [str(row.command_id) for row in session.execute(select(applied_commands.c.command_id))]
    assert sorted(row.subject for row in rows) == sorted(subjects), "each acknowledged creation once, nothing else"
    assert set(recorded) == acknowledged, "every acknowledged write applied, and nothing else"
    read = {str(row.id): row.read for row in rows}
    assert all(read[nid] is (mark == "read") for nid, mark in finished.items()), "the last mark wins, per notification"
    figures["writes acknowledged"] = len(acknowledged)
    figures["writes answered 503"] = sum(answer.status == 503 for answer in everything)
    figures["slowest answer (s)"] = slowest
    print(
        "\n".join(f"{name}: {value:.1f}" if isinstance(value, float) else f"{name}: {value}" for name, value in figures.items())
    )
    for name, value in figures.items():
        if name.startswith("kill"):
            assert value < FIRST_CONFIRM_BOUND, f"{name}: {value:.1f}"
