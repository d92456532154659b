"""The deploy files agree with the Procfile and with the settings.

The Procfile is where the commands live. The Dockerfile installs `run-procfile TYPE`,
which execs the Procfile's TYPE line; docker-compose.yml and .railway/railway.py
(tests/unit/test_railway_iac.py) name a process type through it (or, if someone writes a command out instead, it must be the
Procfile's line, up to whitespace and the `$PORT` / `${PORT:-8000}` spelling).
Environment variables given to web, worker and migrate must be ones src/brownout/_settings.py
reads (or a documented extra), published ports must be the ones the processes listen
on, and every health check is liveness (never /ready: an outage must not fail a deploy).

Pure file checks (plus /bin/sh for the launcher): no Docker, no services.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from brownout._auth.keys import SCOPES, KeyRing, parse_keys
from brownout._settings import Settings, _env_name

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SETUP = ROOT / "deploy" / "setup.sh"

# Compose service -> Procfile process type.
PROCESS_TYPES = {"web": "web", "worker": "worker", "migrate": "release"}

# Environment variables a Brownout container may be given that are not settings fields:
# PORT (the web's port, read by the Procfile line; Railway sets it), PROMETHEUS_MULTIPROC_DIR
# (prometheus_client's multiprocess mode, set up by the launchers), MIGRATION_DATABASE_URL
# (a session-mode or direct URL for `python -m app migrate`, see .railway/railway.py).
EXTRA_ENV = {"PORT", "PROMETHEUS_MULTIPROC_DIR", "MIGRATION_DATABASE_URL"}

_PORT_VARIABLE = re.compile(r"\$\{PORT(?::-[^}]*)?\}|\$PORT\b")


# ---------------------------------------------------------------- parsing helpers


def procfile() -> dict[str, str]:
    lines: dict[str, str] = {}
    for raw in PROCFILE.read_text(encoding="utf-8").splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        name, sep, command = raw.partition(":")
        assert sep, f"Procfile line without 'type:': {raw!r}"
        lines[name.strip()] = command.strip()
    return lines


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a continued instruction"
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, arguments.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def instruction_arguments(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [arguments for instruction, arguments in stage if instruction == name]


def exec_form(arguments: str) -> list[str]:
    """A Dockerfile CMD/ENTRYPOINT: JSON exec form, or shell form (run by /bin/sh -c)."""
    import json

    if arguments.startswith("["):
        value = json.loads(arguments)
        assert isinstance(value, list) and all(isinstance(item, str) for item in value)
        return list(value)
    return ["/bin/sh", "-c", arguments]


def launcher_script() -> str:
    """The run-procfile script that the Dockerfile's final stage writes with printf."""
    runs = [arguments for arguments in instruction_arguments(final_stage(), "RUN") if "/usr/local/bin/run-procfile" in arguments]
    assert len(runs) == 1, "the final stage must write /usr/local/bin/run-procfile in one RUN"
    tokens = shlex.split(runs[0])
    start = tokens.index("printf") + 2  # printf '%s\n' line...
    end = tokens.index(">")
    assert tokens[end + 1] == "/usr/local/bin/run-procfile"
    return "\n".join(tokens[start:end]) + "\n"


def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml (dev dependency)")
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no {name!r} service"
    value = services[name]
    assert isinstance(value, dict)
    return value


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {name: value for name, _, value in pairs}
    return {str(name): "" if value is None else str(value) for name, value in env.items()}


def container_ports(svc: dict[str, Any]) -> set[str]:
    ports: set[str] = set()
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(str(entry["target"]))
        else:
            ports.add(str(entry).rsplit(":", 1)[-1].split("/")[0])
    return ports


def command_tokens(command: str | list[str]) -> list[str]:
    if isinstance(command, str):
        return shlex.split(command)
    return [str(token) for token in command]


def normalise(command: str) -> str:
    """Whitespace collapsed, compose's $$ unescaped, every spelling of the PORT variable made one."""
    command = command.replace("$$", "$")
    command = _PORT_VARIABLE.sub("$PORT", command)
    return " ".join(command.split())


