"""Every benchmark runs as the README says (`.venv/bin/python bench/NAME.py`), from any directory.

The reference service (app/) is not installed into the virtualenv (the wheel holds the library only), so a
benchmark that imports it must put the repository on its path itself; this catches one that does not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(path.name for path in (ROOT / "bench").glob("*.py"))


def test_every_benchmark_is_listed() -> None:
    assert {"chaos.py", "fleet_breaker.py", "overhead.py", "publish.py", "read_path.py", "write_path.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_starts_from_outside_the_repository(script: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
