"""The API served for real: uvicorn in a thread of the test process, or in a process of its own.

In-thread servers let a test reach the process's services (its breaker, its
reads) while talking HTTP to it; a subprocess is a separate member of the
fleet, sharing nothing with the test but PostgreSQL, Redis and RabbitMQ.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from app.api.app import create_app
from app.api.services import Services
from brownout._settings import Settings
from brownout.fastapi import Brownout
from tests.support.credentials import AS_SERVICE, OPERATOR_TOKEN
from tests.support.processes import stop

__all__ = ["AS_SERVICE", "OPERATOR_TOKEN", "RunningApi", "free_port", "serve_in_process", "serve_in_thread", "settings_env"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningApi:
    url: str
    app: FastAPI
    client: httpx.Client

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    @property
    def brownout(self) -> Brownout:
        brownout: Brownout = self.app.state.brownout
        return brownout

    def anonymous(self) -> httpx.Client:
        """A client that sends no credential (close it, or use it in a `with`)."""
        return httpx.Client(base_url=self.url, timeout=self.client.timeout)


@contextmanager
def serve_in_thread(
    settings: Settings,
    *,
    client_timeout: float = 10.0,
    wrap: Callable[[FastAPI], Any] | None = None,
    clock: Callable[[], float] | None = None,
) -> Iterator[RunningApi]:
    """*wrap*: an ASGI middleware put around the app (bench/read_path.py times requests with one);
    *clock*: the wall clock of the cache's ages, for a test that ages entries without sleeping."""
    app = create_app(settings) if clock is None else create_app(settings, clock=clock)
    # The socket is bound here and handed to uvicorn: probing a free port and binding it later raced with
    # other tests' ephemeral ports (EADDRINUSE in CI).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    served = app if wrap is None else wrap(app)
    server = uvicorn.Server(uvicorn.Config(served, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    give_up = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > give_up:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=client_timeout, headers=AS_SERVICE) as client:
            yield RunningApi(url=url, app=app, client=client)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def settings_env(settings_fields: dict[str, Any]) -> dict[str, str]:
    """Environment variables that make load_settings() build these settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BROWNOUT_")}
    for name, value in settings_fields.items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if name in ("database_url", "rabbitmq_url", "redis_url", "smtp_url", "email_url"):
            env[name.upper()] = str(value)
        else:
            env[f"BROWNOUT_{name.upper()}"] = str(value)
    return env


@contextmanager
def serve_in_process(settings_fields: dict[str, Any]) -> Iterator[str]:
    """`uvicorn --factory app.api.main:app_from_environment`, as the Procfile runs it."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.api.main:app_from_environment"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=settings_env(settings_fields))
    url = f"http://127.0.0.1:{port}"
    try:
        give_up = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"web process exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > give_up:
                raise RuntimeError("web process did not answer /health")
            time.sleep(0.1)
        yield url
    finally:
        stop(process, grace=20)
