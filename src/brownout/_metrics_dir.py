"""A fresh folder for prometheus_client's multiprocess files, made by a launcher before its processes start."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def prepare(prefix: str) -> str:
    """Use $PROMETHEUS_MULTIPROC_DIR (emptied: values of a previous run must not add up) or a new
    temporary folder; export it so every process started from here writes its values there."""
    given = os.environ.get(VARIABLE)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
    else:
        folder = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ[VARIABLE] = str(folder)
    return str(folder)
