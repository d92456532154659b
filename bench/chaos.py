"""Chaos run: the Procfile's dynos under steady load while real services fail, audited from the database.

    .venv/bin/python bench/chaos.py                       # full scenario (about 8 minutes, both modes)
    .venv/bin/python bench/chaos.py --scenario short      # under two minutes per mode
    .venv/bin/python bench/chaos.py --writes 100 --reads 200 --outage 30 --modes brownout,naive
    .venv/bin/python bench/chaos.py --proxy-cost          # the proxies' CPU per MB relayed
    .venv/bin/python bench/chaos.py --rabbit-nodes 3      # on a three-node RabbitMQ cluster, its queue leader killed

What one run does, for each mode (`brownout`, then `naive`):

1. makes a throwaway database on the configured PostgreSQL (DATABASE_URL, else the
   local set-up), runs the Procfile's `release` line on it, and starts the `web` line
   (`--web` replicas, one uvicorn process each, on their own ports) and the `worker`
   line, every service URL going through a fault proxy (one selector loop for all of them,
   in a child process of its own so its relaying shares no GIL: TLS stays end to end); its own
   queues and Redis key prefix;
   then, unless the rates are given (--writes/--reads), measures the stage's capacity with a
   stepped ramp of the run's own mix and sets the rates to --load-fraction of it;
2. runs a steady open-loop load from a child process (asyncio + httpx, fixed rate,
   latency measured from each request's scheduled time): creations and read/unread
   toggles with Idempotency-Keys over many users and a hot set of notifications (one
   toggle in flight per notification: the client's order is causal), and reads of
   recent items (a user's first page, a recent notification by id), round robin
   over the web replicas;
3. plays the fault timeline on the real services: SSL kills (pg_terminate_backend of
   the service's backends, by application_name, over sslmode=require), a full
   database outage (the proxy refuses new connections and resets open ones), a
   RabbitMQ outage while the database is healthy, Redis down and back, and a shorter
   database outage whose drain is cut by SIGKILL to the worker's process group (the
   worker is then started again from the Procfile). `--*-down/--*-up` replace a
   proxy fault with the operator's own commands (a throwaway instance, or the local
   services when the operator asks for it);
4. waits for the backlog to drain, then audits from the database itself: acknowledged
   writes (201/200/202) against `applied_commands` and `notifications`; lost,
   duplicated and out-of-order (per notification) writes; reads answered, stale,
   failed; breaker open and close times (from the dynos' own transition log lines),
   drain time, peak backlog; and what the run cost the machine (CPU per process, new
   PostgreSQL sessions, the web's database errors and breaker transitions, load average,
   and whether the generator kept to its schedule: if not, the summary says so first);
5. restores and removes everything it made: proxies back to pass-through and stopped,
   dynos stopped, database dropped, queues deleted, Redis keys deleted; also on
   Ctrl-C (SIGINT/SIGTERM) or error.

The `naive` mode is the same load and timeline against `naive_app` (bench/chaoskit/): the same
routes and schema with plain SQLAlchemy (create_engine defaults: no breaker, no
retry, no queue, no cache, no idempotency). A report follows: per-fault error
rates, p99 and lost writes side by side, the audit, the timings against the
targets; `summary.md`, `chaos.png` (needs matplotlib) and the raw records in
`--out` (default bench/out/chaos-<time>/). Safety: every address is 127.0.0.1
(a non-loopback URL is refused), every loop is bounded in count and time, and the
run stops by itself.

`run_chaos(ChaosConfig(...))` does the same from Python (tests/faults/test_chaos.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/chaos.py`: tests.support and bench.chaos importable
    sys.path.insert(0, str(ROOT))

from bench.chaoskit.config import SCENARIOS, ChaosConfig  # noqa: E402
from bench.chaoskit.load import load_child  # noqa: E402
from bench.chaoskit.proxy_cost import proxy_cost  # noqa: E402
from bench.chaoskit.relay import hub_child  # noqa: E402
from bench.chaoskit.run import ChaosResult, run_chaos  # noqa: E402

__all__ = ["ChaosConfig", "ChaosResult", "main", "run_chaos"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="full")
    parser.add_argument("--writes", type=float, help="writes per second (no calibration; full: 100, short: 40)")
    parser.add_argument("--reads", type=float, help="reads per second (no calibration; full: 200, short: 80)")
    parser.add_argument(
        "--load-fraction",
        type=float,
        default=0.5,
        help="measure the stage's capacity first and run at this fraction of it (default 0.5; 0: the scenario's rates)",
    )
    parser.add_argument("--duration", type=float, help="seconds of load per mode (default: the scenario's)")
    parser.add_argument("--outage", type=float, help="length of the main database outage, seconds (full: 30)")
    parser.add_argument(
        "--faults",
        help="comma-separated subset: ssl_kills,db_outage,rabbit_outage (rabbit_node_kill with a cluster),"
        "rabbit_alarm,publisher_kill,redis_outage,worker_kill",
    )
    parser.add_argument("--modes", default="brownout,naive", help="brownout,naive (default) or one of them")
    parser.add_argument("--web", type=int, default=2, help="web replicas (default 2)")
    parser.add_argument(
        "--rabbit-nodes",
        type=int,
        default=1,
        help="3: a throwaway three-node RabbitMQ cluster of the run's own (quorum queues); the node kill replaces the "
        "RabbitMQ outage (default 1: the machine's RabbitMQ through a proxy)",
    )
    parser.add_argument("--default-settings", action="store_true", help="keep the default breaker, health and gate settings")
    parser.add_argument("--outage-style", choices=("refuse", "silence"), default="refuse")
    parser.add_argument("--out", type=Path, help="output folder (default bench/out/chaos-<time>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    for service in ("db", "rabbit", "redis"):
        parser.add_argument(f"--{service}-down", help=f"shell command that takes {service} down instead of the proxy")
        parser.add_argument(f"--{service}-up", help=f"shell command that brings {service} back (also run on exit)")
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    parser.add_argument("--proxy-cost", action="store_true", help="measure the proxies' CPU per MB relayed, then exit")
    parser.add_argument("--proxy-hub", help=argparse.SUPPRESS)
    parser.add_argument("--splice", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for service in ("db", "rabbit", "redis"):
        down, up = getattr(args, f"{service}_down"), getattr(args, f"{service}_up")
        if bool(down) != bool(up):
            parser.error(f"--{service}-down and --{service}-up go together")
    return args


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load_child:
        load_child(args.load_child)
        return 0
    if args.proxy_cost:
        proxy_cost()
        return 0
    if args.rabbit_nodes not in (1, 3):
        raise SystemExit("--rabbit-nodes: 1 or 3")
    if args.proxy_hub:
        hub_child([int(port) for port in args.proxy_hub.split(",")], splice=args.splice)
        return 0
    signal.signal(signal.SIGTERM, _raise_interrupt)
    commands = {
        s: (getattr(args, f"{s}_down"), getattr(args, f"{s}_up")) for s in ("db", "rabbit", "redis") if getattr(args, f"{s}_down")
    }
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in ("brownout", "naive") for m in modes):
        raise SystemExit("--modes: brownout, naive or both")
    config = ChaosConfig(
        scenario=args.scenario,
        writes=args.writes,
        reads=args.reads,
        duration=args.duration,
        outage=args.outage,
        faults=set(args.faults.split(",")) if args.faults else None,
        modes=modes,
        web=args.web,
        default_settings=args.default_settings,
        outage_style=args.outage_style,
        out_dir=args.out,
        progress=False if args.no_progress else None,
        seed=args.seed,
        commands=commands,
        plot=not args.no_plot,
        load_fraction=args.load_fraction or None,
        rabbit_nodes=args.rabbit_nodes,
    )
    try:
        result = run_chaos(config)
    except KeyboardInterrupt:
        print("chaos: interrupted; everything it changed was restored and removed", file=sys.stderr)
        return 130
    print()
    print(result.markdown)
    print(
        f"chaos: summary {result.out_dir / 'summary.md'}"
        + (f", plot {result.png}" if result.png else " (no plot: matplotlib missing)")
    )
    brownout = result.modes.get("brownout")
    if brownout is not None:
        audit = brownout.audit
        return 0 if audit["lost"] == audit["duplicated"] == audit["reordered"] == 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
