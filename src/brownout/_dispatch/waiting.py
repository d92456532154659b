"""How long a queued write may wait, and by what it is told: the message options a deferral carries.

A queued write that cannot apply yet is deferred (re-enqueued with a delay), never failed for waiting:

- its version is newer than this release knows (queued by a newer web process during a rolling deploy):
  it waits until a release that knows it is deployed, up to `unknown_version_seconds` (hours);
  then it is kept as a dead letter, to replay once that release is out;
- it needs a write not applied yet (an update of an entity whose creation is still queued):
  it waits up to `dependency_seconds`; then, the entity never having been created, the update ends
  as an outcome of its own, ``dropped``, recorded in `applied_commands` with its reason (visible at
  ``/commands/{id}``): not a failure, not a dead letter, nothing to alert on.

The wait is measured from the first deferral (`SINCE_OPTION`, wall-clock seconds), not counted in
deferrals, so it means the same whatever the delays. A replay from the dead letters starts it afresh
(`fresh_options`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFERRALS_OPTION = "brownout_deferrals"  # deferrals so far: the next delay's exponent
SINCE_OPTION = "brownout_waiting_since"  # wall-clock seconds of the first deferral

_WAIT_OPTIONS = (DEFERRALS_OPTION, SINCE_OPTION)


def _number(value: Any, default: float) -> float:
    """An option from a message: a hand-published or corrupted one must not fail its whole batch."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)


def deferrals(options: Mapping[str, Any]) -> int:
    return max(0, int(_number(options.get(DEFERRALS_OPTION), 0)))


def waiting_since(options: Mapping[str, Any], now: float) -> float:
    return _number(options.get(SINCE_OPTION), now)


def deferred_options(options: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The options of the message enqueued again: one deferral more, the wait's start kept."""
    return {**options, DEFERRALS_OPTION: deferrals(options) + 1, SINCE_OPTION: waiting_since(options, now)}


def fresh_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """*options* with no wait behind them (a replay starts its wait afresh)."""
    return {name: value for name, value in options.items() if name not in _WAIT_OPTIONS}


@dataclass(frozen=True)
class WaitLimits:
    unknown_version_seconds: float = 24 * 3600.0
    dependency_seconds: float = 3600.0
