"""The load generator (a child process: its event loop shares no GIL with the proxies).

Open loop, fixed rate, latency measured from each request's scheduled time; it reports
every half second on stdout and writes its records to a file when done."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import sys
from collections import deque
from pathlib import Path
from typing import Any

from bench.chaoskit.helpers import now, percentile
from bench.chaoskit.http_client import LeanHttp
from bench.chaoskit.processes import first_in_line

KINDS = ("create", "read", "unread", "list", "get")
WRITE_KINDS = {"create", "read", "unread"}


class Workload:
    """What to send next: creations over many users, toggles on a hot set (one in flight each), reads."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.rng = random.Random(cfg["seed"])
        self.run_id = cfg["run_id"]
        self.users = cfg["users"]
        self.hot_cap = cfg["hot"]
        self.recent: deque[str] = deque(maxlen=500)  # acknowledged creations, newest last
        self.hot: list[str] = []
        self.next_value: dict[str, bool] = {}
        self.busy: set[str] = set()
        self.count = 0

    def next_write(self) -> dict[str, Any]:
        self.count += 1
        key = f"{self.run_id}-{self.count}"
        if len(self.hot) >= 10 and self.rng.random() < 0.6:
            for _ in range(8):
                target = self.rng.choice(self.hot)
                if target not in self.busy:
                    self.busy.add(target)
                    value = self.next_value.get(target, True)
                    self.next_value[target] = not value
                    return {"kind": "read" if value else "unread", "key": key, "nid": target, "value": value}
        user = self.rng.randint(1, self.users)
        body = {"user_id": user, "email": f"u{user}@example.com", "subject": f"chaos {key}", "body": "chaos"}
        return {"kind": "create", "key": key, "user": user, "body": body}

    def acknowledged_create(self, ident: str) -> None:
        self.recent.append(ident)
        if len(self.hot) < self.hot_cap:
            self.hot.append(ident)

    def next_read(self) -> tuple[str, str]:
        if self.recent and self.rng.random() < 0.3:
            return "get", f"/notifications/{self.rng.choice(self.recent)}"
        return "list", f"/users/{self.rng.randint(1, self.users)}/notifications?limit=20"


def step_verdict(rows: list[list[Any]], shed: int, stop: dict[str, float]) -> dict[str, Any]:
    """A calibration step passes with p99 (from the scheduled time) under the bound and no generator lag."""
    latencies = [(r[2] - r[0]) * 1000 for r in rows]
    late = sum(1 for r in rows if (r[1] - r[0]) * 1000 > stop["lag_ms"]) + shed
    p99 = percentile(latencies, 0.99) if latencies else float("inf")
    errors = sum(1 for r in rows if r[4] not in (200, 201, 202))
    lagged = late > stop["lag_fraction"] * max(1, len(rows) + shed)
    ok = p99 <= stop["p99_ms"] and not lagged and errors <= stop["error_fraction"] * max(1, len(rows))
    return {"requests": len(rows), "p99_ms": round(p99, 1), "late": late, "errors": errors, "lagged": lagged, "ok": ok}


