"""An Idempotency-Key bound to its first body in Redis, so a reuse with another body is refused at once.

The direct path finds a reuse in `applied_commands`; a write queued while the database is down cannot look
there, and the worker would only dead-letter it later, after the caller was told 202. Redis keeps each
client key's body hash for the stale window: the same key with another body is a `KeyConflict` (422) at
once, while the database is down too. When Redis cannot tell, the database or the worker still catches it.
A write refused with nothing recorded (its data, an entity not found) gives its claim back: the same key with a
corrected body is then a new write, not a conflict.
"""

from __future__ import annotations

from typing import Any

from brownout._cache.redis_link import RedisLink, RedisUnavailable
from brownout._dispatch.apply import KeyConflict
from brownout._dispatch.envelope import Envelope

# Deleted only while it still holds this body: a claim another request made since is not ours to drop.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class KeyClaims:
    def __init__(self, link: RedisLink, *, seconds: float) -> None:
        self._link = link
        self._ttl_ms = max(1, int(seconds * 1000))  # not EX: it rounded a sub-second window down to 0, an error

    def claim(self, envelope: Envelope) -> bool:
        """Bind *envelope*'s client key to its body (the first one wins); raise KeyConflict for another body.
        True when this call made the claim (the one to `release` should the write record nothing)."""
        if not envelope.client_key:
            return False
        key = self._link.key("idempotency", envelope.command_id)

        def claim(client: Any) -> Any:
            return client.set(key, envelope.payload_hash, nx=True, get=True, px=self._ttl_ms)

        try:
            first = self._link.run(claim)
        except RedisUnavailable:
            return False
        if first is not None and first != envelope.payload_hash:
            raise KeyConflict(envelope.command_id)
        return first is None

    def release(self, envelope: Envelope) -> None:
        """Give back the claim `claim` made for *envelope* (best effort: unreleased, it expires)."""
        key = self._link.key("idempotency", envelope.command_id)
        try:
            self._link.run(lambda client: client.eval(_RELEASE, 1, key, envelope.payload_hash))
        except RedisUnavailable:
            pass
