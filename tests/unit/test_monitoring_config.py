"""The monitoring configuration under deploy/: Prometheus, its alert rules, Alertmanager and Grafana.

promtool (Debian package `prometheus`) and amtool (`prometheus-alertmanager`) check the files and run
the alert rules' unit tests (deploy/prometheus/alerts_test.yml). Without them these tests skip, except
under CI=true, where the set-up installs them and their absence is a failure.

Every metric the dashboard and the alert rules query must be one the code exports
(`brownout._observability.metrics.metric_names()` when it exists, else the contract below, `EXPORTED`),
one Prometheus makes itself (`up`), or the operating mode (`brownout_mode`).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yml"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "brownout.yml"
DASHBOARD = GRAFANA / "dashboards" / "brownout.json"
COMPOSE = ROOT / "docker-compose.yml"

# The metric families the code exports, as Prometheus names them (counters with `_total`,
# histograms by their base name).
EXPORTED = [
    "brownout_db_call_duration_seconds",
    "brownout_db_calls_total",
    "brownout_db_errors_total",
    "brownout_db_refused_total",
    "brownout_db_retries_total",
    "brownout_breaker_state",
    "brownout_breaker_transitions_total",
    "brownout_pool_connections",
    "brownout_health_check_up",
    "brownout_health_check_duration_seconds",
    "brownout_dispatch_total",
    "brownout_queue_messages",
    "brownout_delay_queue_messages",
    "brownout_queue_max_length",
    "brownout_dead_letters",
    "brownout_worker_messages_total",
    "brownout_worker_apply_duration_seconds",
    "brownout_worker_concurrency",
    "brownout_worker_batch_size",
    "brownout_cache_reads_total",
    "brownout_http_requests_total",
    "brownout_http_request_duration_seconds",
]

# Series Prometheus adds to every scrape.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
# The operating mode (read-write, read-only, read-only-automatic), a prometheus_client Enum: allowed
# before metric_names() lists it.
MODE_METRIC = "brownout_mode"

ALERT_NAMES = {
    "BrownoutDatabaseErrorRateHigh",
    "BrownoutSslErrorRateHigh",
    "BrownoutBreakerOpen",
    "BrownoutQueueBacklogGrowing",
    "BrownoutQueueNearlyFull",
    "BrownoutDelayQueueNearlyFull",
    "BrownoutDatabaseLatencyHigh",
    "BrownoutDeadLetters",
    "BrownoutBreakerFlapping",
    "BrownoutPoolNearlyFull",
    "BrownoutWebDown",
    "BrownoutWorkerDown",
    "BrownoutOutboxStuck",
    "BrownoutEmailCredentialsRejected",
}

PANEL_TITLES = {
    "Breaker state",
    "Database error rate",
    "SSL error rate",
    "Database latency (p50, p95, p99)",
    "Connection pool",
    "Dispatcher outcomes",
    "Queue depth and dead letters",
    "Cache hit and stale ratio",
    "Worker drain rate",
    "HTTP 5xx rate",
    "Mode",
    "Breaker openings",
    "Emails by backend and outcome",
    "Oldest unsent email",
}

# Every panel and query names its datasource through this variable, so the dashboard imports into any
# Grafana; provisioned, the variable opens on the provisioned datasource.
DATASOURCE_VARIABLE = "datasource"

# Alertmanager reads a webhook URL from a file (`url_file`) since 0.26.
AMTOOL_URL_FILE_SINCE = (0, 26)

# A PromQL expression less its strings, label matchers, ranges and groupings: each name left that is not
# called (a function, an aggregation), not a keyword and not inside a number (5m, 1e3) is a metric.
PROMQL_STRING = re.compile(r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|`[^`]*`")
PROMQL_BRACKETS = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
PROMQL_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE)
PROMQL_NAME = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(\s*\()?")
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
PROMQL_NUMBERS = {"inf", "nan"}
HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")
# Grafana's interval variables, replaced by a plain duration before promtool parses an expression.
GRAFANA_INTERVAL = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")


def _missing(what: str, install: str) -> NoReturn:
    message = f"{what} not found (install: {install})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI's set-up must install it")
    pytest.skip(message)


def _yaml() -> Any:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        _missing("PyYAML", "the project's test dependency group: bash deploy/setup.sh")


def _load_yaml(path: Path) -> Any:
    return _yaml().safe_load(path.read_text())


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(name, f"apt-get install -y --no-install-recommends {package}")
    return path


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, check=False)


def _assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"


def _exported() -> set[str]:
    """The code's own list when brownout._observability.metrics has metric_names(), else the contract."""
    try:
        module = importlib.import_module("brownout._observability.metrics")
    except ModuleNotFoundError as exc:
        if exc.name not in ("brownout._observability", "brownout._observability.metrics"):
            raise  # the module exists and one of its imports is missing: a real failure
        return set(EXPORTED)
    metric_names = getattr(module, "metric_names", None)
    if metric_names is None:
        return set(EXPORTED)
    names = set(metric_names())
    assert names, "brownout._observability.metrics.metric_names() is empty"
    return names


