"""A service of a user's own on Brownout, built from the README's integration section, line for line.

The section's Python blocks become the service's files (a package named `app`, as a user's would be); its
install lines build the wheel from this checkout and install it into a fresh virtualenv (with the locked
versions of its dependencies); its shell lines run in that virtualenv, in the service's folder, with
nothing of this checkout on the path. The service then lives through an outage of its database (a TCP
proxy in front of PostgreSQL that refuses): a write applied at once, one queued while the database is down
and applied by the worker once it is back, and reads served stale meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

import brownout
from tests.conftest import REDIS_URL, database_url
from tests.support.api_server import free_port
from tests.support.polling import wait_until
from tests.support.processes import stop
from tests.support.rabbit import RABBITMQ_URL
from tests.support.tcp_proxy import FaultProxy

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".tools" / "uv" / "bin" / "uv"
SECTION = "## Add Brownout to your service"


def integration_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    return readme[start : end if end != -1 else len(readme)]


def code_blocks(section: str) -> list[tuple[str, str]]:
    return [(language, body) for language, body in re.findall(r"```(\w+)\n(.*?)```", section, re.DOTALL)]


def shell_lines(body: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in body.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's two install lines: the wheel built from this checkout, installed in a virtualenv of its own
    (here at the locked versions of its dependencies)."""
    if not UV.exists():
        pytest.fail(f"{UV} is missing: run deploy/setup.sh")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "uv.lock"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "UV_PROJECT"))}

    def uv(*argv: str, cwd: Path = work) -> str:
        done = subprocess.run([str(UV), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, f"uv {' '.join(argv)}: {done.stderr[-3000:]}"
        return done.stdout

    uv("build", "--wheel", "--out-dir", str(work / "dist"), cwd=source)
    (wheel,) = (work / "dist").glob("brownout-*.whl")
    constraints = work / "constraints.txt"
    locked = uv("export", "--frozen", "--no-default-groups", "--no-emit-project", "--no-hashes", cwd=source)
    constraints.write_text(locked, encoding="utf-8")
    uv("venv", "--quiet", "--python", sys.executable, str(work / "venv"))
    uv("pip", "install", "--quiet", "--python", str(work / "venv" / "bin" / "python"), "-c", str(constraints), str(wheel))
    return work / "venv"


def test_the_wheel_holds_brownout_only_and_its_command(venv: Path, tmp_path: Path) -> None:
    python = venv / "bin" / "python"
    probe = "import brownout, importlib.util as u; print(brownout.__version__, u.find_spec('app'), u.find_spec('worker'))"
    found = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    version, app, worker = found.stdout.split()
    assert (app, worker) == ("None", "None"), "the wheel must not install a top-level app or worker"
    help_text = subprocess.run([str(venv / "bin" / "brownout"), "--help"], capture_output=True, text=True, timeout=60, check=True)
    for command in ("web", "worker", "migrate", "health", "dead-letters", "purge-applied"):
        assert command in help_text.stdout
    listing = subprocess.run(
        [str(python), "-c", "import brownout.migrations as m; print(len(list(m.MIGRATIONS.glob('versions/*.py'))))"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert int(listing.stdout) >= 6, "the migrations must ship in the wheel"
    assert version == brownout.__version__


@pytest.fixture
def service(tmp_path: Path) -> Path:
    """The README's files, written where a user would keep them."""
    root = tmp_path / "service"
    blocks = code_blocks(integration_section())
    files = [body for language, body in blocks if language == "python"]
    assert len(files) >= 2
    for body in files:
        first, _, rest = body.partition("\n")
        assert first.startswith("# ") and first.endswith(".py"), f"a file block starts with its path: {first!r}"
        path = root / first[2:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
    return root


def readme_commands() -> tuple[list[str], list[str]]:
    shells = [body for language, body in code_blocks(integration_section()) if language == "sh"]
    assert shell_lines(shells[0]) == ["uv build --wheel --out-dir dist", "pip install dist/brownout-*.whl"]
    return shell_lines(shells[0]), shell_lines(shells[-1])


@pytest.fixture
def database_proxy(pg_database: str) -> Iterator[FaultProxy]:
    upstream = make_url(database_url(pg_database))
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=upstream.port or 5432) as proxy:
        yield proxy


def test_a_service_built_as_the_readme_says_lives_through_a_database_outage(
    venv: Path, service: Path, database_proxy: FaultProxy, pg_database: str, queue_name: str, redis_prefix: str, tmp_path: Path
) -> None:
    _, lines = readme_commands()
    url = make_url(database_url(pg_database)).set(port=database_proxy.port).render_as_string(hide_password=False)
    port, metrics_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("BROWNOUT_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {
        "PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        "PORT": str(port),
        "BROWNOUT_METRICS_PORT": str(metrics_port),
        "BROWNOUT_QUEUE_NAME": queue_name,
        "BROWNOUT_EMAIL_QUEUE_NAME": f"{queue_name}-email",
        "BROWNOUT_REDIS_KEY_PREFIX": redis_prefix,
        "BROWNOUT_CACHE_FRESH_SECONDS": "1",  # a cached copy turns stale within the test's outage
        "BROWNOUT_BREAKER_OPEN_SECONDS": "2",
        "BROWNOUT_WORKER_GATE_CAP_SECONDS": "2",
        "BROWNOUT_DB_CONNECT_TIMEOUT_SECONDS": "2",
        "BROWNOUT_LOG_FORMAT": "json",  # init_app configures the web processes' logging as the settings say
    }
    dynos: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        for line in lines:
            argv = shlex.split(line, comments=True)
            if argv[:2] == ["export", "DATABASE_URL=postgresql://user:password@localhost:5432/shop"]:
                names = [assignment.split("=")[0] for assignment in argv[1:]]  # the README's example values:
                assert names == ["DATABASE_URL", "RABBITMQ_URL", "REDIS_URL"]  # this test's services instead
                env |= {"DATABASE_URL": url, "RABBITMQ_URL": RABBITMQ_URL, "REDIS_URL": REDIS_URL}
            elif argv[0] == "export":  # as a shell would: what the line exports joins the environment
                done = subprocess.run(["bash", "-c", f"{line}\nenv -0"], cwd=service, env=env, capture_output=True, check=True)
                exported = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
                env |= {name: exported[name] for name in (a.split("=")[0] for a in argv[1:])}
            elif argv[:2] in (["brownout", "web"], ["brownout", "worker"]):
                log = (logs / f"{argv[1]}.log").open("wb")
                dynos.append(subprocess.Popen(argv, cwd=service, env=env, stdout=log, stderr=subprocess.STDOUT))
                log.close()
            else:
                done = subprocess.run(
                    ["bash", "-c", line], cwd=service, env=env, capture_output=True, text=True, timeout=120, check=False
                )
                assert done.returncode == 0, f"{line}: {done.stderr[-3000:]}"
        assert len(dynos) == 2, "the README starts a web and a worker dyno"
        web = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: answers(f"{web}/health"), timeout=60), tail(logs)
        assert httpx.get(f"{web}/orders/7", timeout=10).status_code == 401  # no key: not answered
        key = (service / "checkout.key").read_text().splitlines()[0]  # the key `brownout keys new` made for checkout
        with httpx.Client(base_url=web, timeout=10, headers={"Authorization": f"Bearer {key}"}) as client:
            assert client.get("/orders/7").status_code == 404  # not there yet: cached as such
            created = client.put("/orders/7/status", json={"status": "created"}, headers={"Idempotency-Key": "created-7"})
            assert created.status_code == 200, created.text
            placed = client.put("/orders/7/status", json={"status": "placed"}, headers={"Idempotency-Key": "placed-7"})
            assert placed.status_code == 200 and placed.json() == {"id": 7, "status": "placed"}, placed.text
            read = client.get("/orders/7")  # the service's own writes are read at once, not the cached 404
            assert read.status_code == 200 and (read.json()["id"], read.json()["status"]) == (7, "placed")
            reused = client.put("/orders/7/status", json={"status": "lost"}, headers={"Idempotency-Key": "placed-7"})
            assert reused.status_code == 422 and "another body" in reused.json()["detail"]
            assert client.put("/orders/99999999999999999999/status", json={"status": "x"}).status_code == 422
            assert client.put("/orders/7/status", json={"status": ""}).status_code == 422

            database_proxy.refuse()  # the database goes away: new connections refused, open ones cut
            database_proxy.reset_existing()
            shipped = client.put("/orders/7/status", json={"status": "shipped"}, headers={"Idempotency-Key": "shipped-7"})
            assert shipped.status_code == 202, shipped.text
            reads: list[httpx.Response] = []  # fresh from Redis for a second, then stale
            assert wait_until(lambda: reads.append(client.get("/orders/7")) or "X-Brownout" in reads[-1].headers, timeout=10)
            assert {(read.status_code, read.json()["status"]) for read in reads} == {(200, "placed")}
            assert reads[-1].headers["X-Brownout"] == "stale" and int(reads[-1].headers["Age"]) >= 1
            assert client.get("/orders/8").status_code == 503  # nothing cached: said, with when to retry

            database_proxy.pass_through()  # back: the worker applies the queued write, reads catch up
            assert wait_until(lambda: status_of(client) == "shipped", timeout=60), tail(logs)
        web_lines = [json.loads(line) for line in (logs / "web.log").read_text().splitlines() if line.startswith("{")]
        assert any(line["logger"].startswith("brownout.") and line["level"] == "WARNING" for line in web_lines), tail(logs)
    finally:
        for dyno in dynos:
            stop(dyno)


def status_of(client: httpx.Client) -> str | None:
    answer = client.get("/orders/7")
    if answer.status_code != 200 or answer.headers.get("X-Brownout") == "stale":
        time.sleep(0.2)
        return None
    status: str = answer.json()["status"]
    return status


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        time.sleep(0.1)
        return False


def tail(logs: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-2500:]}" for path in sorted(logs.glob("*.log")))
