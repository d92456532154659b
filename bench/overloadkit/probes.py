"""What the parent reads between steps: the web's /metrics, and whether the web has caught up."""

from __future__ import annotations

import re
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
