""".railway/railway.py, evaluated offline as Railway's CLI evaluates it, checked field by field.

The CLI runs `python3 -c <script> .railway/railway.py`: it loads the file as a module, reads PARTIAL, calls
`main` and prints the graph as JSON. EVALUATE below is that script, run with this interpreter (which has the
pinned railway-sdk). Every field is then held against what it must agree with: the Procfile's lines, the
names src/brownout/_settings.py reads (and a validation of the literal values by Settings itself), the ports the
processes listen on, docker-compose.yml's RabbitMQ, and the rule that secrets are preserved, never written.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from brownout import cli
from brownout._settings import Settings, load_settings
from tests.unit.test_deploy_files import (
    EXTRA_ENV,
    ROOT,
    assert_runs_process,
    command_tokens,
    procfile,
    settings_env_names,
)
from tests.unit.test_deploy_files import (
    service as compose_service,
)

IAC = ROOT / ".railway" / "railway.py"

EVALUATE = """
import importlib.util, json, sys
path = sys.argv[1]
spec = importlib.util.spec_from_file_location("railway_sdk_user", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
partial = getattr(mod, "PARTIAL", None) or getattr(mod, "Partial", None) or getattr(mod, "partial", None)
candidate = getattr(mod, "main", None) or getattr(mod, "Railway", None) or getattr(mod, "default", None)
project = candidate() if callable(candidate) else candidate
if hasattr(project, "to_graph"):
    project = project.to_graph()
print(json.dumps({"partial": partial, "project": project}, default=str))
"""

WEB, WORKER, REDIS, RABBITMQ = "brownout-web", "brownout-worker", "brownout-redis", "brownout-rabbitmq"
# Settings whose values are credentials or carry them: a Railway variable set by hand, never in the file.
SECRETS = {"DATABASE_URL", "MIGRATION_DATABASE_URL", "SENTRY_DSN", "EMAIL_URL", "SMTP_URL", "BROWNOUT_ADMIN_TOKEN"}
BUDGET = {
    "BROWNOUT_POOLER_CONNECTION_LIMIT",
    "BROWNOUT_WEB_REPLICAS",
    "BROWNOUT_WEB_PROCESSES",
    "BROWNOUT_WORKER_REPLICAS",
    "BROWNOUT_WORKER_PROCESSES",
}
_TEMPLATE = re.compile(r"\$\{\{([^}.]+)\.([A-Z_]+)\}\}")


@pytest.fixture(scope="module")
def evaluated() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", EVALUATE, str(IAC)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict)
    return payload


@pytest.fixture(scope="module")
def resources(evaluated: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {resource["address"]: resource for resource in evaluated["project"]["resources"]}


def node(resources: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    matches = [resource for resource in resources.values() if resource["name"] == name]
    assert len(matches) == 1, f"{name}: {len(matches)} resources"
    return matches[0]


def variables(resource: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(resource.get("variables") or {})


def literal(resource: dict[str, Any], name: str) -> str:
    variable = variables(resource)[name]
    assert variable["type"] == "literal", (resource["name"], name, variable)
    return str(variable["value"])


def load_iac_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("railway_iac_under_test", IAC)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the graph as a whole


def test_it_is_a_named_partial_holding_only_brownouts_resources(evaluated: dict[str, Any], resources: dict[str, Any]) -> None:
    assert evaluated["partial"] == "brownout"
    assert re.fullmatch(r"[a-zA-Z0-9._-]{1,64}", evaluated["partial"])  # the CLI's rule for partial names
    assert set(resources) == {
        f"database.{REDIS}",
        f"service.{RABBITMQ}",
        f"volume.{RABBITMQ}-data",
        f"service.{WEB}",
        f"service.{WORKER}",
    }
    # Applied inside a team's project, no name can claim one of their resources by accident.
    assert all(resource["name"].startswith("brownout-") for resource in resources.values())


@pytest.mark.parametrize("name", [WEB, WORKER])
def test_both_dynos_are_built_from_the_dockerfile(resources: dict[str, Any], name: str) -> None:
    resource = node(resources, name)
    assert resource["build"] == {"builder": "DOCKERFILE", "dockerfilePath": "Dockerfile"}
    assert (ROOT / resource["build"]["dockerfilePath"]).is_file()
    assert "source" not in resource  # GITHUB_REPOSITORY is None by default: connected by the user


@pytest.mark.parametrize(("name", "process_type"), [(WEB, "web"), (WORKER, "worker")])
def test_start_commands_are_the_procfile_lines(resources: dict[str, Any], name: str, process_type: str) -> None:
    deploy = node(resources, name)["deploy"]
    assert_runs_process(command_tokens(deploy["startCommand"]), process_type, f"{name}'s startCommand")


def test_the_web_health_check_is_liveness_with_room_to_start(resources: dict[str, Any]) -> None:
    deploy = node(resources, WEB)["deploy"]
    assert deploy["healthcheckPath"] == "/health"
    assert deploy["healthcheckTimeout"] >= 60


def test_the_worker_has_no_http_health_check(resources: dict[str, Any]) -> None:
    assert "healthcheckPath" not in node(resources, WORKER)["deploy"]


def test_draining_and_restart_policies(resources: dict[str, Any]) -> None:
    web, worker = node(resources, WEB)["deploy"], node(resources, WORKER)["deploy"]
    assert web["drainingSeconds"] > cli.WEB_GRACEFUL_SHUTDOWN_SECONDS
    # 10 s for in-flight applies, then the hand-back to RabbitMQ (the Procfile's comment says >= 25 s)
    assert worker["drainingSeconds"] >= 25 and cli.WORKER_SHUTDOWN_TIMEOUT_MS <= 10_000
    for deploy in (web, worker):
        assert deploy["restartPolicyType"] == "ON_FAILURE"
        assert deploy["restartPolicyMaxRetries"] >= 1
    assert node(resources, RABBITMQ)["deploy"]["restartPolicyType"] == "ALWAYS"


@pytest.mark.parametrize(("name", "variable"), [(WEB, "BROWNOUT_WEB_REPLICAS"), (WORKER, "BROWNOUT_WORKER_REPLICAS")])
def test_replicas_and_the_connection_budget_agree(resources: dict[str, Any], name: str, variable: str) -> None:
    resource = node(resources, name)
    assert resource["deploy"]["numReplicas"] == int(literal(resource, variable)) >= 1


@pytest.mark.parametrize("name", [WEB, WORKER])
def test_pre_deploy_runs_the_release_line(resources: dict[str, Any], name: str) -> None:
    """The migration; `python -m app migrate` itself prefers MIGRATION_DATABASE_URL (tests/integration/test_migrations.py)."""
    (command,) = node(resources, name)["deploy"]["preDeployCommand"]
    assert_runs_process(command_tokens(command), "release", f"{name}'s preDeployCommand")
    assert "migrate" in procfile()["release"]


@pytest.mark.parametrize("password", ["", "0123abcd"])
def test_rabbitmq_refuses_to_start_without_its_password(tmp_path: Path, resources: dict[str, Any], password: str) -> None:
    """Started without it, RabbitMQ would create its user with the default password, once and for good."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker-entrypoint.sh"
    fake.write_text('#!/bin/sh\necho "entrypoint $*"\n', encoding="utf-8")
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RABBITMQ_DEFAULT_PASS": password}
    tokens = command_tokens(node(resources, RABBITMQ)["deploy"]["startCommand"])
    result = subprocess.run(tokens, env=env, capture_output=True, text=True, timeout=30, check=False)
    if password:
        assert (result.returncode, result.stdout.strip()) == (0, "entrypoint rabbitmq-server")
    else:
        assert result.returncode != 0 and "RABBITMQ_DEFAULT_PASS" in result.stderr and not result.stdout


# ---------------------------------------------------------------- variables


@pytest.mark.parametrize("name", [WEB, WORKER])
def test_variables_are_settings_and_the_required_ones_are_there(resources: dict[str, Any], name: str) -> None:
    names = set(variables(node(resources, name)))
    unknown = names - settings_env_names() - EXTRA_ENV
    assert not unknown, f"{name} sets variables src/brownout/_settings.py does not read: {sorted(unknown)}"
    assert {"DATABASE_URL", "RABBITMQ_URL", "REDIS_URL", "BROWNOUT_DATABASE_POOLER", *BUDGET} <= names
    assert literal(node(resources, name), "BROWNOUT_DATABASE_POOLER") == "transaction"  # Supabase's :6543


@pytest.mark.parametrize("name", [WEB, WORKER])
def test_secrets_are_preserved_never_written(resources: dict[str, Any], name: str) -> None:
    for variable_name, variable in variables(node(resources, name)).items():
        if variable_name in SECRETS:
            assert variable == {"type": "preserve"}, variable_name
        elif variable["type"] == "literal":
            # A URL may carry a user name, but its password only as a reference to another service's variable.
            value = str(variable["value"])
            credentials = re.search(r"://([^/@]*)@", value)
            if credentials and ":" in credentials.group(1):
                assert _TEMPLATE.fullmatch(credentials.group(1).split(":", 1)[1]), (variable_name, value)
    broker = node(resources, RABBITMQ)
    assert variables(broker)["RABBITMQ_DEFAULT_PASS"] == {"type": "preserve"}


@pytest.mark.parametrize("name", [WEB, WORKER])
def test_the_literal_values_are_valid_settings(resources: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Settings makes of every literal, with stand-ins for the secrets and references."""
    for variable in settings_env_names() | EXTRA_ENV:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@pooler.example:6543/postgres?sslmode=require")
    monkeypatch.setenv("REDIS_URL", "redis://default:p@brownout-redis.railway.internal:6379")
    for variable_name, variable in variables(node(resources, name)).items():
        if variable["type"] == "literal":
            monkeypatch.setenv(variable_name, _TEMPLATE.sub("x", str(variable["value"])))
    settings = load_settings()
    assert settings.database_pooler == "transaction"
    assert settings.web_replicas == node(resources, WEB)["deploy"]["numReplicas"]
    assert settings.worker_replicas == node(resources, WORKER)["deploy"]["numReplicas"]


@pytest.mark.parametrize("name", [WEB, WORKER])
def test_redis_and_rabbitmq_are_the_ones_declared_here(resources: dict[str, Any], name: str) -> None:
    resource = node(resources, name)
    assert variables(resource)["REDIS_URL"] == {"type": "reference", "resource": f"database.{REDIS}", "output": "REDIS_URL"}
    url = literal(resource, "RABBITMQ_URL")
    assert url.startswith("amqp://")  # the private network: no TLS hop inside Railway
    referenced = {service_name for service_name, _ in _TEMPLATE.findall(url)}
    assert referenced == {RABBITMQ}
    assert "${{" + RABBITMQ + ".RAILWAY_PRIVATE_DOMAIN}}:5672/" in url
    assert url.split("://", 1)[1].split(":", 1)[0] == literal(node(resources, RABBITMQ), "RABBITMQ_DEFAULT_USER")


def test_the_worker_metrics_port_is_the_one_it_serves(resources: dict[str, Any]) -> None:
    port = literal(node(resources, WORKER), "BROWNOUT_METRICS_PORT")
    assert int(port) == Settings.model_fields["metrics_port"].default
    assert "BROWNOUT_METRICS_PORT" not in variables(node(resources, WEB))  # the web serves /metrics on $PORT


def test_rabbitmq_keeps_its_data_across_deploys_and_matches_compose(resources: dict[str, Any]) -> None:
    broker = node(resources, RABBITMQ)
    assert broker["volumeAttachments"][f"{RABBITMQ}-data"]["mountPath"] == "/var/lib/rabbitmq"
    assert literal(broker, "RABBITMQ_NODENAME") == "rabbit@localhost"  # not the container's changing host name
    image = broker["source"]["image"]
    compose_image = compose_service("rabbitmq")["image"]
    assert image.split(":")[0] == compose_image.split(":")[0] == "rabbitmq"
    assert image.split(":")[1].split("-")[0] == compose_image.split(":")[1].split("-")[0]


def test_a_github_repository_becomes_both_services_source() -> None:
    module = load_iac_module()
    module.GITHUB_REPOSITORY = "example-org/brownout"
    graph = module.main().to_graph()
    sources = {resource["name"]: resource.get("source") for resource in graph["resources"]}
    expected = {"type": "github", "repo": "example-org/brownout", "branch": "main"}
    assert sources[WEB] == sources[WORKER] == expected


def test_the_config_as_code_files_are_gone() -> None:
    assert not list(ROOT.glob("railway*.toml")) and not list(ROOT.glob("railway*.json"))
