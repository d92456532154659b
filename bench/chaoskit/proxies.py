"""The fault proxies (tests/support's FaultProxy), each in a child process of its own."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

from bench.chaoskit.config import ROOT
from bench.chaoskit.processes import ENTRY_POINT, die_with_parent
from tests.support.tcp_proxy import FaultProxy


class ProxyProcess:
    """A FaultProxy in a child process of its own, driven over its stdin (one command, one "ok").

    In this process, a proxy's relay threads would share the GIL with the harness's
    poller and log readers, and a Redis call has 50 ms: the relaying would be the fault."""

    def __init__(self, name: str, upstream_port: int) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, str(ENTRY_POINT), "--proxy-child", str(upstream_port)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline().split()
        if len(first) != 2 or first[0] != "port":
            self.process.kill()
            raise RuntimeError(f"proxy for {name} did not start")
        self.port = int(first[1])

    def _command(self, op: str) -> None:
        with self._lock:
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write(op + "\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline().strip()
        if reply != "ok":
            raise RuntimeError(f"proxy for {self.name}: {op} failed ({reply or 'no answer'})")

    def refuse(self) -> None:
        self._command("refuse")

    def reset_existing(self) -> None:
        self._command("reset_existing")

    def silence(self) -> None:
        self._command("silence")

    def pass_through(self) -> None:
        self._command("pass_through")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._command("stop")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def proxy_child(upstream_port: int) -> None:
    """`--proxy-child PORT`: serve one FaultProxy; stdin closed (the harness gone) stops it too."""
    with contextlib.suppress(OSError):  # part of the network, not of the service: first in line for the CPU
        os.nice(-5)
    proxy = FaultProxy(upstream_host="127.0.0.1", upstream_port=upstream_port).start()
    print(f"port {proxy.port}", flush=True)
    try:
        for line in sys.stdin:
            op = line.strip()
            if op == "stop":
                break
            if op in ("refuse", "reset_existing", "silence", "pass_through"):
                getattr(proxy, op)()
                print("ok", flush=True)
            else:
                print(f"unknown {op}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            proxy.pass_through()
        proxy.stop()
        print("ok", flush=True)
