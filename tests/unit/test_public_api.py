"""Brownout's public surface, pinned: a change to it shows up here, on purpose, in review.

What a service may import is what `__all__` names in `brownout`, `brownout.fastapi` and
`brownout.migrations`; modules whose name starts with `_` are private. The reference service in
app/ is held to that, as any user's service would be.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import brownout

ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {
    "brownout": [
        "Applied", "BreakerState", "BrownoutDbError", "CachedRead", "CircuitBreaker", "CircuitOpenError", "Command",
        "CommitOutcomeUnknown", "ConfigurationError", "Database", "DatabaseUnavailable", "DeadlineExceeded",
        "DependencyMissing", "DependencyPending", "Dispatcher", "Effect", "Entry", "Envelope", "ErrorKind", "HealthMonitor",
        "InvalidCommand", "KeyConflict", "Lookup", "Metrics", "NotPermitted", "PendingReplay", "PublishRejected", "Publisher",
        "Queued", "ReadCache", "ReadOnlyMode", "ReadResult", "RedisLink", "RedisUnavailable", "Refused", "Registry",
        "RegistryNotFound", "Rejected", "Resilience", "RetryPolicy", "SafeLine", "SafeText", "Settings", "SingleFlight",
        "StaleReads",
        "UnknownCommand", "__version__", "add_email", "applied_commands", "build_redis_link", "check_db_health",
        "classify", "command_conflicts", "configure_logging", "dead_letters", "email_row", "emails_of",
        "execute_with_retry", "init_sentry",
        "install_log_masking", "invalidate_after_apply", "load_registry", "load_settings", "metadata",
        "normalise_database_url", "reason_summary", "recordset", "rows_param", "settings_from_values",
    ],
    "brownout.fastapi": [
        "BodyTooLarge", "Brownout", "BrownoutDep", "CachedRoute", "Caller", "CallerDep", "Criticality", "NonCritical",
        "NotStarted", "Shed", "current_caller", "field_errors", "get_brownout", "non_critical", "require_scope",
        "retry_after_header",
    ],
    "brownout.migrations": [
        "ADOPTED_REVISIONS", "MIGRATIONS", "VERSION_TABLE", "alembic_config", "skip_brownout_tables", "upgrade",
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_public_surface_is_what_it_was(name: str) -> None:
    module = importlib.import_module(name)
    assert list(module.__all__) == EXPECTED[name], "a deliberate change: update EXPECTED and say so in the changelog"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_public_name_resolves_to_a_public_or_documented_object(name: str) -> None:
    module = importlib.import_module(name)
    for attribute in module.__all__:
        assert getattr(module, attribute) is not None, f"{name}.{attribute}"


def defined_by_brownout(value: object) -> bool:
    return (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__.startswith("brownout")


@pytest.mark.parametrize("name", ["brownout.fastapi", "brownout.migrations"])
def test_all_names_every_public_object_the_module_defines(name: str) -> None:
    """What a user finds by `dir()` and what `__all__` says are the same (httpx's rule)."""
    module = importlib.import_module(name)
    public = {
        attribute
        for attribute, value in vars(module).items()
        if not attribute.startswith("_") and (defined_by_brownout(value) or attribute.isupper())
    }
    assert public <= set(module.__all__), f"public but not in __all__: {sorted(public - set(module.__all__))}"


def test_the_lazy_exports_and_the_type_checking_imports_agree() -> None:
    """`brownout` imports its names on first use; type checkers read the TYPE_CHECKING imports. Both must say
    the same module for the same name, or mypy and the running code disagree about what `brownout.X` is."""
    tree = ast.parse((ROOT / "src" / "brownout" / "__init__.py").read_text(encoding="utf-8"))
    declared: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom) and statement.module
                for alias in statement.names:
                    declared[alias.asname or alias.name] = statement.module
    assert declared == brownout._EXPORTS
    assert sorted(brownout._EXPORTS) == [name for name in brownout.__all__ if name != "__version__"]
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        brownout.Nothing  # noqa: B018


def test_import_brownout_loads_none_of_the_heavy_dependencies() -> None:
    """`brownout --version` and `--help` must not pay for SQLAlchemy, Dramatiq, pika and pydantic."""
    heavy = ("sqlalchemy", "dramatiq", "pika", "redis", "pydantic")
    probe = f"import sys, brownout; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def private_name(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))  # __version__ is public


def private_imports(path: Path) -> list[str]:
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "brownout" and any(private_name(part) for part in parts[1:]):
                found.append(f"{where}:{node.lineno} from {node.module}")
            if node.module == "brownout" and any(private_name(alias.name) for alias in node.names):
                found.append(f"{where}:{node.lineno} from brownout import _...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "brownout" and any(private_name(part) for part in parts[1:]):
                    found.append(f"{where}:{node.lineno} import {alias.name}")
    return found


def test_the_reference_service_uses_only_the_public_api() -> None:
    paths = sorted((ROOT / "app").rglob("*.py"))
    assert len(paths) > 10
    assert [found for path in paths for found in private_imports(path)] == []


def test_the_guard_sees_a_private_import(tmp_path: Path) -> None:
    sample = tmp_path / "service.py"
    sample.write_text(
        "from brownout._db import Database\nimport brownout._cache.pending\nfrom brownout import _settings, Database\n"
    )
    assert len(private_imports(sample)) == 3