def _metrics_in(expr: str) -> set[str]:
    """The metric names an expression queries, histograms by their base name."""
    bare = PROMQL_GROUPING.sub(" ", PROMQL_BRACKETS.sub(" ", PROMQL_STRING.sub(" ", expr)))
    names = {
        name for name, call in PROMQL_NAME.findall(bare) if not call and name.lower() not in PROMQL_KEYWORDS | PROMQL_NUMBERS
    }
    return {HISTOGRAM_SERIES.sub("", name) for name in names}


def _unknown_metrics(expr: str, exported: set[str]) -> list[str]:
    return sorted(_metrics_in(expr) - exported - PROMETHEUS_BUILTINS - {MODE_METRIC})


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # inside collapsed rows


def _dashboard_exprs() -> dict[str, str]:
    """Each PromQL expression of the dashboard, keyed by panel title and refId."""
    exprs = {}
    for panel in _panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs[f"{panel['title']} / {target.get('refId', '?')}"] = target["expr"]
    return exprs


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule]


# --- promtool and amtool -------------------------------------------------------------------------


def test_alert_rules_are_valid() -> None:
    _assert_ok(_run(_tool("promtool", "prometheus"), "check", "rules", ALERTS))


def test_alert_rules_pass_their_unit_tests() -> None:
    _assert_ok(_run(_tool("promtool", "prometheus"), "test", "rules", ALERTS_TEST))


METRICS_KEY_FILE = "/run/secrets/brownout_metrics_key"  # where compose mounts Prometheus's key


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    """Checked as compose runs it: the rule files beside it, the key file where the secret is mounted."""
    text = PROMETHEUS_CONFIG.read_text(encoding="utf-8")
    assert text.count(f"credentials_file: {METRICS_KEY_FILE}") == 2, "both scrapes send the metrics key"
    key = tmp_path / "brownout_metrics_key"
    key.write_text("bo_" + "0" * 43, encoding="utf-8")
    for rules in PROMETHEUS_CONFIG.parent.glob("*.yml"):
        (tmp_path / rules.name).write_text(rules.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / PROMETHEUS_CONFIG.name).write_text(text.replace(METRICS_KEY_FILE, str(key)), encoding="utf-8")
    _assert_ok(_run(_tool("promtool", "prometheus"), "check", "config", tmp_path / PROMETHEUS_CONFIG.name))


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard query, as a recording rule."""
    promtool = _tool("promtool", "prometheus")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": GRAFANA_INTERVAL.sub("5m", expr)}
        for i, expr in enumerate(_dashboard_exprs().values())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    _assert_ok(_run(promtool, "check", "rules", path))


def _amtool_version(amtool: str) -> tuple[int, int]:
    result = _run(amtool, "--version")
    found = re.search(r"version (\d+)\.(\d+)", result.stdout + result.stderr)
    assert found, f"cannot read amtool's version from: {result.stdout}{result.stderr}"
    return int(found[1]), int(found[2])


def _check_alertmanager_config(config: Path, tmp_path: Path) -> None:
    amtool = _tool("amtool", "prometheus-alertmanager")
    if _amtool_version(amtool) < AMTOOL_URL_FILE_SINCE:
        # This amtool does not know `url_file`: check the rest with a placeholder URL.
        text = config.read_text()
        assert "url_file: /etc/alertmanager/webhook_url" in text
        config = tmp_path / "alertmanager-checked.yml"
        config.write_text(text.replace("url_file: /etc/alertmanager/webhook_url", "url: http://127.0.0.1:9/placeholder"))
    _assert_ok(_run(amtool, "check-config", config))


def test_alertmanager_config_is_valid(tmp_path: Path) -> None:
    _check_alertmanager_config(ALERTMANAGER_CONFIG, tmp_path)


# --- Alertmanager's start-up script (docker-compose.yml) ---------------------------------------------


def _start_alertmanager(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The compose service's start-up script, run by sh with its folders under *tmp_path*, up to the exec."""
    entrypoint = _load_yaml(COMPOSE)["services"]["alertmanager"]["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-ec"], entrypoint
    script = entrypoint[2].replace("$$", "$")  # compose's escape
    assert "exec /bin/alertmanager " in script
    source, target = tmp_path / "alertmanager-config", tmp_path / "alertmanager"
    shutil.copytree(ALERTMANAGER_CONFIG.parent, source)
    target.mkdir()
    script = script.replace("/etc/alertmanager-config", str(source)).replace("/etc/alertmanager", str(target))
    script = script.replace("exec /bin/alertmanager ", "exit 0 # ")
    return subprocess.run(
        ["sh", "-ec", script], env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=30, check=False
    )


