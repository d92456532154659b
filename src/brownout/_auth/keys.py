"""Service keys: other services, operators and Prometheus, each with a name and scopes.

`BROWNOUT_API_KEYS` holds `NAME:SHA256_HEX:SCOPES` entries, comma-separated, scopes joined by `+`
(`orders:9f86...:write+read,prometheus:4e07...:metrics`): the server keeps only hashes, so the
variable leaks nothing a caller could use. A key is `bo_` and 43 URL-safe characters (256 random
bits): the prefix tells it apart from a JWT and lets secret scanners find one pasted where it should
not be. A presented key is hashed and compared with every stored hash in constant time, all of them
each time, so neither the time nor the order says which entry came close.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

SCOPES = ("write", "read", "metrics", "admin")
KEY_PREFIX = "bo_"
MIN_KEY_LENGTH = 32
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ServiceKey:
    name: str
    digest: str  # sha256 hex of the key
    scopes: frozenset[str]


def new_key() -> str:
    """A fresh service key: `bo_` and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def entry_for(name: str, key: str, scopes: Iterable[str]) -> str:
    """The `NAME:SHA256_HEX:SCOPES` entry of *key* for BROWNOUT_API_KEYS."""
    parsed = ServiceKey(name, digest_of(key), frozenset(scopes))
    _check(parsed, where="the key")
    return f"{name}:{parsed.digest}:{'+'.join(sorted(parsed.scopes))}"


def parse_keys(text: str | None) -> tuple[ServiceKey, ...]:
    """The entries of BROWNOUT_API_KEYS; ValueError naming the bad entry (by position and name, never a hash)."""
    keys: list[ServiceKey] = []
    for position, raw in enumerate((text or "").split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 3:
            raise ValueError(f"entry {position} must be NAME:SHA256_HEX:SCOPES (scopes joined by +)")
        name, digest, scopes = (part.strip() for part in parts)
        key = ServiceKey(name, digest.lower(), frozenset(scope.strip() for scope in scopes.split("+") if scope.strip()))
        _check(key, where=f"entry {position}")
        if any(existing.name == key.name for existing in keys):
            raise ValueError(f"entry {position}: the name {key.name!r} is used twice (logs and metrics name callers by it)")
        keys.append(key)
    return tuple(keys)


def _check(key: ServiceKey, *, where: str) -> None:
    if not _NAME.match(key.name):
        raise ValueError(f"{where}: a name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not _DIGEST.match(key.digest):
        raise ValueError(f"{where} ({key.name}): the key's SHA-256 must be 64 hexadecimal digits")
    unknown = key.scopes - set(SCOPES)
    if not key.scopes or unknown:
        raise ValueError(f"{where} ({key.name}): scopes are one or more of {'+'.join(SCOPES)}, joined by +")


def bearer(authorization: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <credential>` header, or None."""
    scheme, _, given = (authorization or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


class KeyRing:
    """The configured keys, matched against a presented one."""

    def __init__(self, keys: Iterable[ServiceKey]) -> None:
        self._keys = tuple((key, bytes.fromhex(key.digest)) for key in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def find(self, presented: str | None) -> ServiceKey | None:
        if presented is None or len(presented) < MIN_KEY_LENGTH:
            return None
        given = hashlib.sha256(presented.encode()).digest()
        found = None
        for key, expected in self._keys:  # every entry, whatever matched: the time says nothing
            if hmac.compare_digest(given, expected):
                found = key
        return found
