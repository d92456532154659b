"""A request's caller, once identified: a service key, the operator's token or an end user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CallerKind = Literal["service", "user", "unauthenticated"]


@dataclass(frozen=True)
class Caller:
    """*name* is what logs, metrics and idempotency scopes use: a key's NAME, `user:<id>`, never a secret."""

    kind: CallerKind
    name: str
    scopes: frozenset[str] = frozenset()
    user_id: str | None = None

    def may(self, *scopes: str) -> bool:
        """Whether the caller holds any of *scopes*."""
        return bool(self.scopes.intersection(scopes))

    @property
    def is_user(self) -> bool:
        return self.kind == "user"


OPERATOR = "admin-token"  # the name BROWNOUT_ADMIN_TOKEN's caller goes by
