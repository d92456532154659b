"""Who the caller is, as far as the process can tell: one check shared by every route that needs to know.

Today one credential exists, the operator's `BROWNOUT_ADMIN_TOKEN`, sent as
`Authorization: Bearer <token>`: it opens the `/admin/*` routes and the detail
of `/ready`. Compared with `hmac.compare_digest`, so the time taken does not
tell how much of a guess matched.
"""

from __future__ import annotations

import hmac

from brownout._settings import Settings


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, given = (authorization or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def is_operator(settings: Settings, authorization: str | None) -> bool:
    """Whether the request carries the admin token (False when none is configured)."""
    token = settings.admin_token
    given = bearer_token(authorization)
    if token is None or given is None:
        return False
    return hmac.compare_digest(given.encode(), token.get_secret_value().encode())