def assert_runs_process(tokens: list[str], process_type: str, where: str) -> None:
    """*tokens* run the Procfile's *process_type* line: through run-procfile, or written out the same."""
    lines = procfile()
    assert process_type in lines, f"the Procfile has no {process_type!r} line ({where} runs it)"
    if tokens[:1] == ["run-procfile"]:
        assert tokens == ["run-procfile", process_type], f"{where}: {tokens}"
        return
    if len(tokens) == 3 and tokens[0] in ("sh", "/bin/sh") and tokens[1] == "-c":
        text = tokens[2].strip()
        text = text.removeprefix("exec ")
    else:
        text = " ".join(tokens)
    assert normalise(text) == normalise(lines[process_type]), (
        f"{where} runs {text!r}, but the Procfile's {process_type} line is {lines[process_type]!r}"
    )


def effective_command(name: str) -> list[str]:
    """The compose service's command, or the image's CMD when it sets none."""
    svc = service(name)
    if "command" in svc:
        return command_tokens(svc["command"])
    return exec_form(instruction_arguments(final_stage(), "CMD")[-1])


def settings_env_names() -> set[str]:
    return {_env_name(field) for field in Settings.model_fields}


# ---------------------------------------------------------------- Procfile and Dockerfile


def test_procfile_has_the_three_process_types() -> None:
    assert {"web", "worker", "release"} <= set(procfile())


def test_dockerfile_default_command_runs_the_web_line() -> None:
    cmds = instruction_arguments(final_stage(), "CMD")
    assert cmds, "the Dockerfile has no CMD"
    assert_runs_process(exec_form(cmds[-1]), "web", "the Dockerfile's CMD")


def test_the_image_installs_the_library_and_lays_the_reference_service_beside_it() -> None:
    """The wheel holds `brownout` only; the service's package is copied into the runtime stage's workdir,
    where its processes start (so `python -m app...`, uvicorn and Dramatiq find it on sys.path)."""
    build, runtime = dockerfile_stages()[0], final_stage()
    assert not [a for a in instruction_arguments(build, "COPY") if a.split()[0].rstrip("/") == "app"], "app/ is not built"
    assert instruction_arguments(runtime, "WORKDIR")[-1] == "/app"
    assert "app/ ./app/" in instruction_arguments(runtime, "COPY")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["tool"]["setuptools"]["packages"]["find"] == {"where": ["src"], "include": ["brownout*"]}


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = instruction_arguments(final_stage(), "USER")
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]


def test_dockerfile_exposes_8000_and_checks_the_liveness_of_its_process_type() -> None:
    stage = final_stage()
    exposed = {port.split("/")[0] for arguments in instruction_arguments(stage, "EXPOSE") for port in arguments.split()}
    assert "8000" in exposed
    (check,) = instruction_arguments(stage, "HEALTHCHECK")
    assert check.endswith('CMD ["python", "-m", "app.healthcheck"]'), check
    assert "/ready" not in check


def _uv_syncs(stage: list[tuple[str, str]]) -> list[list[str]]:
    return [shlex.split(arguments) for arguments in instruction_arguments(stage, "RUN") if arguments.startswith("uv sync")]


def test_dockerfile_installs_exactly_the_lock_without_development_groups() -> None:
    build = dockerfile_stages()[0]
    syncs = _uv_syncs(build)
    assert syncs, "the build stage installs with `uv sync`"
    for tokens in syncs:
        assert "--frozen" in tokens and "--no-default-groups" in tokens, tokens
        assert not any(token.startswith(("--group", "--all-groups", "--extra", "--all-extras")) for token in tokens)
    assert "--no-editable" in syncs[-1]  # the image holds the project, not a link to /src
    copied = " ".join(instruction_arguments(build, "COPY"))
    assert "uv.lock" in copied
    assert "pip install ." not in DOCKERFILE.read_text(encoding="utf-8")
    assert any(arguments.split()[0] == "Procfile" for arguments in instruction_arguments(final_stage(), "COPY"))
    assert "/app" in instruction_arguments(final_stage(), "WORKDIR")


def test_the_image_and_the_set_up_install_the_same_uv() -> None:
    build_args = instruction_arguments(dockerfile_stages()[0], "ARG")
    (arg,) = [arguments for arguments in build_args if arguments.startswith("UV_VERSION=")]
    setup = re.search(r"^readonly UV_VERSION=(\S+)$", SETUP.read_text(encoding="utf-8"), re.MULTILINE)
    assert setup is not None
    assert arg.split("=", 1)[1] == setup.group(1)


