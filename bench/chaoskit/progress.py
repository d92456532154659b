"""Live figures (parent side, from the load child's reports) and the progress line."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from bench.chaoskit.helpers import now, percentile
from bench.chaoskit.load import WRITE_KINDS


class Live:
    """What the progress line shows, fed by the load child's half-second reports."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recent: deque[tuple[float, str, int, float, int]] = deque()  # (t, kind, status, latency_ms, stale)
        self.counts = {"applied": 0, "queued": 0, "rejected": 0, "failed_writes": 0, "answered": 0, "stale": 0, "failed_reads": 0}
        self.t = 0.0
        self.finished = False
        self.new_queued: list[str] = []

    def feed(self, line: dict[str, Any]) -> None:
        with self.lock:
            if line.get("finished"):
                self.finished = True
                return
            self.t = float(line["t"])
            for kind, status, latency, stale in line["done"]:
                self.recent.append((self.t, kind, status, latency, stale))
                if kind in WRITE_KINDS:
                    key = (
                        "applied"
                        if status in (200, 201)
                        else "queued"
                        if status == 202
                        else "rejected"
                        if status == 503
                        else "failed_writes"
                    )
                else:
                    key = "answered" if status == 200 else "failed_reads"
                    self.counts["stale"] += stale
                self.counts[key] += 1
            self.new_queued.extend(line["queued"])
            while self.recent and self.recent[0][0] < self.t - 2.0:
                self.recent.popleft()

    def take_queued(self) -> list[str]:
        with self.lock:
            taken, self.new_queued = self.new_queued, []
            return taken

    def rate_and_p99(self) -> tuple[float, float]:
        with self.lock:
            latest = [row for row in self.recent if row[0] > self.t - 1.01]
            rate = float(len(latest))
            p99 = percentile([row[3] for row in self.recent], 0.99) if self.recent else float("nan")
            return rate, p99


class Progress:
    """One line: rich's Live on a terminal, a plain line every 5 s otherwise."""

    def __init__(self, enabled: bool | None, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self._live: Any = None
        self._last = 0.0
        self.enabled = enabled
        self._rich = False
        if enabled is not False:
            try:
                from rich.console import Console

                console = Console()
                self._rich = console.is_terminal if enabled is None else True
                self._console = console
            except ImportError:  # rich is a dev extra: without it, plain lines
                self._rich = False

    def __enter__(self) -> Progress:
        if self._rich:
            from rich.live import Live as RichLive

            self._live = RichLive(console=self._console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def show(self, fields: dict[str, Any]) -> None:
        if self.enabled is False:
            return
        text = (
            f"{fields['mode']:<8} {fields['t']:6.1f}s  breaker {fields['breaker']:<20} "
            f"{fields['rate']:5.0f} req/s  p99 {fields['p99']:7.1f} ms  "
            f"writes {fields['applied']} applied / {fields['queued']} queued / {fields['rejected']} rejected"
            f"{' / ' + str(fields['failed_writes']) + ' failed' if fields['failed_writes'] else ''}  "
            f"backlog {fields['backlog']}  stale reads {fields['stale']}"
            f"{'  failed reads ' + str(fields['failed_reads']) if fields['failed_reads'] else ''}  {fields['fault']}"
        )
        if self._live is not None:
            from rich.text import Text

            breaker = fields["breaker"]
            style = "yellow" if "half" in breaker else "bold red" if "open" in breaker else "green"
            line = Text(text)
            line.highlight_words([breaker], style)
            self._live.update(line)
        elif now() - self._last >= 5.0:
            self._last = now()
            self.echo(text)
