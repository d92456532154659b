"""One mode's stage: a throwaway database, the proxies, the dynos; and their removal, whatever happens."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.chaoskit.backlog import Backlog
from bench.chaoskit.cleanup import delete_queues, delete_redis_keys, drop_database
from bench.chaoskit.config import (
    CALLER,
    FIXED_SETTINGS,
    LOCAL_DB,
    LOCAL_RABBIT,
    LOCAL_REDIS,
    ROOT,
    RUN_SETTINGS,
    SCENARIOS,
    ChaosConfig,
    Fault,
)
from bench.chaoskit.dynos import BreakerTracker, Dyno
from bench.chaoskit.helpers import answers, free_port, wait_for
from bench.chaoskit.processes import clean_env, procfile
from bench.chaoskit.progress import Live
from bench.chaoskit.proxies import Proxy, ProxyHub
from bench.chaoskit.results import FaultRecord
from bench.chaoskit.urls import admin_connect, loopback_only, pg_url, port_of, with_port
from brownout._auth.keys import SCOPES, entry_for, new_key
from tests.support.rabbit_cluster import RabbitCluster
from tests.support.throwaway_rabbit import RABBITMQ_SBIN, ThrowawayRabbit

INJECT = ROOT / "bench" / "chaoskit" / "inject"  # sitecustomize.py: the publisher I/O thread's killer


class ModeStage:
    """The state of one mode's run, and its set-up and tear-down (FaultTimeline and ModeRun build on it)."""

    def __init__(self, config: ChaosConfig, mode: str, out_dir: Path, faults: list[Fault], duration: float) -> None:
        scenario = SCENARIOS[config.scenario]
        self.config, self.mode, self.out_dir = config, mode, out_dir
        self.faults, self.duration = faults, duration
        self.writes_rate = config.writes if config.writes is not None else scenario.writes
        self.reads_rate = config.reads if config.reads is not None else scenario.reads
        self.scenario = scenario
        tag = uuid.uuid4().hex[:8]
        self.tag = tag
        self.dbname = f"bo_chaos_{tag}_{mode}"
        self.queue = f"bo-chaos-{tag}"
        self.email_queue = f"bo-chaos-{tag}-email"
        self.prefix = f"bo-chaos-{tag}:"
        self.app_name = f"bo-chaos-{tag}"
        self.base_db = config.database_url or os.environ.get("DATABASE_URL") or LOCAL_DB
        self.base_rabbit = config.rabbitmq_url or os.environ.get("RABBITMQ_URL") or LOCAL_RABBIT
        self.base_redis = config.redis_url or os.environ.get("REDIS_URL") or LOCAL_REDIS
        for url, what in ((self.base_db, "DATABASE_URL"), (self.base_rabbit, "RABBITMQ_URL"), (self.base_redis, "REDIS_URL")):
            loopback_only(url, what)
        self.tracker = BreakerTracker()
        self.live = Live()
        self.webs: list[Dyno] = []
        self.worker: Dyno | None = None
        self.proxies: dict[str, Proxy] = {}
        self.hub: ProxyHub | None = None
        self.records: list[FaultRecord] = []
        self.t0 = 0.0
        self.backlog: Backlog | None = None
        self.current_fault = ""
        self.settings: dict[str, str] = {}
        self.calibrate = False  # measure the stage's capacity first and run at a fraction of it (calibrate.py)
        self.calibration_writes: list[dict[str, Any]] = []
        self.service_key = new_key()
        self.auth = {"Authorization": f"Bearer {self.service_key}"}
        self._stop = threading.Event()
        self._down: set[str] = set()  # operator commands run "down" and not yet "up"
        self.alarm_node: ThrowawayRabbit | None = None  # a RabbitMQ node of the run's own, for the memory alarm
        self.cluster: RabbitCluster | None = None  # --rabbit-nodes 3: the run's own cluster (no proxy in front)
        self._main_calls: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()

    # -- set-up and tear-down ---------------------------------------------------

    def _set_up(self, stack: contextlib.ExitStack) -> None:
        echo = self.config.echo
        conn = admin_connect(self.base_db, "postgres")
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.dbname}"')
        conn.close()
        stack.callback(self._drop_database)
        if self.mode == "brownout" and self.config.rabbit_nodes > 1:
            self._start_cluster(stack)
        elif self.mode == "brownout":
            self._start_alarm_node(stack)
        if self.mode == "brownout":
            stack.callback(self._delete_queues)
            stack.callback(self._delete_redis_keys)
        lines = procfile()
        direct_url = pg_url(self.base_db, dbname=self.dbname)
        env = self._env()
        migrate = subprocess.run(
            lines["release"], env=env | {"DATABASE_URL": direct_url}, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"release line failed:\n{migrate.stdout}\n{migrate.stderr}")
        upstreams = {"db": port_of(self.base_db, 5432)}
        if self.mode == "brownout":
            upstreams |= {"redis": port_of(self.base_redis, 6379)}
        if self.mode == "brownout" and self.cluster is None:
            upstreams |= {"rabbit": port_of(self.base_rabbit, 5672)}
        self.hub = ProxyHub(upstreams)
        stack.callback(self.hub.stop)  # every proxy back to pass-through, then stopped
        self.proxies = dict(self.hub.proxies)
        stack.callback(self._restore_commands)
        db_url = pg_url(self.base_db, dbname=self.dbname, port=self.proxies["db"].port)
        env["DATABASE_URL"] = db_url
        if self.mode == "brownout":
            rabbit = self.proxies.get("rabbit")
            env["RABBITMQ_URL"] = self.base_rabbit if rabbit is None else with_port(self.base_rabbit, rabbit.port)
            env["REDIS_URL"] = with_port(self.base_redis, self.proxies["redis"].port)
        log_dir = self.out_dir / f"logs-{self.mode}"
        log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.config.web):
            port = free_port()
            if self.mode == "brownout":
                argv = lines["web"]
            else:
                argv = [sys.executable, "-m", "uvicorn", "--factory", "bench.chaoskit.naive_app:naive_app", "--host", "127.0.0.1"]
                argv += ["--port", str(port), "--no-access-log"]
            web_env = env | {"PORT": str(port)}
            if self.mode == "brownout" and any(fault.kind == "publisher_kill" for fault in self.faults):
                web_env["PYTHONPATH"] = os.pathsep.join((str(INJECT), env["PYTHONPATH"]))  # SIGUSR2 kills the publisher
            if self.mode == "naive":  # identified by its URL: naive_app knows no Brownout setting
                web_env["DATABASE_URL"] = pg_url(db_url, app_name=self.app_name)
            web = Dyno(f"web{index + 1}", argv, web_env, log_dir, self.tracker)
            web.url = f"http://127.0.0.1:{port}"
            stack.callback(web.stop)
            self.webs.append(web.start())
        if self.mode == "brownout":
            self.worker = Dyno(
                "worker", lines["worker"], env | {"BROWNOUT_METRICS_PORT": str(free_port())}, log_dir, self.tracker
            )
            stack.callback(lambda: self.worker.stop() if self.worker else None)
            self.worker.start()
        for web in self.webs:
            if not wait_for(lambda web=web: answers(f"{web.url}/health") or not web.alive, 60):  # type: ignore[misc]
                raise RuntimeError(f"{web.name} did not answer /health:\n{web.tail()}")
            if not web.alive:
                raise RuntimeError(f"{web.name} exited:\n{web.tail()}")
        if self.worker is not None and not self._worker_ready(60):
            raise RuntimeError(f"the worker did not come up:\n{self.worker.tail()}")
        echo(
            f"[{self.mode}] database {self.dbname}, {len(self.webs)} web replica(s)"
            + (f", worker, queue {self.queue}, Redis prefix {self.prefix}" if self.mode == "brownout" else " (naive_app)")
        )

    def _start_alarm_node(self, stack: contextlib.ExitStack) -> None:
        """A memory alarm must never be raised on the machine's shared RabbitMQ: with one in the timeline, the
        run gets a node of its own (the operator's RABBITMQ_URL is then not used for this mode)."""
        if not any(fault.kind == "rabbit_alarm" for fault in self.faults):
            return
        if not os.path.exists(f"{RABBITMQ_SBIN}/rabbitmq-server"):
            self.config.echo(f"[{self.mode}] no RabbitMQ scripts in {RABBITMQ_SBIN}: the memory alarm will not be played")
            return
        folder = self.out_dir / f"rabbitmq-{self.mode}"
        folder.mkdir(parents=True, exist_ok=True)
        node = ThrowawayRabbit(folder)
        stack.callback(node.stop)
        node.start()
        self.alarm_node, self.base_rabbit = node, node.url
        self.config.echo(f"[{self.mode}] RabbitMQ: a throwaway node on port {node.port} (the memory alarm is raised there)")

    def _start_cluster(self, stack: contextlib.ExitStack) -> None:
        """Three RabbitMQ nodes of the run's own, clustered (tests/support/rabbit_cluster.py); the dynos get every
        node's URL and quorum queues, the node kill SIGKILLs the command queue's leader, the memory alarm is raised
        on the first node (an alarm blocks publishers on every node of a cluster)."""
        folder = self.out_dir / f"rabbitmq-cluster-{self.mode}"
        folder.mkdir(parents=True, exist_ok=True)
        cluster = RabbitCluster(folder, size=self.config.rabbit_nodes)
        stack.callback(cluster.stop)
        started = time.monotonic()
        cluster.start()
        self.cluster, self.alarm_node, self.base_rabbit = cluster, cluster.nodes[0], cluster.url
        ports = ", ".join(str(node.port) for node in cluster.nodes)
        formed = time.monotonic() - started
        self.config.echo(
            f"[{self.mode}] RabbitMQ: a cluster of {len(cluster.nodes)} nodes (ports {ports}), formed in {formed:.1f} s"
        )

    def _env(self) -> dict[str, str]:
        env = clean_env()
        settings = dict(FIXED_SETTINGS)
        if self.mode == "brownout":
            if not self.config.default_settings:
                settings |= RUN_SETTINGS
            settings |= {
                "BROWNOUT_DB_APPLICATION_NAME": self.app_name,
                "BROWNOUT_QUEUE_NAME": self.queue,
                "BROWNOUT_EMAIL_QUEUE_NAME": self.email_queue,
                "BROWNOUT_REDIS_KEY_PREFIX": self.prefix,
                "BROWNOUT_WEB_REPLICAS": str(self.config.web),
                # The load generator, /ready's detail and the fault timeline call as a service would, with a key.
                "BROWNOUT_API_KEYS": entry_for(CALLER, self.service_key, SCOPES),
            }
            if self.cluster is not None:
                settings["BROWNOUT_QUEUE_TYPE"] = "quorum"
        self.settings = settings
        return env | settings

    def _worker_ready(self, timeout: float) -> bool:
        worker = self.worker
        assert worker is not None
        port = worker.env["BROWNOUT_METRICS_PORT"]
        return wait_for(lambda: answers(f"http://127.0.0.1:{port}/health") or not worker.alive, timeout) and worker.alive

    def _restore_commands(self) -> None:
        for service in sorted(self._down):
            self._command(service, up=True)

    def _command(self, service: str, *, up: bool) -> None:
        down_cmd, up_cmd = self.config.commands[service]
        command = up_cmd if up else down_cmd
        result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)  # noqa: S602 - the operator's own down/up commands from the chaos config: shell syntax on purpose
        if up:
            self._down.discard(service)
        else:
            self._down.add(service)
        if result.returncode != 0:
            self.config.echo(
                f"[{self.mode}] {service} {'up' if up else 'down'} command exited {result.returncode}: {result.stderr[-500:]}"
            )

    def _drop_database(self) -> None:
        drop_database(self.base_db, self.dbname)

    def _delete_queues(self) -> None:
        delete_queues(self.base_rabbit, (self.queue, self.email_queue))

    def _delete_redis_keys(self) -> None:
        delete_redis_keys(self.base_redis, self.prefix)