def _fake_commands(tmp_path: Path) -> Path:
    """A bin directory where each Procfile line's program prints its name and arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for line in procfile().values():
        program = shlex.split(line)[0]
        fake = bin_dir / program
        fake.write_text('#!/bin/sh\nprintf "%s" "$(basename "$0")"\nprintf " %s" "$@"\necho\n', encoding="utf-8")
        fake.chmod(0o755)
    return bin_dir


def _launch(tmp_path: Path, process_type: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "run-procfile"
    script.write_text(launcher_script(), encoding="utf-8")
    return subprocess.run(
        ["/bin/sh", str(script), process_type],
        env={
            "PATH": f"{_fake_commands(tmp_path)}:/usr/bin:/bin",
            "PROCFILE": str(PROCFILE),
            "BROWNOUT_PROCESS_TYPE_FILE": str(tmp_path / "process-type"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _expanded(line: str, env: dict[str, str]) -> str:
    """What /bin/sh makes of a Procfile line's words under *env*."""
    result = subprocess.run(
        ["/bin/sh", "-c", f'set -- {line}; printf "%s" "$1"; shift; printf " %s" "$@"; echo'],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


@pytest.mark.parametrize("process_type", ["web", "worker", "release"])
def test_run_procfile_execs_the_procfile_line_with_its_defaults(tmp_path: Path, process_type: str) -> None:
    env = {"PORT": "8123"}
    result = _launch(tmp_path, process_type, env)
    assert result.returncode == 0, result.stderr
    line = procfile()[process_type]
    assert result.stdout == _expanded(line, env)
    if "PORT" in line:
        assert "8123" in result.stdout
    # What the image's health check reads to know which endpoint to ask (app/healthcheck.py)...
    assert (tmp_path / "process-type").read_text(encoding="utf-8") == f"{process_type}\n"
    # ...recorded by the container's main process only: a later run-procfile (docker exec) keeps it.
    other = "release" if process_type != "release" else "web"
    assert _launch(tmp_path, other, env).returncode == 0
    assert (tmp_path / "process-type").read_text(encoding="utf-8") == f"{process_type}\n"


def test_run_procfile_refuses_an_unknown_process_type(tmp_path: Path) -> None:
    result = _launch(tmp_path, "nosuchtype", {})
    assert result.returncode == 64
    assert "no nosuchtype: line" in result.stderr


# ---------------------------------------------------------------- docker-compose.yml


@pytest.mark.parametrize("name", sorted(PROCESS_TYPES))
def test_compose_commands_are_the_procfile_lines(name: str) -> None:
    assert_runs_process(effective_command(name), PROCESS_TYPES[name], f"docker-compose.yml's {name}")


@pytest.mark.parametrize("name", sorted(PROCESS_TYPES))
def test_compose_environment_names_are_settings(name: str) -> None:
    unknown = set(environment(service(name))) - settings_env_names() - EXTRA_ENV
    assert not unknown, f"{name} sets variables src/brownout/_settings.py does not read: {sorted(unknown)}"


def test_compose_web_publishes_the_port_it_listens_on() -> None:
    web = service("web")
    port = environment(web).get("PORT", "8000")
    assert port == "8000"
    assert container_ports(web) == {port}


@pytest.mark.parametrize("name", ["web", "worker"])
def test_compose_checks_health_with_the_images_check(name: str) -> None:
    assert command_tokens(service(name)["healthcheck"]["test"]) == ["CMD", "python", "-m", "app.healthcheck"]


def test_compose_images_are_version_tags() -> None:
    for name, svc in compose()["services"].items():
        if "image" in svc and "build" not in svc:
            tag = str(svc["image"]).rpartition(":")[2]
            assert re.match(r"v?\d", tag), f"{name}: {svc['image']} is not pinned to a version"


def test_compose_worker_publishes_its_metrics_port() -> None:
    worker = service("worker")
    default = Settings.model_fields["metrics_port"].default
    port = environment(worker).get(_env_name("metrics_port"), str(default))
    assert port == "9191"
    assert container_ports(worker) == {port}


@pytest.mark.parametrize("name", ["web", "worker"])
def test_compose_web_and_worker_wait_for_the_migration(name: str) -> None:
    depends = service(name)["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_compose_worker_gets_the_drain_time_the_procfile_asks_for() -> None:
    grace = str(service("worker").get("stop_grace_period", "10s"))
    assert grace.endswith("s") and int(grace[:-1]) >= 25


def test_compose_has_the_monitoring_services() -> None:
    services = compose()["services"]
    assert {"postgres", "rabbitmq", "redis", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert "15672" in container_ports(services["rabbitmq"])
    prometheus_mounts = " ".join(services["prometheus"]["volumes"])
    assert "./deploy/prometheus:/etc/prometheus" in prometheus_mounts
    alertmanager = services["alertmanager"]
    assert "ALERT_WEBHOOK_URL" in alertmanager["environment"]
    assert "/etc/alertmanager/webhook_url" in " ".join(command_tokens(alertmanager["entrypoint"]))


# ---------------------------------------------------------------- health checks


def test_no_health_check_anywhere_uses_ready() -> None:
    for path in (DOCKERFILE, COMPOSE, ROOT / ".railway" / "railway.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.lstrip().startswith("#") and "/ready" in line:
                raise AssertionError(f"{path.name} uses /ready: {line.strip()}")


def test_prometheus_cannot_be_reloaded_or_shut_down_over_http() -> None:
    """--web.enable-lifecycle lets anyone who reaches :9090 POST /-/quit; reload the configuration by restarting."""
    command = service("prometheus").get("command", [])
    assert not [argument for argument in command if "enable-lifecycle" in argument]


# ---------------------------------------------------------------- credentials in compose
#
# No service in compose starts with a password anyone can guess (Grafana's admin/admin, RabbitMQ's
# guest/guest, a Redis without one). Each is a required variable, `${NAME:?message}`, which
# deploy/compose-env.sh generates into .env (read by compose, kept out of git and of the image).
# Compose interpolates the whole file for any command, even `up` of a few services and even for a
# service outside the active profiles, so the script writes every variable the file requires.

COMPOSE_ENV_SCRIPT = ROOT / "deploy" / "compose-env.sh"
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}")
_REQUIRED = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):?\?[^}]*\}$")


