"""Read-your-writes: what this service accepted recently, kept in Redis for a bound.

- A queued creation is kept as a *pending item* (`status: "pending"`,
  `created_at` = acceptance time) until the database row supersedes it by id.
- A queued mark-read or mark-unread is kept as a *pending mark* with its
  acceptance stamp; the latest stamp wins, and a database row whose
  `read_stamp` is at least as late supersedes it. An end user's mark names
  the user, and shows only on a notification of theirs (the worker refuses
  the others).
- Every write, queued or direct, adds the notification to its user's *recent*
  set, so a list served stale from the cache still shows what was just written.
- A queued command's acceptance is kept so `GET /commands/{id}` can say
  "queued" before the database knows it.

Everything expires after `pending_seconds`: an entry that nobody cleared (the
read that would have, never came; Redis lost a delete) cannot stick. A user's
recent set also keeps only its newest `RECENT_PER_USER` members, so one user's
writes cannot grow it without bound (the other entries are one per queued
write, and the queue's length bounds those).
Every method raises RedisUnavailable when Redis does not answer in time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from brownout import RedisLink

# Stamps are 63-bit integers, beyond a Lua number's exact range: they travel as
# zero-padded 20-digit strings, which compare like the integers.
# KEYS[1] mark key; ARGV: padded stamp, mark JSON, ttl ms. Keeps the mark with the latest stamp.
_SET_MARK = """
local old = redis.call('GET', KEYS[1])
if old then
  local stamp = string.match(old, '"stamp":"(%d+)"')
  if stamp and stamp >= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS[1] mark key; ARGV: padded read_stamp applied. Deletes the mark once the database caught up with it.
_CLEAR_MARK = """
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
local stamp = string.match(old, '"stamp":"(%d+)"')
if stamp and stamp <= ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


RECENT_PER_USER = 1000
"""Newest writes kept in a user's recent set: ten pages of the largest size a list serves."""


def padded(stamp: int) -> str:
    return f"{stamp:020d}"


