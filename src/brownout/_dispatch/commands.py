"""The registry of named, versioned write commands.

A command says how to validate its payload (a pydantic model per version),
which entity it writes (the unit of ordering), which ids it hands out, and
how to apply itself inside a transaction (and, optionally, how to apply
several at once, for the worker's group commit). Applying must be deterministic
given the envelope: the same envelope may be applied by the web process or by
a worker, and `apply.py` makes sure only one of them takes effect.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sqlalchemy.orm import Session

from brownout._dispatch.envelope import Envelope


class CommandError(Exception):
    """Raised for a write that cannot be accepted or applied as it is."""


class UnknownCommand(CommandError):
    """Raised when a name or a version is not in this process's registry (yet)."""


class DependencyPending(CommandError):
    """Raised by apply when the write needs an earlier one that is not applied yet
    (an update of an entity whose creation is still queued): try again later."""


class DependencyMissing(CommandError):
    """Raised by the dispatcher's direct path when the write needs an entity that is not in the database and
    that the caller knows no queued creation of (HTTP 404): queued, it would only wait out its wait and be
    dropped. Nothing is queued or recorded, so the same request may succeed once the entity exists."""

    def __init__(self, entity_key: str) -> None:
        self.entity_key = entity_key
        kind, _, ident = entity_key.partition(":")
        super().__init__(f"{kind} {ident} not found")


class Refused(CommandError):
    """Raised by apply when the write cannot take effect for a reason of its own data, one the payload's model
    could not see (a reference to nothing, a rule of the domain). HTTP 422 with *reason* on the direct path,
    nothing recorded; the worker records a queued one ``dropped`` with *reason* (its command's status), never a
    dead letter. Raise it instead of letting a constraint fail: that is a 500 now and a dead letter later."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class NotPermitted(Refused):
    """Raised by apply when the write's caller may not write this entity. Answered as an entity that does not
    exist: DependencyMissing's 404 in the same words on the direct path (nothing recorded), and in the worker a
    wait as DependencyPending's in the words "<kind> <id> not found", then dropped: raise DependencyPending with
    those words for a missing entity, and a caller cannot tell the two apart, at once or later."""

    def __init__(self, entity_key: str, reason: str | None = None) -> None:
        self.entity_key = entity_key
        kind, _, ident = entity_key.partition(":")
        super().__init__(reason or f"not the caller's {kind}")
        self.args = (f"{kind} {ident} not found",)


@dataclass(frozen=True)
class Effect:
    """What applying did: the resulting entity, and whether a later write had already won (or nothing was done)."""

    result: dict[str, Any]
    superseded: bool = False
    dropped: bool = False  # no effect at all: the write waited for a prerequisite that never came


@dataclass(frozen=True)
class Command:
    name: str
    versions: Mapping[int, type[BaseModel]]
    scope: Callable[[BaseModel], str]
    """Caller scope of an idempotency key (e.g. "user:42"), from the payload."""
    entity: Callable[[BaseModel, uuid.UUID], uuid.UUID]
    """The entity written, given the payload and the id derived from the key."""
    apply: Callable[[Session, Envelope, BaseModel], Effect]
    entity_kind: str = "entity"
    apply_many: Callable[[Session, Sequence[tuple[Envelope, BaseModel]]], list[Effect]] | None = None
    """Optional: the effects of several envelopes in fewer statements, as `apply` on each in order
    would leave them (one Effect each, in order); raising fails them all (the caller then applies
    them one by one)."""

    @property
    def current_version(self) -> int:
        return max(self.versions)

    def parse(self, version: int, payload: Mapping[str, Any]) -> BaseModel:
        model = self.versions.get(version)
        if model is None:
            raise UnknownCommand(f"{self.name} v{version} is not known to this release")
        return model.model_validate(payload)


AfterApply = Callable[[Sequence[tuple[dict[str, Any], bool]]], None]
"""Told each batch the worker committed, as (result, current) pairs, current False for a duplicate (whose
result is the first apply's): a service's read side updates its cache. Best effort, after the COMMIT."""


@dataclass
class Registry:
    commands: dict[str, Command] = field(default_factory=dict)
    after_apply: Callable[[Any], AfterApply | None] | None = None
    """Optional: builds the worker's after-apply hook from its Settings (None: nothing to tell), so queued
    writes reach the service's cache when applied; without one, cached copies age out on their own."""

    def register(self, command: Command) -> Command:
        if command.name in self.commands:
            raise ValueError(f"command {command.name!r} registered twice")
        self.commands[command.name] = command
        return command

    def get(self, name: str) -> Command:
        try:
            return self.commands[name]
        except KeyError:
            raise UnknownCommand(f"unknown command {name!r}") from None


class RegistryNotFound(Exception):
    """The `module:attribute` naming a service's commands does not lead to a Registry."""


def load_registry(spec: str) -> Registry:
    """The Registry at *spec* (`module:attribute`): a Registry, or a function that returns one.

    How the worker finds a service's commands (BROWNOUT_COMMANDS): the module is imported in each
    worker process, so its import must not connect to anything."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RegistryNotFound(f"{spec!r}: expected module:attribute, e.g. myservice.commands:registry")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryNotFound(f"{spec!r}: cannot import {module_name}: {exc}") from None
    found = getattr(module, attribute, None)
    if found is None:
        raise RegistryNotFound(f"{spec!r}: {module_name} has no attribute {attribute!r}")
    registry = found() if callable(found) and not isinstance(found, Registry) else found
    if not isinstance(registry, Registry):
        raise RegistryNotFound(f"{spec!r} is a {type(registry).__name__}, not a brownout Registry")
    return registry