def required_variable(value: object) -> str | None:
    """NAME when *value* is exactly `${NAME:?message}` (or `${NAME?message}`), else None."""
    match = _REQUIRED.match(str(value or "").strip())
    return match["name"] if match else None


def substituted(value: str) -> str:
    """*value* with each `${NAME...}` replaced by `<NAME>` (so a URL of variables can be split)."""
    return _VARIABLE.sub(lambda match: f"<{match['name']}>", value)


def compose_required_variables() -> set[str]:
    text = COMPOSE.read_text(encoding="utf-8")
    return {match["name"] for match in _VARIABLE.finditer(text) if match["rest"].startswith(("?", ":?"))}


def url_credentials(url: str) -> tuple[str | None, str | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(substituted(url))
    return parts.username, parts.password


def test_compose_gives_no_secret_a_default() -> None:
    """`${GRAFANA_ADMIN_PASSWORD:-admin}` was a password everyone knows; a secret has no default."""
    for match in _VARIABLE.finditer(COMPOSE.read_text(encoding="utf-8")):
        if re.search(r"PASS|SECRET|TOKEN|KEY", match["name"]):
            assert match["rest"].startswith(("?", ":?")), f"{match.group(0)}: a secret must be required, not defaulted"


def test_compose_grafana_admin_password_is_required() -> None:
    env = environment(service("grafana"))
    assert required_variable(env.get("GF_SECURITY_ADMIN_PASSWORD")) == "GRAFANA_ADMIN_PASSWORD", env
    assert env.get("GF_SECURITY_ADMIN_USER", "admin") == "admin"


def test_compose_rabbitmq_user_is_not_guest_and_every_process_uses_its_credential() -> None:
    env = environment(service("rabbitmq"))
    user = env.get("RABBITMQ_DEFAULT_USER")
    assert user and user != "guest", "the image's default user is guest/guest"
    password = required_variable(env.get("RABBITMQ_DEFAULT_PASS"))
    assert password, f"RABBITMQ_DEFAULT_PASS must be a required variable: {env.get('RABBITMQ_DEFAULT_PASS')!r}"
    for name in sorted(PROCESS_TYPES):
        url = environment(service(name))["RABBITMQ_URL"]
        assert url_credentials(url) == (user, f"<{password}>"), f"{name}'s RABBITMQ_URL {url!r}"
    lines = COMPOSE.read_text(encoding="utf-8").splitlines()
    assert not [line for line in lines if "guest" in line and not line.lstrip().startswith("#")]


def test_compose_redis_requires_a_password_and_every_process_sends_it() -> None:
    redis = service("redis")
    tokens = command_tokens(redis["command"])
    assert "--requirepass" in tokens, tokens
    password = required_variable(tokens[tokens.index("--requirepass") + 1])
    assert password, f"--requirepass must be given a required variable: {tokens}"
    for name in sorted(PROCESS_TYPES):
        url = environment(service(name))["REDIS_URL"]
        assert url_credentials(url)[1] == f"<{password}>", f"{name}'s REDIS_URL {url!r}"
    # The health check authenticates (redis-cli reads REDISCLI_AUTH), or PING answers NOAUTH.
    assert required_variable(environment(redis).get("REDISCLI_AUTH")) == password
    assert "PONG" in " ".join(command_tokens(redis["healthcheck"]["test"]))


def _read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.partition("=") for line in path.read_text(encoding="utf-8").splitlines() if line and line[0] != "#")
    return {name: value for name, _, value in pairs}


