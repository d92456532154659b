"""The repository as deployments ran it before Brownout's tables had their own migration history.

At that commit the service and Brownout shared one Alembic history (`alembic_version`, revisions
0001-0006) and one package layout. Tests that prove an upgrade extract it from git and run it: a
database migrated, and a queue published, by that code. CI runs on a full clone, which has it.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
PREVIOUS_LAYOUT = "97030e55099bcb2f129573459caa5d220e18bea2"  # the last release before Brownout became a library


def extract(dest: Path) -> Path:
    """The previous layout's files under *dest* (no .git, no virtualenv)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", PREVIOUS_LAYOUT],
        cwd=REPOSITORY,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {PREVIOUS_LAYOUT} failed (a shallow clone?): {archive.stderr.decode()[-500:]}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def environment(tree: Path, extra: dict[str, str]) -> dict[str, str]:
    """An environment whose imports of `app`, `worker` and `brownout` find the previous layout's files first."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BROWNOUT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), str(tree)])
    return env | extra
