"""The two request mixes, and the ids of the rows seeded for them (the same formula in SQL and here).

Cached: item reads of a few hundred notifications read once beforehand, so they are fresh in Redis.
Uncached: of every 5 requests, 1 creation, 2 item reads and 2 list reads; each read names a row or a
user never read before in the run (a cursor over seeded rows), so its cache entry is missing."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

CACHED_ITEMS = 400
UNCACHED_ITEMS = 40_000  # item reads of the uncached mix: one fresh row each
LIST_USERS = 30_000  # list reads of the uncached mix: one fresh user each, ROWS_PER_USER rows apiece
ROWS_PER_USER = 3
PATTERN = ("create", "item", "list", "item", "list")  # the uncached mix, in turn: 20 % / 40 % / 40 %
MIX_TEXT = {
    "cached": f"GET /notifications/{{id}} of {CACHED_ITEMS} notifications warm in Redis",
    "uncached": "1/5 POST /notifications, 2/5 GET /notifications/{id} (entry missing), 2/5 GET /users/{id}/notifications",
}


def seeded_id(family: str, index: int) -> str:
    """md5(family || index)::uuid, as the seeding SQL computes it."""
    return str(uuid.UUID(hashlib.md5(f"{family}{index}".encode()).hexdigest()))  # noqa: S324 - an id, not a secret


SEED_SQL = """
INSERT INTO notifications (id, user_id, email, subject, body, created_at)
SELECT md5('c' || i)::uuid, 'cu' || (i %% 100), 'c@example.com', 'cached ' || i, repeat('x', 200), now()
  FROM generate_series(0, %(cached)s - 1) AS i
UNION ALL
SELECT md5('i' || i)::uuid, 'iu' || (i %% 1000), 'i@example.com', 'item ' || i, repeat('x', 200), now()
  FROM generate_series(0, %(items)s - 1) AS i
UNION ALL
SELECT md5('l' || i)::uuid, 'lu' || (i / %(per_user)s), 'l@example.com', 'list ' || i, repeat('x', 200),
       now() - (i %% %(per_user)s) * interval '1 second'
  FROM generate_series(0, %(users)s * %(per_user)s - 1) AS i
"""
SEED_PARAMS = {"cached": CACHED_ITEMS, "items": UNCACHED_ITEMS, "users": LIST_USERS, "per_user": ROWS_PER_USER}


class Mix:
    """The i-th request of a step: (kind, method, path, body, headers). Cheap: no randomness, no JSON parse."""

    def __init__(self, name: str, tag: str, item_start: int, list_start: int) -> None:
        self.name, self.tag = name, tag
        self.item_next, self.list_next = item_start, list_start
        self.items_used = self.lists_used = 0

    def request(self, index: int) -> tuple[str, str, str, bytes, dict[str, str] | None]:
        if self.name == "cached":
            return "item", "GET", f"/notifications/{seeded_id('c', index % CACHED_ITEMS)}", b"", None
        kind = PATTERN[index % len(PATTERN)]
        if kind == "item":
            ident = seeded_id("i", self.item_next % UNCACHED_ITEMS)
            self.item_next += 1
            self.items_used += 1
            return kind, "GET", f"/notifications/{ident}", b"", None
        if kind == "list":
            user = f"lu{self.list_next % LIST_USERS}"
            self.list_next += 1
            self.lists_used += 1
            return kind, "GET", f"/users/{user}/notifications?limit=20", b"", None
        key = f"{self.tag}-{index}"
        body: dict[str, Any] = {"user_id": f"wu{index % 1000}", "email": "w@example.com", "subject": f"overload {key}"}
        body["body"] = "x" * 200
        return kind, "POST", "/notifications", json.dumps(body).encode(), {"Idempotency-Key": key}
