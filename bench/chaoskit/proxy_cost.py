"""`bench/chaos.py --proxy-cost`: the CPU one proxy process spends per megabyte it relays.

Each proxy runs in a child process in front of an echo server; this process (asyncio) drives it and reads
the child's CPU from /proc. Three loads: bulk streams (64 KB writes), small round trips (200 bytes each
way, the size of a Redis GET or a short query), and idle pooled connections (a thread per connection
wakes on its own 50 ms tick). Variants: tests/support's FaultProxy (a thread per connection, the
harness's proxy until then, one process per service), and the relay hub's selector loop copying through
Python or splicing in the kernel."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

from bench.chaoskit.config import ROOT
from bench.chaoskit.cpu import read_stat
from bench.chaoskit.processes import ENTRY_POINT

FAULT_PROXY_CHILD = """
import sys
from tests.support.tcp_proxy import FaultProxy
proxy = FaultProxy(upstream_host="127.0.0.1", upstream_port=int(sys.argv[1])).start()
print(f"ports {proxy.port}", flush=True)
sys.stdin.read()
proxy.stop()
"""

REPEAT = 3
VARIANTS = {
    "threads (FaultProxy)": lambda port: [sys.executable, "-c", FAULT_PROXY_CHILD, str(port)],
    "selector loop, copy": lambda port: [sys.executable, str(ENTRY_POINT), "--proxy-hub", str(port)],
    "selector loop, splice": lambda port: [sys.executable, str(ENTRY_POINT), "--proxy-hub", str(port), "--splice"],
}


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def _bulk(port: int, megabytes: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk, total = b"x" * 65536, megabytes * 1024 * 1024

    async def send() -> None:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    sender = asyncio.create_task(send())
    received = 0
    while received < total:
        received += len(await reader.read(262144))
    await sender
    writer.close()
    return 2 * total  # relayed once each way


async def _round_trips(port: int, count: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    message = b"y" * 200
    for _ in range(count):
        writer.write(message)
        got = 0
        while got < len(message):
            got += len(await reader.read(4096))
    writer.close()
    return 2 * count * len(message)


async def _idle(port: int, seconds: float, connections: int) -> None:
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    await asyncio.sleep(seconds)
    for _, writer in opened:
        writer.close()


def _cpu(pid: int) -> float:
    stat = read_stat(pid)
    return stat[2] if stat else 0.0


async def _measure(argv: list[str], echo_port: int, scale: float) -> dict[str, Any]:
    child = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline().split()[1])
        figures: dict[str, Any] = {}
        for _ in range(REPEAT):  # the lowest of a few: a neighbour's burst only ever adds
            cpu, clock = _cpu(child.pid), time.monotonic()
            relayed = sum(await asyncio.gather(*(_bulk(port, int(32 * scale)) for _ in range(4))))
            bulk = (_cpu(child.pid) - cpu, relayed, time.monotonic() - clock)
            figures["bulk"] = min(figures.get("bulk", bulk), bulk)
            cpu, clock = _cpu(child.pid), time.monotonic()
            trips = int(2000 * scale)
            relayed = sum(await asyncio.gather(*(_round_trips(port, trips) for _ in range(16))))
            small = (_cpu(child.pid) - cpu, relayed, time.monotonic() - clock, 16 * trips)
            figures["small"] = min(figures.get("small", small), small)
        cpu = _cpu(child.pid)
        await _idle(port, 3.0, 32)
        figures["idle"] = (_cpu(child.pid) - cpu) / 3.0
        return figures
    finally:
        assert child.stdin is not None
        child.stdin.close()  # the proxy closes what is left, so every echo handler sees its EOF
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
        await asyncio.sleep(0.2)


async def _run(scale: float, echo: Any) -> list[str]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lines = [
        "| proxy | bulk: CPU ms per MB (MB/s) | small round trips: CPU us each, ms per MB | 32 idle connections: CPU % |",
        "| --- | --- | --- | --- |",
    ]
    for line in lines:
        echo(line)
    for name, argv_of in VARIANTS.items():
        f = await _measure(argv_of(port), port, scale)
        cpu, relayed, wall = f["bulk"]
        bulk = f"{1000 * cpu / (relayed / 1e6):.2f} ({relayed / 1e6 / wall:.0f})"
        cpu, relayed, wall, trips = f["small"]
        small = f"{1e6 * cpu / trips:.1f}, {1000 * cpu / (relayed / 1e6):.0f}"
        lines.append(f"| {name} | {bulk} | {small} | {100 * f['idle']:.1f} |")
        echo(lines[-1])
    server.close()
    return lines


def proxy_cost(scale: float = 1.0, echo: Any = print) -> list[str]:
    """Measure every variant; the Markdown table's lines (each also echoed as it comes)."""
    import os

    echo(
        f"proxy cost (each the lowest of {REPEAT}): 4 x {int(32 * scale)} MB bulk, "
        f"16 x {int(2000 * scale)} round trips of 200 B, 32 idle for 3 s; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    return asyncio.run(_run(scale, echo))
