"""The run's fault proxies: one child process relays for all of them (bench/chaoskit/relay.py)."""

from __future__ import annotations

import subprocess
import sys
import threading

from bench.chaoskit.config import ROOT
from bench.chaoskit.processes import ENTRY_POINT, die_with_parent


class ProxyHub:
    """The relay child, driven over its stdin (one command, one answer).

    Out of the harness's process: relaying there would share the GIL with its poller and
    log readers, and a Redis call has 50 ms."""

    def __init__(self, upstreams: dict[str, int], *, splice: bool = False) -> None:
        self.names = list(upstreams)
        self._lock = threading.Lock()
        argv = [sys.executable, str(ENTRY_POINT), "--proxy-hub", ",".join(str(p) for p in upstreams.values())]
        self.process = subprocess.Popen(
            argv + (["--splice"] if splice else []),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline().split()
        if len(first) != len(upstreams) + 1 or first[0] != "ports":
            self.process.kill()
            raise RuntimeError("the proxy hub did not start")
        self.proxies = {
            name: Proxy(self, index, name, int(port))
            for index, (name, port) in enumerate(zip(self.names, first[1:], strict=True))
        }

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self, line: str) -> str:
        with self._lock:
            if self.process.poll() is not None:
                return "exited"
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            return self.process.stdout.readline().strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            for proxy in self.proxies.values():
                self.command(f"pass_through {proxy.index}")
            self.command("stop")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class Proxy:
    """One service's proxy in the hub: the faults the timeline plays."""

    def __init__(self, hub: ProxyHub, index: int, name: str, port: int) -> None:
        self.hub, self.index, self.name, self.port = hub, index, name, port

    def _command(self, op: str) -> str:
        reply = self.hub.command(f"{op} {self.index}")
        if op != "count" and reply != "ok":
            raise RuntimeError(f"proxy for {self.name}: {op} failed ({reply or 'no answer'})")
        return reply

    def refuse(self) -> None:
        self._command("refuse")

    def reset(self) -> None:
        self._command("reset")

    def reset_existing(self) -> None:
        self._command("reset_existing")

    def silence(self) -> None:
        self._command("silence")

    def pass_through(self) -> None:
        self._command("pass_through")

    def counts(self) -> tuple[int, int]:
        """(connections accepted since start, open now)."""
        accepted, open_now = self._command("count").split()
        return int(accepted), int(open_now)
