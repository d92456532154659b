"""The run's stage: a throwaway database (seeded), queue names and Redis key prefix, and one web process
at a time, Brownout's (the Procfile's web line) or the naive service's; all removed whatever happens."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from bench.chaoskit.cleanup import delete_queues, delete_redis_keys, drop_database
from bench.chaoskit.config import LOCAL_DB, LOCAL_RABBIT, LOCAL_REDIS, ROOT
from bench.chaoskit.dynos import BreakerTracker, Dyno
from bench.chaoskit.helpers import answers, free_port, wait_for
from bench.chaoskit.processes import clean_env, procfile
from bench.chaoskit.urls import admin_connect, loopback_only, pg_url
from bench.overloadkit.mixes import CACHED_ITEMS, SEED_PARAMS, SEED_SQL, seeded_id
from brownout._auth.keys import SCOPES, entry_for, new_key

KEY_NAME = "overload-bench"
# Runs the command after it pinned to one core (affinity is inherited through exec, fork and new threads).
PINNED = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); os.execvp(sys.argv[2], sys.argv[2:])"


class Stage:
    """Everything the run creates; `close()` removes it (call it from a `finally`)."""

    def __init__(self, out_dir: Path, *, settings: dict[str, str] | None = None, web_cpu: int | None = None) -> None:
        """*settings*: environment of Brownout's web process beyond the run's own (experiments); *web_cpu*: the
        core the web process is pinned to (os.sched_setaffinity before its exec), None to let it float."""
        self.settings = settings or {}
        self.web_cpu = web_cpu
        self.web_cpus: list[int] = []  # the cores the last web process started may run on, read back
        tag = uuid.uuid4().hex[:8]
        self.tag, self.out_dir = tag, out_dir
        self.dbname = f"bo_overload_{tag}"
        self.queue, self.email_queue = f"bo-overload-{tag}", f"bo-overload-{tag}-email"
        self.prefix = f"bo-overload-{tag}:"
        self.base_db = os.environ.get("DATABASE_URL") or LOCAL_DB
        self.base_rabbit = os.environ.get("RABBITMQ_URL") or LOCAL_RABBIT
        self.base_redis = os.environ.get("REDIS_URL") or LOCAL_REDIS
        for url, what in ((self.base_db, "DATABASE_URL"), (self.base_rabbit, "RABBITMQ_URL"), (self.base_redis, "REDIS_URL")):
            loopback_only(url, what)
        self.key = new_key()  # every scope: the load, and /metrics (the metrics scope)
        self.auth = {"Authorization": f"Bearer {self.key}"}
        self.tracker = BreakerTracker()
        self.created = False
        self.web: Dyno | None = None

    # -- the database -----------------------------------------------------------

    def create_database(self) -> None:
        conn = admin_connect(self.base_db, "postgres")
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.dbname}"')
        conn.close()
        self.created = True
        env = self._env() | {"DATABASE_URL": self.db_url}
        done = subprocess.run(procfile()["release"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"the release line failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        conn = admin_connect(self.base_db, self.dbname)
        with conn.cursor() as cur:
            cur.execute(SEED_SQL, SEED_PARAMS)
            cur.execute("ANALYZE notifications")
        conn.close()

    @property
    def db_url(self) -> str:
        return pg_url(self.base_db, dbname=self.dbname)

    def sessions(self) -> tuple[int, int]:
        """(sessions ever opened, backends now) of the throwaway database, from PostgreSQL's statistics."""
        conn = admin_connect(self.base_db, "postgres")  # not the throwaway database: this link is not counted
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_stat_clear_snapshot()")
                cur.execute("SELECT sessions, numbackends FROM pg_stat_database WHERE datname = %s", (self.dbname,))
                row = cur.fetchone()
        finally:
            conn.close()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # -- the web process ----------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = clean_env()
        return (
            env
            | {
                "DATABASE_URL": self.db_url,
                "RABBITMQ_URL": self.base_rabbit,
                "REDIS_URL": self.base_redis,
                "UVICORN_ACCESS_LOG": "false",
                "BROWNOUT_QUEUE_NAME": self.queue,
                "BROWNOUT_EMAIL_QUEUE_NAME": self.email_queue,
                "BROWNOUT_REDIS_KEY_PREFIX": self.prefix,
                "BROWNOUT_DB_APPLICATION_NAME": f"bo-overload-{self.tag}",
                "BROWNOUT_API_KEYS": entry_for(KEY_NAME, self.key, SCOPES),
                # One key carries the whole load here, where production spreads it over many callers: no per-caller limit.
                "BROWNOUT_RATE_LIMIT_WRITES": "",
                "BROWNOUT_RATE_LIMIT_READS": "",
                "BROWNOUT_CACHE_FRESH_SECONDS": "3600",  # the cached mix's entries stay fresh for the whole run
            }
            | self.settings
        )

    def start_web(self, service: str) -> str:
        """One web process of *service* (brownout: the Procfile's line, one uvicorn process; naive: naive_app)."""
        self.stop_web()
        port = free_port()
        if service == "brownout":
            argv = [*procfile()["web"], "--host", "127.0.0.1", "--processes", "1"]
        else:
            argv = [sys.executable, "-m", "uvicorn", "--factory", "bench.chaoskit.naive_app:naive_app"]
            argv += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--workers", "1"]
        if self.web_cpu is not None:
            argv = [sys.executable, "-c", PINNED, str(self.web_cpu), *argv]
        web = Dyno(f"web-{service}", argv, self._env() | {"PORT": str(port)}, self.out_dir, self.tracker)
        web.url = f"http://127.0.0.1:{port}"
        self.web = web.start()
        if not wait_for(lambda: answers(f"{web.url}/health") or not web.alive, 60) or not web.alive:
            raise RuntimeError(f"{web.name} did not answer /health:\n{web.tail()}")
        assert web.process is not None
        self.web_cpus = sorted(os.sched_getaffinity(web.process.pid))
        if self.web_cpu is not None and self.web_cpus != [self.web_cpu]:
            raise RuntimeError(f"{web.name} runs on CPUs {self.web_cpus}, not pinned to CPU {self.web_cpu}")
        return web.url

    def stop_web(self) -> None:
        if self.web is not None:
            self.web.stop()
            self.web = None

    def warm_cache(self, url: str) -> None:
        """Read each item of the cached mix once: a miss that stores it in Redis, fresh for the run."""
        with httpx.Client(base_url=url, headers=self.auth, timeout=10) as client:
            for index in range(CACHED_ITEMS):
                response = client.get(f"/notifications/{seeded_id('c', index)}")
                if response.status_code != 200:
                    raise RuntimeError(f"warming the cache: {response.status_code} {response.text[:200]}")

    # -- removal ------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_web()
        if self.created:
            with contextlib.suppress(Exception):
                drop_database(self.base_db, self.dbname)
        with contextlib.suppress(Exception):
            self._delete_queues()
        with contextlib.suppress(Exception):
            self._delete_redis_keys()

    def _delete_queues(self) -> None:
        delete_queues(self.base_rabbit, (self.queue, self.email_queue))

    def _delete_redis_keys(self) -> None:
        delete_redis_keys(self.base_redis, self.prefix)