async def _load(cfg: dict[str, Any]) -> dict[str, Any]:
    work = Workload(cfg)
    clients = [LeanHttp(url, 64, headers=cfg.get("headers")) for url in cfg["urls"]]
    # t0 half a second from now, once this process is up: its start-up (imports, on a busy machine more than a
    # second) is not counted as lag. The harness reads it from the first line.
    t0, timeout = now() + 0.5, cfg["timeout"]
    sys.stdout.write(json.dumps({"t0": t0}) + "\n")
    sys.stdout.flush()
    # [t_sched, t_sent, t_done, kind, status, stale, detail, replica] (times relative to t0; detail: the id read, or the error)
    requests: list[list[Any]] = []
    writes: list[dict[str, Any]] = []
    window: list[list[Any]] = []
    queued_ids: list[str] = []
    inflight = 0
    shed = 0
    steps: list[dict[str, Any]] = []
    turn = 0

    def client() -> tuple[int, LeanHttp]:
        nonlocal turn
        turn += 1
        return turn % len(clients), clients[turn % len(clients)]

    async def send(
        kind: str, scheduled: float, method: str, path: str, *, payload: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any] | None, str]:
        nonlocal inflight
        inflight += 1
        sent = now()
        body: dict[str, Any] | None = None
        marker = detail = ""
        data = json.dumps(payload).encode() if payload is not None else b""
        replica, http = client()
        try:
            async with asyncio.timeout(timeout):  # the whole request, connect included
                status, found, raw = await http.request(method, path, body=data, headers=headers)
            marker = found.get("x-brownout", "")
            if found.get("content-type", "").startswith("application/json"):
                with contextlib.suppress(ValueError):
                    body = json.loads(raw)
        except TimeoutError:
            status, detail = -1, "timeout"
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            status, detail = 0, type(exc).__name__
        finally:
            inflight -= 1
        done = now()
        stale = 1 if marker == "stale" else 0
        if kind == "get":
            detail = path.rsplit("/", 1)[1] + (" " + detail if detail else "")
        row = [round(scheduled - t0, 4), round(sent - t0, 4), round(done - t0, 4), kind, status, stale, detail, replica]
        requests.append(row)
        window.append([kind, status, round((done - scheduled) * 1000, 2), stale])
        return status, body, marker

    async def write(scheduled: float, spec: dict[str, Any]) -> None:
        if spec["kind"] == "create":
            status, body, _ = await send(
                "create", scheduled, "POST", "/notifications", payload=spec["body"], headers={"Idempotency-Key": spec["key"]}
            )
        else:
            path = f"/notifications/{spec['nid']}/{spec['kind']}"
            status, body, _ = await send(spec["kind"], scheduled, "POST", path, headers={"Idempotency-Key": spec["key"]})
            work.busy.discard(spec["nid"])
        record: dict[str, Any] = {key: spec[key] for key in ("kind", "key", "nid", "value", "user") if key in spec}
        record |= {"t": round(scheduled - t0, 4), "td": round(now() - t0, 4), "status": status}
        if body is not None:
            record["id"] = body.get("id")
            if status == 202:
                record["cid"] = body.get("command_id")
                queued_ids.append(str(body.get("command_id")))
        writes.append(record)
        if spec["kind"] == "create" and status in (200, 201, 202) and body and body.get("id"):
            work.acknowledged_create(str(body["id"]))

    async def read(scheduled: float) -> None:
        kind, path = work.next_read()
        await send(kind, scheduled, "GET", path)

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            line = {"t": round(now() - t0, 3), "done": list(window), "queued": list(queued_ids), "inflight": inflight}
            window.clear()
            queued_ids.clear()
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()

    tasks: set[asyncio.Task[None]] = set()

    def launch(coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def play(start: float, seconds: float, w_rate: float, r_rate: float) -> None:
        """Send at the given rates for *seconds* from *start* (bounded: seconds * rate requests of each kind)."""
        nonlocal shed
        sent_w = sent_r = 0
        while now() < start + seconds:
            elapsed = now() - start
            while w_rate and sent_w < elapsed * w_rate:
                scheduled = start + sent_w / w_rate
                sent_w += 1
                if inflight >= cfg["max_inflight"]:
                    shed += 1
                    continue
                launch(write(scheduled, work.next_write()))
            while r_rate and sent_r < elapsed * r_rate:
                scheduled = start + sent_r / r_rate
                sent_r += 1
                if inflight >= cfg["max_inflight"]:
                    shed += 1
                    continue
                launch(read(scheduled))
            await asyncio.sleep(0.002)

    async def ramp(stop: dict[str, float]) -> None:
        """Calibration: an unjudged warm-up at the first rates, then each step judged on all its answers; a
        failed step is played once more (one burst of a neighbour's must not end the ramp), then the ramp ends."""
        await play(t0, stop["warmup_seconds"], *cfg["steps"][0][1:])
        index, retried = 0, False
        while index < len(cfg["steps"]):
            seconds, w_rate, r_rate = cfg["steps"][index]
            first, shed_before = len(requests), shed
            await play(now(), seconds, w_rate, r_rate)
            if tasks:
                await asyncio.wait(set(tasks), timeout=timeout + 1)
            verdict = step_verdict(requests[first:], shed - shed_before, stop) | {"writes": w_rate, "reads": r_rate}
            sys.stdout.write(json.dumps({"step": verdict}) + "\n")
            sys.stdout.flush()
            steps.append(verdict)
            if verdict["ok"]:
                index, retried = index + 1, False
            elif retried:
                return
            else:
                retried = True

    while now() < t0:
        await asyncio.sleep(min(0.05, max(0.0, t0 - now())))
    reporter = asyncio.get_running_loop().create_task(report())
    if cfg.get("stop") is not None:
        await ramp(cfg["stop"])
    else:
        start = t0
        for seconds, w_rate, r_rate in cfg["steps"]:
            await play(start, seconds, w_rate, r_rate)
            start += seconds
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout + 5)
    reporter.cancel()
    line = {"t": round(now() - t0, 3), "done": list(window), "queued": list(queued_ids), "inflight": inflight}
    sys.stdout.write(json.dumps(line) + "\n")
    for c in clients:
        await c.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    return {"requests": requests, "writes": writes, "shed": shed, "cpu_seconds": cpu, "steps": steps}


def load_child(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    first_in_line()  # the measuring instrument first: less noise in its figures
    result = asyncio.run(_load(cfg))
    Path(cfg["records"]).write_text(json.dumps(result))
    sys.stdout.write(json.dumps({"finished": True}) + "\n")
    sys.stdout.flush()