def test_alertmanager_starts_with_the_webhook_by_default(tmp_path: Path) -> None:
    environment = _load_yaml(COMPOSE)["services"]["alertmanager"]["environment"]
    assert environment["ALERT_RECEIVER"] == "${ALERT_RECEIVER:-webhook}"
    assert environment["ALERT_PAGERDUTY_ROUTING_KEY"] is None, "passed through from compose's environment, no default"
    _assert_ok(_start_alertmanager(tmp_path, ALERT_RECEIVER="webhook", ALERT_WEBHOOK_URL="https://hooks.example/T0/B0"))
    written = tmp_path / "alertmanager"
    assert _load_yaml(written / "alertmanager.yml")["route"]["receiver"] == "webhook"
    assert (written / "webhook_url").read_text() == "https://hooks.example/T0/B0"
    assert (written / "webhook_url").stat().st_mode & 0o077 == 0, "a secret readable by others"
    _check_alertmanager_config(written / "alertmanager.yml", tmp_path)


def test_alertmanager_starts_with_pagerduty_when_chosen(tmp_path: Path) -> None:
    result = _start_alertmanager(tmp_path, ALERT_RECEIVER="pagerduty", ALERT_PAGERDUTY_ROUTING_KEY="R0UT1NGKEY")
    _assert_ok(result)
    written = tmp_path / "alertmanager"
    config = _load_yaml(written / "alertmanager.yml")
    assert config["route"]["receiver"] == "pagerduty"
    # The rest of the file is the repository's, untouched.
    assert {**config, "route": {}} == {**_load_yaml(ALERTMANAGER_CONFIG), "route": {}}
    assert (written / "pagerduty_routing_key").read_text() == "R0UT1NGKEY"
    assert (written / "pagerduty_routing_key").stat().st_mode & 0o077 == 0, "a secret readable by others"
    _check_alertmanager_config(written / "alertmanager.yml", tmp_path)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ALERT_RECEIVER": "pagerduty"}, "needs ALERT_PAGERDUTY_ROUTING_KEY"),
        ({"ALERT_RECEIVER": "slack", "ALERT_PAGERDUTY_ROUTING_KEY": "R0UT1NGKEY"}, "webhook or pagerduty"),
        ({}, "webhook or pagerduty"),
    ],
)
def test_alertmanager_refuses_to_start_without_a_usable_receiver(tmp_path: Path, env: dict[str, str], message: str) -> None:
    result = _start_alertmanager(tmp_path, **env)
    assert result.returncode != 0 and message in result.stderr, result


# --- structure -------------------------------------------------------------------------------------


def test_prometheus_scrapes_web_and_worker_and_alerts_through_alertmanager() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) >= {"brownout-web", "brownout-worker"}
    for name, target in (("brownout-web", "web:8000"), ("brownout-worker", "worker:9191")):
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
        assert [t for c in jobs[name]["static_configs"] for t in c["targets"]] == [target]
    assert config["rule_files"] == ["alerts.yml"]
    targets = [t for am in config["alerting"]["alertmanagers"] for c in am["static_configs"] for t in c["targets"]]
    assert targets == ["alertmanager:9093"]


def test_every_alert_has_severity_summary_and_description_and_is_tested() -> None:
    rules = _alert_rules()
    assert {rule["alert"] for rule in rules} == ALERT_NAMES
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]

    # Each alert has a test case where it fires and one where it does not.
    firing: set[str] = set()
    silent: set[str] = set()
    for case in _load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == ALERT_NAMES, f"alerts without a firing case: {ALERT_NAMES - firing}"
    assert silent == ALERT_NAMES, f"alerts without a silent case: {ALERT_NAMES - silent}"