class PendingWrites:
    def __init__(
        self,
        link: RedisLink,
        *,
        ttl_seconds: float,
        clock: Callable[[], float] = time.time,
        recent_cap: int = RECENT_PER_USER,
    ) -> None:
        self.link = link
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.recent_cap = recent_cap
        self._clear_mark = link.client.register_script(_CLEAR_MARK)

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl_seconds * 1000)

    def _item_key(self, notification_id: str) -> str:
        return self.link.key("pending", "item", notification_id)

    def mark_key(self, notification_id: str) -> str:
        return self.link.key("pending", "mark", notification_id)

    def _recent_key(self, user_id: str) -> str:
        return self.link.key("recent", "user", user_id)

    def _command_key(self, command_id: str) -> str:
        return self.link.key("command", command_id)

    # -- writes -------------------------------------------------------------

    def note_recent(self, user_id: str, notification_id: str, created_us: int) -> None:
        """A notification written just now (either path): stale lists must still show it."""

        def steps(pipe: Any) -> None:
            self._queue_recent(pipe, user_id, notification_id, created_us)

        self.link.run(lambda client: self._run_pipeline(client, steps))

    def record_queued(
        self,
        command_id: str,
        record: dict[str, Any],
        *,
        item: dict[str, Any] | None = None,
        created_us: int = 0,
        mark: tuple[str, bool, int] | None = None,
        mark_user: str | None = None,
    ) -> None:
        """A queued write, shown to reads: its command record, and its pending *item* (a creation)
        or *mark* (notification id, read, stamp). One round trip: it sits on the 202's path.
        *mark_user*: the end user who marked (None: a service), shown only on that user's notification."""

        def steps(pipe: Any) -> None:
            pipe.set(self._command_key(command_id), json.dumps(record, separators=(",", ":")), px=self._ttl_ms)
            if item is not None:
                value = json.dumps(item | {"status": "pending"}, separators=(",", ":"))
                pipe.set(self._item_key(item["id"]), value, px=self._ttl_ms)
                self._queue_recent(pipe, str(item["user_id"]), item["id"], created_us)
            if mark is not None:
                notification_id, read, stamp = mark
                shown = {"read": read, "stamp": padded(stamp)} | ({"user": mark_user} if mark_user is not None else {})
                value = json.dumps(shown, separators=(",", ":"))
                # EVAL, not the registered script: a script in a pipeline costs redis-py a SCRIPT EXISTS round trip.
                pipe.eval(_SET_MARK, 1, self.mark_key(notification_id), padded(stamp), value, self._ttl_ms)

        self.link.run(lambda client: self._run_pipeline(client, steps))

    @staticmethod
    def _run_pipeline(client: Any, steps: Callable[[Any], None]) -> None:
        with client.pipeline(transaction=False) as pipe:
            steps(pipe)
            pipe.execute()

    def _queue_recent(self, pipe: Any, user_id: str, notification_id: str, created_us: int) -> None:
        key = self._recent_key(user_id)
        horizon = (self.clock() - self.ttl_seconds) * 1_000_000
        pipe.zadd(key, {notification_id: created_us})
        pipe.zremrangebyscore(key, "-inf", f"({horizon:.0f}")
        pipe.zremrangebyrank(key, 0, -(self.recent_cap + 1))  # the oldest beyond the cap
        pipe.pexpire(key, self._ttl_ms)

    # -- clean-up (by the reads that see the database has caught up) ----------

    def clear_items(self, notification_ids: Iterable[str]) -> None:
        keys = [self._item_key(ident) for ident in notification_ids]
        if keys:
            self.link.run(lambda client: client.delete(*keys))

    def queue_clear_applied(self, pipe: Any, notification_id: str, applied_stamp: int) -> None:
        """In the caller's pipeline: the pending item and the marks this applied row supersedes."""
        pipe.delete(self._item_key(notification_id))
        pipe.eval(_CLEAR_MARK, 1, self.mark_key(notification_id), padded(applied_stamp))

    def clear_mark(self, notification_id: str, applied_stamp: int) -> None:
        key = self.mark_key(notification_id)
        self.link.run(lambda client: self._clear_mark(keys=[key], args=[padded(applied_stamp)]))

    # -- reads --------------------------------------------------------------

    def items(self, notification_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not notification_ids:
            return {}
        raws = self.link.run(lambda client: client.mget([self._item_key(ident) for ident in notification_ids]))
        return {ident: json.loads(raw) for ident, raw in zip(notification_ids, raws, strict=True) if raw is not None}

    @staticmethod
    def parse_mark(raw: str | None) -> dict[str, Any] | None:
        return None if raw is None else dict(json.loads(raw))

    def marks(self, notification_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not notification_ids:
            return {}
        raws = self.link.run(lambda client: client.mget([self.mark_key(ident) for ident in notification_ids]))
        return {ident: json.loads(raw) for ident, raw in zip(notification_ids, raws, strict=True) if raw is not None}

    def recent(self, user_id: str) -> list[tuple[str, int]]:
        """(id, created µs) of the user's recent writes, newest first, within the bound."""
        horizon = (self.clock() - self.ttl_seconds) * 1_000_000
        rows = self.link.run(
            lambda client: client.zrevrangebyscore(self._recent_key(user_id), "+inf", f"{horizon:.0f}", withscores=True)
        )
        pairs = cast(list[tuple[str, float]], rows)
        return [(str(member), int(score)) for member, score in pairs]

    def awaited(self, notification_id: str, command_id: str) -> bool:
        """Whether a creation of the notification is queued, or this command was queued before (a replay of
        its Idempotency-Key): a mark of it must then wait in the queue, not be refused. One round trip."""
        keys = [self._item_key(notification_id), self._command_key(command_id)]
        raws = self.link.run(lambda client: client.mget(keys))
        return any(raw is not None for raw in raws)

    def command(self, command_id: str) -> dict[str, Any] | None:
        raw = self.link.run(lambda client: client.get(self._command_key(command_id)))
        return None if raw is None else dict(json.loads(raw))
