"""The open-loop load generator of one step: `python -m bench.overloadkit.generator CONFIG.json`.

A child process, so its event loop shares no GIL with the parent's probes. Requests leave at fixed
intervals whatever the server does (open loop), and each latency is measured from the request's
scheduled time: a server that falls behind shows it in the latencies instead of slowing the offered
rate. At most `connections` requests are in flight (a client's connection pool); one that finds no free
connection waits for one, and that wait is counted as sending late, in its latency, never dropped. Its
deadline runs from the scheduled time too, the wait for a connection included.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

from bench.chaoskit.helpers import now
from bench.chaoskit.http_client import LeanHttp
from bench.overloadkit.mixes import Mix

# A row per request: kind, status (-1 client timeout, 0 connection error), shed (503 "overloaded"),
# stale, scheduled (s from the start), loop lag and send lag (ms after the scheduled time; send lag -1
# when it never got a connection), latency (ms from the scheduled time to the answer or the give-up).
Row = tuple[str, int, int, int, float, float, float, float]


def is_shed(status: int, body: bytes) -> bool:
    """A refusal by admission control: 503 with the JSON body's detail "overloaded"."""
    if status != 503 or b"overloaded" not in body:
        return False
    with contextlib.suppress(ValueError, AttributeError):
        return bool(json.loads(body).get("detail") == "overloaded")
    return False


async def _run(cfg: dict[str, Any]) -> dict[str, Any]:
    mix = Mix(cfg["mix"], cfg["tag"], cfg["item_start"], cfg["list_start"])
    http = LeanHttp(cfg["url"], cfg["connections"], headers=cfg["headers"])
    slots = asyncio.Semaphore(cfg["connections"])
    rate, timeout = cfg["rate"], cfg["timeout"]
    t0 = now() + 0.2  # from here, not from the parent: this process's imports are behind it
    total = max(1, round(rate * cfg["duration"]))
    rows: list[Row] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int, scheduled: float) -> None:
        kind, method, path, body, headers = mix.request(index)
        loop_lag = (now() - scheduled) * 1000
        sent = -1.0
        status, shed, stale = -1, 0, 0
        try:
            async with asyncio.timeout_at(scheduled + timeout), slots:  # loop.time() is time.monotonic()
                sent = (now() - scheduled) * 1000
                status, found, raw = await http.request(method, path, body=body, headers=headers)
            shed = 1 if is_shed(status, raw) else 0
            stale = 1 if found.get("x-brownout") == "stale" else 0
        except TimeoutError:
            status = -1
        except (OSError, ValueError, asyncio.IncompleteReadError):
            status = 0
        latency = (now() - scheduled) * 1000
        rows.append((kind, status, shed, stale, round(scheduled - t0, 4), round(loop_lag, 2), round(sent, 2), round(latency, 2)))

    while now() < t0:
        await asyncio.sleep(min(0.05, max(0.0, t0 - now())))
    cpu_at_start = _cpu_seconds()
    gc.disable()  # a collection in the middle of a step would show as the generator's own lag
    loop = asyncio.get_running_loop()
    index = 0
    while index < total:
        due = min(total, int((now() - t0) * rate) + 1)
        while index < due:
            task = loop.create_task(one(index, t0 + index / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        await asyncio.sleep(max(0.0, min(0.002, t0 + index / rate - now())))
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout + 5)
    await http.close()
    gc.enable()
    return {
        "rows": rows,
        "items_used": mix.items_used,
        "lists_used": mix.lists_used,
        "cpu_seconds": _cpu_seconds() - cpu_at_start,  # while sending, imports and start-up left out
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def first_in_line() -> None:
    """The instrument first, where allowed (root): it is cheap, and a stall of its own would read as lag.

    With the kernel's autogroups (one per session) a nice value counts only within its session, and the
    web process has a session of its own: this process takes its own (started with start_new_session)
    and raises that group's priority. Measured beside two busy loops: wake-up lag p99 4 ms with nice
    alone, 0.3 ms with this."""
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text("-10")
    with contextlib.suppress(OSError):
        os.nice(-10)


def main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    first_in_line()
    result = asyncio.run(_run(cfg))
    Path(cfg["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
