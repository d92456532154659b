"""Dynos: the Procfile's lines as processes, their breaker transitions read from their logs."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

from bench.chaoskit.config import ROOT
from bench.chaoskit.helpers import now
from bench.chaoskit.processes import die_with_parent

BREAKER_LINE = re.compile(r"circuit breaker '([^']+)': (\w+) -> (\w+)")
STATE_LEVEL = {"closed": 0, "half_open": 1, "open": 2}


class BreakerTracker:
    """Breaker state per dyno, from the `circuit breaker 'database': a -> b` line each process logs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.states: dict[str, str] = {}
        self.transitions: list[tuple[float, str, str, str]] = []  # (monotonic, dyno, old, new)

    def register(self, dyno: str) -> None:
        with self._lock:
            self.states[dyno] = "closed"
            self.transitions.append((now(), dyno, "start", "closed"))

    def line(self, dyno: str, text: str) -> None:
        match = BREAKER_LINE.search(text)
        if match is None or match.group(1) != "database":
            return
        with self._lock:
            self.states[dyno] = match.group(3)
            self.transitions.append((now(), dyno, match.group(2), match.group(3)))

    def web_states(self) -> dict[str, str]:
        with self._lock:
            return {name: state for name, state in self.states.items() if name.startswith("web")}

    def summary(self) -> str:
        states = self.web_states()
        if not states:
            return "none"
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        return " ".join(f"{state} {n}/{len(states)}" for state, n in sorted(counts.items(), key=lambda kv: -STATE_LEVEL[kv[0]]))


class Dyno:
    """One process in its own process group (so a SIGKILL takes its children too), output kept in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, tracker: BreakerTracker | None) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log_path = log_dir / f"{name}.log"
        self.tracker = tracker
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._reader: threading.Thread | None = None
        self.starts = 0

    def start(self) -> Dyno:
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.starts += 1
        if self.tracker is not None:
            self.tracker.register(self.name)
        self._reader = threading.Thread(target=self._read, args=(self.process,), name=f"log-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} pid {process.pid} at {dt.datetime.now().isoformat()}\n".encode())
            for raw in process.stdout:
                log.write(raw)
                if self.tracker is not None and b"circuit breaker" in raw:
                    self.tracker.line(self.name, raw.decode(errors="replace"))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 30.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # whatever is left in the group (forked children)
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
