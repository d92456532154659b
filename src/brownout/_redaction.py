"""Mask secrets before they reach logs, errors, health output or metric labels.

libpq and SQLAlchemy both quote the connection URL in some messages, so masking
applies to free text as well as to URLs.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@host  ->  scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<secret>[^@\s]*)(?P<at>@)")
# libpq keyword form: password=secret or password='sec ret'
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_secrets(value: str) -> str:
    """Return *value* with every URL or libpq keyword password replaced by ***."""
    if not isinstance(value, str):
        return value
    value = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['at']}", value)
    return _KEYWORD_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", value)
