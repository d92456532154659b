"""What a run is: its scenarios and fault timeline, settings, targets and ChaosConfig."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOCAL_DB = "postgresql://brownout:brownout@127.0.0.1:5432/brownout?sslmode=require"
LOCAL_RABBIT = "amqp://guest:guest@127.0.0.1:5672/%2F"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HARNESS_APP_NAME = "bo-chaos-harness"


# The short settings of the run (printed); --default-settings keeps the defaults.
RUN_SETTINGS = {
    "BROWNOUT_BREAKER_OPEN_SECONDS": "5",
    "BROWNOUT_HEALTH_INTERVAL_SECONDS": "1",
    "BROWNOUT_WORKER_GATE_CAP_SECONDS": "4",
}
# Always: a good neighbour on a shared PostgreSQL (max_connections 100 here), no access log to parse.
CALLER = "chaos-run"  # the name of the service key the load calls with: part of every write's idempotency scope

FIXED_SETTINGS = {
    "BROWNOUT_POOL_MAX_OVERFLOW": "5",
    "UVICORN_ACCESS_LOG": "false",
    # One key carries the whole load here, where production spreads it over many callers: no per-caller limit.
    "BROWNOUT_RATE_LIMIT_WRITES": "",
    "BROWNOUT_RATE_LIMIT_READS": "",
}

TARGETS = {
    "open_within": 1.0,  # s, outage start -> breaker open
    "drain_within": 15.0,  # s, fleet breakers closed -> backlog drained
    "reads_answered": 0.999,  # during the 30 s outage
    "p99_ms": 50.0,  # during the 30 s outage
    "other_windows_answered": 0.99,  # reads, and writes, in each other fault's window (a node kill's excepted)
    "node_kill_first_ack": 5.0,  # seconds from a RabbitMQ node's SIGKILL to the first write acknowledged after it
    "writes": 100.0,
    "reads": 200.0,
}


# ---------------------------------------------------------------------------
# Scenarios: faults placed one after another (kind, duration, gap after it)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    # ssl_kills | db_outage | rabbit_outage | rabbit_node_kill | rabbit_alarm | publisher_kill | redis_outage | worker_kill
    kind: str
    start: float  # seconds after the load starts
    duration: float
    every: float = 0.0  # ssl_kills: seconds between two kills

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def label(self) -> str:
        return {
            "ssl_kills": f"SSL kills every {self.every:g} s",
            "db_outage": f"database outage {self.duration:g} s",
            "rabbit_outage": f"RabbitMQ outage {self.duration:g} s",
            "rabbit_node_kill": f"database outage {self.duration:g} s + SIGKILL of the RabbitMQ queue leader's node",
            "rabbit_alarm": f"RabbitMQ memory alarm {self.duration:g} s",
            "publisher_kill": "publisher I/O threads killed",
            "redis_outage": f"Redis down {self.duration:g} s",
            "worker_kill": f"database outage {self.duration:g} s + worker SIGKILL mid-drain",
        }[self.kind]


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    writes: float
    reads: float
    users: int
    hot: int
    warmup: float
    steps: tuple[tuple[str, float, float], ...]  # (kind, duration, gap after)
    tail: float
    kill_every: float
    drain_timeout: float
    node_kill: tuple[str, float, float] = ("rabbit_node_kill", 0, 0)  # with a cluster, in place of rabbit_outage

    def timeline(
        self, *, outage: float | None = None, only: set[str] | None = None, rabbit_nodes: int = 1
    ) -> tuple[list[Fault], float]:
        """With a RabbitMQ cluster (*rabbit_nodes* > 1) the proxy's RabbitMQ outage becomes the node kill."""
        faults, t = [], self.warmup
        steps = [
            self.node_kill if kind == "rabbit_outage" and rabbit_nodes > 1 else (kind, duration, gap)
            for kind, duration, gap in self.steps
        ]
        for kind, duration, gap in steps:
            if only is not None and kind not in only:
                continue
            if kind == "db_outage" and outage is not None:
                duration = outage
            faults.append(Fault(kind, t, duration, self.kill_every if kind == "ssl_kills" else 0.0))
            t += duration + gap
        return faults, t + self.tail


SCENARIOS = {
    "full": Scenario(
        "full",
        writes=100,
        reads=200,
        users=200,
        hot=300,
        warmup=20,
        steps=(
            ("ssl_kills", 15, 10),
            ("db_outage", 30, 20),
            ("rabbit_outage", 15, 10),
            ("rabbit_alarm", 10, 10),
            ("publisher_kill", 0, 10),
            ("redis_outage", 15, 10),
            ("worker_kill", 10, 0),
        ),
        tail=25,
        kill_every=3,
        drain_timeout=90,
        node_kill=("rabbit_node_kill", 25, 20),
    ),
    "short": Scenario(
        "short",
        writes=40,
        reads=80,
        users=60,
        hot=80,
        warmup=8,
        steps=(
            ("ssl_kills", 6, 2),
            ("db_outage", 10, 12),
            ("rabbit_outage", 5, 3),
            ("rabbit_alarm", 5, 3),
            ("publisher_kill", 0, 4),
            ("redis_outage", 5, 8),  # > BROWNOUT_REDIS_SKIP_SECONDS: Redis is skipped for that long after it is back
            ("worker_kill", 6, 0),
        ),
        tail=14,
        kill_every=2,
        drain_timeout=40,
        node_kill=("rabbit_node_kill", 16, 8),
    ),
}


@dataclasses.dataclass
class ChaosConfig:
    scenario: str = "full"
    writes: float | None = None  # per second; None: the scenario's (or the calibration's, with load_fraction)
    reads: float | None = None
    duration: float | None = None  # whole load; None: the scenario's (faults that do not fit are dropped)
    outage: float | None = None  # the main database outage, seconds
    faults: set[str] | None = None  # a subset of the kinds; None: all
    modes: tuple[str, ...] = ("brownout", "naive")
    web: int = 2  # web replicas (one uvicorn process each)
    default_settings: bool = False  # keep the default breaker, health and gate settings
    outage_style: str = "refuse"  # refuse (PostgreSQL down) or silence (a black hole)
    out_dir: Path | None = None
    progress: bool | None = None  # None: a live line on a terminal, a plain line every 5 s otherwise
    seed: int = 1
    database_url: str | None = None
    rabbitmq_url: str | None = None
    redis_url: str | None = None
    commands: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # db/rabbit/redis -> (down, up)
    client_timeout: float = 5.0
    plot: bool = True
    load_fraction: float | None = None  # measure the capacity first, run at this fraction of it (writes/reads unset)
    rabbit_nodes: int = 1  # above 1: a throwaway RabbitMQ cluster of the run's own, quorum queues, the node kill
    echo: Callable[[str], None] = print