def test_compose_env_script_generates_every_variable_compose_requires(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    target.write_text("# mine\nREDIS_PASSWORD=kept-as-it-is\n", encoding="utf-8")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(COMPOSE_ENV_SCRIPT), str(target)],
            env={"PATH": "/usr/bin:/bin", "GRAFANA_ADMIN_PASSWORD": "from-the-environment"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    first = run()
    assert first.returncode == 0, first.stderr
    values = _read_env_file(target)
    required = compose_required_variables()
    assert {"GRAFANA_ADMIN_PASSWORD", "RABBITMQ_PASSWORD", "REDIS_PASSWORD"} <= required
    assert required <= set(values), f"compose requires {sorted(required - set(values))}, which the script does not write"
    assert values["REDIS_PASSWORD"] == "kept-as-it-is"
    assert values["GRAFANA_ADMIN_PASSWORD"] == "from-the-environment"
    generated = values["RABBITMQ_PASSWORD"]
    assert re.fullmatch(r"[0-9a-f]{32,}", generated), "random, and safe in a URL without escaping"
    assert target.stat().st_mode & 0o077 == 0, "the file holds passwords: owner only"
    for value in values.values():
        assert value not in first.stdout + first.stderr, "the script never prints a password"
    assert run().returncode == 0
    assert _read_env_file(target) == values, "a second run changes nothing"


def test_the_env_file_stays_out_of_git_and_of_the_image() -> None:
    for ignore in (ROOT / ".gitignore", ROOT / ".dockerignore"):
        lines = {line.strip() for line in ignore.read_text(encoding="utf-8").splitlines()}
        assert lines & {".env", "/.env", ".env*", "*.env"}, f"{ignore.name} does not ignore .env"


def test_compose_redis_bounds_its_memory_and_evicts_only_keys_that_expire() -> None:
    """Cache entries expire and may be evicted; the fleet's breaker state, its override and the cache epoch have no
    TTL and must survive memory pressure (README "Redis memory"): volatile-lru never evicts a key without TTL."""
    tokens = command_tokens(service("redis")["command"])
    assert "--maxmemory" in tokens and tokens[tokens.index("--maxmemory") + 1] not in ("0", "0mb")
    assert "--maxmemory-policy" in tokens and tokens[tokens.index("--maxmemory-policy") + 1] == "volatile-lru"


def test_compose_env_script_makes_the_keys_compose_and_prometheus_use(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    done = subprocess.run(
        ["bash", str(COMPOSE_ENV_SCRIPT), str(target)], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    values = _read_env_file(target)
    keys = {key.name: key for key in parse_keys(values["BROWNOUT_API_KEYS"])}
    ring = KeyRing(keys.values())
    assert ring.find(values["BROWNOUT_METRICS_KEY"]) == keys["prometheus"] and keys["prometheus"].scopes == {"metrics"}
    assert ring.find(values["BROWNOUT_LOCAL_KEY"]) == keys["local"] and keys["local"].scopes == set(SCOPES)
    for name in ("web", "worker", "migrate"):
        assert required_variable(environment(service(name))["BROWNOUT_API_KEYS"]) == "BROWNOUT_API_KEYS", name
    assert service("prometheus")["secrets"] == ["brownout_metrics_key"]
