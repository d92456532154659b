"""What masking costs on hostile text: `.venv/bin/python bench/masking.py [--kib 64] [--repeat 20]`.

Every log record and Sentry event goes through `mask_secrets`, and an anonymous
caller shapes part of that text (a query string in an access log line, a
header in an exception). Prints, for each shape of junk cut to `--kib` KiB,
the best of `--repeat` runs of `mask_secrets` and of a peer measured in the same
run: `json.dumps` of the same text (one linear pass that every JSON log line
already pays, in C). The doubling column is the time at twice the size over
the time at the size: about 2 for a linear pass, 4 for a quadratic one.
Targets: every shape under 5 ms at 64 KiB, and a doubling under 2.6.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

from brownout._redaction import mask_secrets

SHAPES = {
    "many schemes (a://a://...)": "a://",
    "password full of @ (u:p@p@p@...)": "postgresql://u:" + "p@" * 64,
    "userinfo without scheme (x:y@x:y@...)": "x:y@",
    "keyword repeated (password=password=...)": "password=",
    "open quotes (password='password='...)": "password='",
    "spaced passwords (redis://a:b redis://a:b ...)": "redis://a:b ",
    "query string of URLs with passwords": "q=postgresql://a:b@h&",
    "ordinary access log text": "GET /users/42/notifications?limit=50 HTTP/1.1 200 ",
}
TARGET_MS = 5.0
TARGET_DOUBLING = 2.6


def best_ms(function: Callable[[str], object], text: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function(text)
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kib", type=int, default=64, help="size of each text (default 64)")
    parser.add_argument("--repeat", type=int, default=20, help="runs per measure; the best is kept (default 20)")
    args = parser.parse_args()
    size = args.kib * 1024
    print(f"load average {os.getloadavg()[0]:.2f}; {args.kib} KiB per text, best of {args.repeat}")
    print(f"{'shape':48} {'mask ms':>8} {'peer ms':>8} {'ratio':>6} {'x2 size':>8}")
    failed = []
    for name, unit in SHAPES.items():
        text = (unit * (size // len(unit) + 1))[:size]
        double = (unit * (2 * size // len(unit) + 1))[: 2 * size]
        masked = best_ms(mask_secrets, text, args.repeat)
        peer = best_ms(json.dumps, text, args.repeat)
        growth = best_ms(mask_secrets, double, args.repeat) / masked if masked else 0.0
        ratio = masked / peer if peer else 0.0
        print(f"{name:48} {masked:8.2f} {peer:8.2f} {ratio:6.1f} {growth:8.1f}")
        if masked > TARGET_MS or growth > TARGET_DOUBLING:
            failed.append(name)
    verdict = "met" if not failed else "NOT met: " + ", ".join(failed)
    print(f"targets (< {TARGET_MS} ms, doubling < {TARGET_DOUBLING}): {verdict}")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
