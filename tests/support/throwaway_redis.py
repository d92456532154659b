"""A throwaway redis-server on a free port, for faults the shared Redis must never see (memory full, a replica)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from tests.support.api_server import free_port
from tests.support.polling import wait_until


@contextmanager
def throwaway_redis(*options: str) -> Iterator[int]:
    """Start redis-server with *options* (e.g. "--maxmemory", "1mb"); yield its port; kill it at the end."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is needed for a throwaway Redis (Debian's redis-server package)")
    port = free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *options]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _up(port), timeout=10), "the throwaway redis-server did not start"
        yield port
    finally:
        process.kill()
        process.wait()


def _up(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        time.sleep(0.05)
        return False