def test_alertmanager_reads_its_secrets_from_the_files_the_container_writes() -> None:
    config = _load_yaml(ALERTMANAGER_CONFIG)
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers) == {"webhook", "pagerduty"}
    assert config["route"]["receiver"] == "webhook"
    hooks = [hook for r in receivers.values() for hook in r.get("webhook_configs", [])]
    assert hooks and all(hook.get("url_file") == "/etc/alertmanager/webhook_url" and "url" not in hook for hook in hooks)
    pagers = [pager for r in receivers.values() for pager in r.get("pagerduty_configs", [])]
    assert pagers and all(
        pager.get("routing_key_file") == "/etc/alertmanager/pagerduty_routing_key" and "routing_key" not in pager
        for pager in pagers
    )


def test_dashboard_has_the_panels_and_takes_its_datasource_from_a_variable() -> None:
    datasources = _load_yaml(DATASOURCES)["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    uid = datasources[0]["uid"]

    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    variable = variables[DATASOURCE_VARIABLE]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    assert variable.get("current", {}).get("value", uid) == uid, "provisioned, it opens on another datasource"
    rest = json.dumps({**dashboard, "templating": {"list": [v for v in variables.values() if v is not variable]}})
    assert uid not in rest, "a panel names the provisioned datasource instead of the variable"
    panels = list(_panels(dashboard["panels"]))
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    assert PANEL_TITLES <= set(titles), f"missing panels: {PANEL_TITLES - set(titles)}"
    assert len({p["id"] for p in panels}) == len(panels), "duplicate panel ids"
    for panel in panels:
        if panel.get("type") == "row":
            continue
        for owner in [panel, *panel.get("targets", [])]:
            assert owner.get("datasource") == {"type": "prometheus", "uid": f"${{{DATASOURCE_VARIABLE}}}"}, panel["title"]
        assert panel.get("targets"), panel["title"]

    provider = _load_yaml(DASHBOARD_PROVIDER)["providers"]
    assert [p["type"] for p in provider] == ["file"]
    assert provider[0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_shows_the_mode_and_the_breaker_openings() -> None:
    exprs = _dashboard_exprs()
    mode = [expr for where, expr in exprs.items() if where.startswith("Mode / ")]
    assert mode and all(_metrics_in(expr) == {MODE_METRIC} for expr in mode)
    openings = [expr for where, expr in exprs.items() if where.startswith("Breaker openings / ")]
    assert any('brownout_breaker_transitions_total{to="open"}' in expr for expr in openings)


# --- metric names ----------------------------------------------------------------------------------


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = _exported()
    exprs = _dashboard_exprs()
    assert exprs
    unknown = {where: _unknown_metrics(expr, exported) for where, expr in exprs.items() if _unknown_metrics(expr, exported)}
    assert not unknown, f"dashboard queries metrics the code does not export: {unknown}"
    assert all(_metrics_in(expr) for expr in exprs.values()), "a dashboard query without a metric"


def test_alert_rules_query_only_exported_metrics() -> None:
    exported = _exported()
    rules = _alert_rules()
    unknown = {r["alert"]: _unknown_metrics(r["expr"], exported) for r in rules if _unknown_metrics(r["expr"], exported)}
    assert not unknown, f"alert rules query metrics the code does not export: {unknown}"
    assert all(_metrics_in(r["expr"]) for r in rules)


def test_metric_name_extraction() -> None:
    expr = 'histogram_quantile(0.95, sum by (le) (rate(brownout_db_call_duration_seconds_bucket{result="ok"}[5m])))'
    assert _metrics_in(expr) == {"brownout_db_call_duration_seconds"}
    assert _metrics_in("sum(rate(brownout_dispatch_total[5m])) / brownout_x_count") == {"brownout_dispatch_total", "brownout_x"}
    assert _metrics_in('up{job="brownout-web"} == 0 or absent(up{job="brownout-web"})') == {"up"}
    # Label names in groupings and matchers, keywords, numbers, durations and strings are no metrics.
    grouped = "max by (breaker) (brownout_breaker_state) / on (job) group_left () (x_total > bool 1e3) offset 5m"
    assert _metrics_in(grouped) == {"brownout_breaker_state", "x_total"}
    assert _metrics_in('label_replace(up, "a", "b_c", "job", "(.*)") > Inf or vector(0.8)') == {"up"}
    assert _metrics_in("rate(brownout_x_total[$__rate_interval])") == {"brownout_x_total"}
    assert _unknown_metrics("max by (brownout_mode) (brownout_mode) == 1 or up or brownout_nope", set()) == ["brownout_nope"]
