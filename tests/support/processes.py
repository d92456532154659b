"""Child processes of tests and benchmarks: stopped as a supervisor would, SIGTERM, then SIGKILL after a grace."""

from __future__ import annotations

import subprocess
from typing import Any


def stop(process: subprocess.Popen[Any], grace: float = 30.0) -> None:
    """SIGTERM *process* and wait *grace* seconds for it to drain; SIGKILL it past that."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
