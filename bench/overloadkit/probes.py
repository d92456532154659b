"""What the parent reads between steps: the web's /metrics, and whether the web has caught up."""

from __future__ import annotations

import re
import threading
import time

import httpx

SAMPLE = re.compile(r"^(brownout_breaker_transitions_total|brownout_pool_connections)\{([^}]*)\}\s+([0-9.eE+-]+)$", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape(url: str, headers: dict[str, str]) -> dict[str, float] | None:
    """Breaker transitions (`transitions:BREAKER:TO`) and pool gauges (`pool:STATE`); None without /metrics
    (the naive service) or when it does not answer within 5 s."""
    try:
        response = httpx.get(f"{url}/metrics", headers=headers, timeout=5)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    found: dict[str, float] = {}
    for name, labels, value in SAMPLE.findall(response.text):
        parsed = dict(LABEL.findall(labels))
        if name == "brownout_breaker_transitions_total":
            found[f"transitions:{parsed.get('breaker', '?')}:{parsed.get('to', '?')}"] = float(value)
        else:
            found[f"pool:{parsed.get('state', '?')}"] = float(value)
    return found


GAUGE = re.compile(
    r"^(brownout_admission_limit|brownout_admission_in_flight|brownout_event_loop_lag_seconds|"
    r"brownout_admission_latency_seconds)\s+([0-9.eE+-]+)$",
    re.M,
)


class AdmissionSampler:
    """The web's admission limit, work in flight and event-loop lag, read every *every* seconds during a step."""

    def __init__(self, url: str, headers: dict[str, str], every: float = 0.5) -> None:
        self.url, self.headers, self.every = url, headers, every
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AdmissionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=2) as client:
            while not self._stop.wait(self.every):
                try:
                    text = client.get("/metrics").text
                except httpx.HTTPError:
                    continue
                found = {name: float(value) for name, value in GAUGE.findall(text)}
                if found:
                    self.samples.append(found)

    def text(self) -> str:
        """`limit p10/p50/p90, lag p50/p90 ms` over the step, or "" (no admission gauges: naive, or turned off)."""
        limits = sorted(s["brownout_admission_limit"] for s in self.samples if "brownout_admission_limit" in s)
        lags = sorted(s["brownout_event_loop_lag_seconds"] * 1000 for s in self.samples if "brownout_event_loop_lag_seconds" in s)
        if not limits:
            return ""

        def at(values: list[float], q: float) -> float:
            return values[min(len(values) - 1, int(q * len(values)))]

        own = sorted(
            s["brownout_admission_latency_seconds"] * 1000 for s in self.samples if "brownout_admission_latency_seconds" in s
        )
        text = f"limit {at(limits, 0.1):.0f}/{at(limits, 0.5):.0f}/{at(limits, 0.9):.0f}"
        text += f", lag {at(lags, 0.5):.1f}/{at(lags, 0.9):.1f} ms" if lags else ""
        return text + (f", latency {at(own, 0.5):.1f}/{at(own, 0.9):.1f} ms" if own else "")


def transitions_between(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    moved = {}
    for key, value in after.items():
        if key.startswith("transitions:") and value - before.get(key, 0.0) > 0:
            moved[key.removeprefix("transitions:")] = int(value - before.get(key, 0.0))
    return moved


def settle(url: str, headers: dict[str, str], path: str, limit: float = 20.0) -> float:
    """Wait until two reads in a row answer within 100 ms (the server's backlog is gone); seconds waited."""
    started = time.monotonic()
    good = 0
    with httpx.Client(base_url=url, headers=headers, timeout=5) as client:
        while time.monotonic() - started < limit and good < 2:
            begin = time.monotonic()
            try:
                client.get(path)
                good = good + 1 if time.monotonic() - begin < 0.1 else 0
            except httpx.HTTPError:
                good = 0
            time.sleep(0.2)
    return time.monotonic() - started
