"""Imported at start-up by the chaos run's Brownout web dynos only (their PYTHONPATH), never by a deployment.

SIGUSR2 kills the publisher's I/O thread the way a bug would: a callback raising on its I/O loop (pika lets
it out of the loop) while the link's recovery raises too. What the run then checks is the service's own
answer: writes rejected at once (503 + Retry-After) instead of waiting on a dead thread, the thread
restarted, `/ready` counting the restart, and no acknowledged write lost.
"""

from __future__ import annotations

import signal
from typing import Any


def _kill_publisher_threads(signum: int, frame: Any) -> None:
    import gc

    from brownout._dispatch.publisher import Publisher

    for publisher in [each for each in gc.get_objects() if isinstance(each, Publisher)]:
        link = publisher._link
        ioloop = getattr(link, "ioloop", None)
        if ioloop is None:
            continue

        def broken_recovery(exc: BaseException, *, abort: bool) -> None:
            raise RuntimeError("chaos: the publisher's recovery fails too")

        def bug() -> None:
            raise RuntimeError("chaos: a bug on the publisher's I/O loop")

        link._lost = broken_recovery  # this link only: the restarted thread gets a fresh one
        try:
            ioloop.add_callback_threadsafe(bug)
        except Exception as exc:  # its loop already closed: nothing to kill
            print(f"chaos: publisher I/O thread not reachable: {exc!r}", flush=True)
        else:
            print("chaos: publisher I/O thread killed", flush=True)


signal.signal(signal.SIGUSR2, _kill_publisher_threads)
