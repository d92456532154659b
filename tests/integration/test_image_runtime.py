"""The image's runtime, repeated where no image can be built: install, launch, serve, apply.

No Docker engine runs here and base images come from a registry this machine cannot reach, so this test
does what the Dockerfile does, read from the Dockerfile itself: the build stage's COPY lines into a fresh
source tree, its `uv sync` lines (same uv, same flags, same environment) into a fresh virtualenv, then the
runtime stage's Procfile and `run-procfile` script, and runs the processes as an unprivileged user with a
container's bare environment. The web must answer /health, the release line migrate, and the worker apply
a write the web queued; the image's health check must say both are alive.

What differs from a container, on purpose: the interpreter is this machine's python3 rather than the
image's /usr/local/bin/python3, paths are temporary directories rather than /opt/venv and /app, and uv may
use its download cache (the image sets UV_NO_CACHE to keep it out of the layer; what is installed is the same).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from app.schema import notifications
from brownout._settings import Settings, normalise_database_url
from tests.conftest import database_url
from tests.support.api_server import free_port
from tests.support.credentials import AS_SERVICE, SERVICE_KEY_ENTRY
from tests.support.polling import wait_until
from tests.support.processes import stop
from tests.support.rabbit import RABBITMQ_URL, delete_queue_set
from tests.unit.test_deploy_files import DOCKERFILE, ROOT, dockerfile_stages, instruction_arguments, launcher_script

UV = ROOT / ".tools" / "uv" / "bin" / "uv"
TOKEN = "image-test-admin-token-0123456789"
UNPRIVILEGED = 65534  # nobody
_NETWORK_VARIABLES = (
    "SSL_CERT_",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "UV_INDEX",
    "UV_DEFAULT_INDEX",
)


def _image_interpreter() -> str:
    """A python3 >= 3.11 that the unprivileged user may run, as the image's /usr/local/bin/python3 is
    (a pyenv or home-directory interpreter is not: the virtualenv links to it)."""
    python3 = shutil.which("python3") or sys.executable
    found = subprocess.run([python3, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, check=True)
    for candidate in ("/usr/local/bin/python3", "/usr/bin/python3", os.path.realpath(found.stdout.strip())):
        if not os.access(candidate, os.X_OK):
            continue
        check = [*_as_unprivileged(), candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"]
        if subprocess.run(check, capture_output=True, timeout=30, check=False).returncode == 0:
            return candidate
    pytest.fail("no python3 >= 3.11 that an unprivileged user can run (the image's interpreter stands for one)")


def _stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in instruction_arguments(stage, "ENV"):
        for token in shlex.split(arguments):
            name, _, value = token.partition("=")
            env[name] = value
    return env


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    """src/ and venv/ as the build stage makes them, app/ as the runtime stage lays it out; world-readable."""
    if not UV.exists():
        pytest.fail(f"{UV} is missing: run deploy/setup.sh")
    root = Path(tempfile.mkdtemp(prefix="brownout-image-"))
    root.chmod(0o755)
    try:
        build, runtime = dockerfile_stages()[0], dockerfile_stages()[-1]
        src = root / "src"
        src.mkdir()
        for arguments in instruction_arguments(build, "COPY"):
            *sources, target = shlex.split(arguments)
            for source in sources:
                destination = src / target / source if target.endswith("/") or target == "./" else src / target
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(ROOT / source, destination)
        # The build's own environment, plus how this machine reaches the package index (certificates, proxies).
        network = {name: value for name, value in os.environ.items() if name.startswith(_NETWORK_VARIABLES)}
        env = {"PATH": "/usr/bin:/bin", "HOME": str(root)} | network | _stage_env(build)
        env["UV_PROJECT_ENVIRONMENT"] = str(root / "venv")
        env.pop("UV_NO_CACHE", None)
        env["UV_CACHE_DIR"] = os.environ.get("UV_CACHE_DIR", str(Path.home() / ".cache" / "uv"))
        python = _image_interpreter()
        syncs = [arguments for arguments in instruction_arguments(build, "RUN") if arguments.startswith("uv sync")]
        assert syncs, "the Dockerfile's build stage has no `uv sync`"
        for arguments in syncs:
            tokens = shlex.split(arguments)
            tokens = [python if token == "/usr/local/bin/python3" else token for token in tokens]
            done = subprocess.run([str(UV), *tokens[1:]], cwd=src, env=env, timeout=600, capture_output=True, text=True)
            assert done.returncode == 0, f"{arguments}: {done.stderr}"
        app_dir = root / "app"
        app_dir.mkdir()
        for arguments in instruction_arguments(runtime, "COPY"):
            if arguments.startswith("--from"):
                continue
            source, target = shlex.split(arguments)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, app_dir / source)
            else:
                shutil.copy2(ROOT / source, app_dir / source)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        launcher = bin_dir / "run-procfile"
        launcher.write_text(launcher_script(), encoding="utf-8")
        launcher.chmod(0o755)
        (root / "tmp").mkdir(mode=0o1777)
        (root / "tmp").chmod(0o1777)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_image_holds_the_project_and_its_runtime_dependencies_only(image_root: Path) -> None:
    venv_python = image_root / "venv" / "bin" / "python"
    library = subprocess.run(
        [
            str(venv_python),
            "-c",
            "import brownout, fastapi, dramatiq, importlib.util as u; print(brownout.__file__, u.find_spec('app'))",
        ],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # The library installed (not a link to the source tree); the reference service not in the virtualenv.
    installed_at, app_spec = library.stdout.split()
    assert installed_at.startswith(str(image_root / "venv")) and app_spec == "None"
    service = subprocess.run(
        [str(venv_python), "-c", "import app.api.main; print(app.__file__)"],
        cwd=image_root / "app",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert service.stdout.strip() == str(image_root / "app" / "app" / "__init__.py")  # beside it, in the workdir
    for tool in ("pytest", "ruff", "mypy", "honcho", "railway_sdk"):
        absent = subprocess.run([str(venv_python), "-c", f"import {tool}"], capture_output=True, timeout=60, check=False)
        assert absent.returncode != 0, f"{tool} is in the image's virtualenv"


def _container_env(image_root: Path, settings: Settings, **extra: str) -> dict[str, str]:
    """A container's environment: the image's ENV, the platform's variables, nothing of this shell's."""
    env = _stage_env(dockerfile_stages()[-1])
    env["PATH"] = f"{image_root / 'venv' / 'bin'}:{image_root / 'bin'}:/usr/bin:/bin"
    env.update(
        {
            "HOME": "/nonexistent",
            "TMPDIR": str(image_root / "tmp"),
            "PROCFILE": str(image_root / "app" / "Procfile"),
            "BROWNOUT_PROCESS_TYPE_FILE": str(image_root / "tmp" / f"process-type-{uuid.uuid4().hex[:8]}"),
            "DATABASE_URL": settings.database_url,
            "RABBITMQ_URL": settings.rabbitmq_url,
            "REDIS_URL": str(settings.redis_url),
            "BROWNOUT_QUEUE_NAME": settings.queue_name,
            "BROWNOUT_EMAIL_QUEUE_NAME": settings.email_queue_name,
            "BROWNOUT_REDIS_KEY_PREFIX": settings.redis_key_prefix,
            "BROWNOUT_DB_APPLICATION_NAME": settings.db_application_name,
            "BROWNOUT_ADMIN_TOKEN": TOKEN,
            "BROWNOUT_API_KEYS": SERVICE_KEY_ENTRY,
        }
    )
    env.update(extra)
    return env


def _as_unprivileged() -> list[str]:
    if os.geteuid() != 0:
        return []  # already an unprivileged user
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root"
    return [setpriv, f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups"]


@contextmanager
def process(image_root: Path, command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    running = subprocess.Popen([*_as_unprivileged(), *command], cwd=image_root / "app", env=env)
    try:
        yield running
    finally:
        stop(running, grace=30)


def _run(image_root: Path, command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_as_unprivileged(), *command], cwd=image_root / "app", env=env, capture_output=True, text=True, timeout=120
    )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        time.sleep(0.2)
        return False


@pytest.fixture
def image_settings(make_settings: Callable[..., Settings], queue_name: str, redis_prefix: str) -> Iterator[Settings]:
    settings = make_settings(
        rabbitmq_url=RABBITMQ_URL,
        queue_name=queue_name,
        email_queue_name=f"{queue_name}-emails",
        redis_url=os.environ.get("BROWNOUT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        redis_key_prefix=redis_prefix,
    )
    yield settings
    delete_queue_set(settings.email_queue_name)


def test_web_worker_and_release_run_from_the_installed_image(
    image_root: Path, image_settings: Settings, pg_database: str
) -> None:
    # release: the migration, as Railway's pre-deploy command runs it.
    migrated = _run(image_root, ["run-procfile", "release"], _container_env(image_root, image_settings))
    assert migrated.returncode == 0, migrated.stderr
    port, metrics_port = free_port(), free_port()
    web_env = _container_env(image_root, image_settings, PORT=str(port))
    worker_env = _container_env(image_root, image_settings, BROWNOUT_METRICS_PORT=str(metrics_port))
    web = f"http://127.0.0.1:{port}"
    with process(image_root, ["run-procfile", "web"], web_env):
        assert wait_until(lambda: _answers(f"{web}/health"), timeout=90), "the web did not answer /health"
        assert _run(image_root, ["python", "-m", "app.healthcheck"], web_env).returncode == 0
        # A queued write: the breaker opened by the operator, the web queues what it cannot apply.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        opened = httpx.post(f"{web}/admin/breaker", json={"action": "open"}, headers=auth, timeout=10)
        assert opened.status_code == 200, opened.text
        body = {"user_id": 8, "email": "ada@example.com", "subject": "From the image", "body": "b"}

        def queued() -> bool:
            answer = httpx.post(
                f"{web}/notifications", json=body, headers={"Idempotency-Key": "image-1"} | AS_SERVICE, timeout=10
            )
            assert answer.status_code in (201, 202), answer.text
            return answer.status_code == 202

        assert wait_until(queued, timeout=30), "the web applied the write instead of queueing it"
        assert _count(pg_database) == 0
        # The worker's health check fails until the worker serves its metrics (its type recorded as
        # run-procfile will record it, so the check asks the metrics server's /health, not the web's port).
        Path(worker_env["BROWNOUT_PROCESS_TYPE_FILE"]).write_text("worker\n", encoding="utf-8")
        before = _run(image_root, ["python", "-m", "app.healthcheck"], worker_env)
        assert before.returncode == 1 and f":{metrics_port}/health" in before.stderr, before.stderr
        with process(image_root, ["run-procfile", "worker"], worker_env):
            # The worker follows the operator's override too: nothing is applied until it is lifted.
            assert wait_until(
                lambda: _run(image_root, ["python", "-m", "app.healthcheck"], worker_env).returncode == 0, timeout=60
            ), "the worker did not serve its metrics"
            assert _count(pg_database) == 0, "the worker applied a write while the operator held the breaker open"
            lifted = httpx.post(f"{web}/admin/breaker", json={"action": "reset"}, headers=auth, timeout=10)
            assert lifted.status_code == 200, lifted.text
            assert wait_until(lambda: _count(pg_database) == 1, timeout=90), "the worker did not apply the write"
            assert wait_until(
                lambda: _run(image_root, ["python", "-m", "app.healthcheck"], worker_env).returncode == 0, timeout=30
            )
        assert httpx.get(f"{web}/health", timeout=10).status_code == 200


def _count(pg_database: str) -> int:
    engine = create_engine(normalise_database_url(database_url(pg_database)))
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(notifications)).scalar_one())
    finally:
        engine.dispose()


def test_the_dockerfile_is_what_this_test_reads() -> None:
    """Guard for the reader: if the image stops using `uv sync` or run-procfile, this test must change with it."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "uv sync --frozen" in text and "/usr/local/bin/run-procfile" in text
