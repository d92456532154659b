"""Mask secrets before they reach logs, errors, health output, Sentry or metric labels.

libpq, SQLAlchemy, pika and redis-py all quote connection URLs in some messages,
so masking applies to free text as well as to URLs. It runs on text an
anonymous caller can shape (a query string in an access log line, an exception
message), so it must stay linear in the text's length: each pattern is anchored on a
literal (`://`, a keyword) and no part of it can scan past the next `/` or
beyond a fixed bound (an unanchored userinfo pattern took 11 s on 64 KB of
junk).

A URL's userinfo ends at the last `@` before its path, so a password with an
unescaped `@` (`u:p@ss@h`) is masked whole; a password with an unescaped space
is masked up to its `@`. A user-only URL (`redis://token@h`, a Sentry DSN's key)
is masked whole, except for schemes whose user is a login name (PostgreSQL,
AMQP, SMTP), where hiding it would only hurt a diagnosis. An email provider's
URL carries its key where a host would be (`resend://KEY`, `postmark://TOKEN`):
masked whole too.
"""

from __future__ import annotations

import re

MASK = "***"

_LOGIN_SCHEMES = ("postgres", "amqp", "smtp", "mysql")  # the user is a name, not a secret
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_MAX_SCHEME = 32

# After `://`: the userinfo up to the last `@` before the path (the class stops at `/`, so no match
# runs into the next URL), or `user:pass word@` (a colon not followed by a port, a space, an `@`
# within 128 characters and before any `/`).
_URL_USERINFO = re.compile(
    r"://(?:(?P<info>[^\s\"'<>`/?#]*)@"
    r"|(?P<user>[^\s\"'<>`/?#@:]*):(?!\d*(?:[\s/?#]|$))[^\n@/]{1,128}@)"
)

# libpq keyword form and its kin: password=secret, password='sec ret', PASSWORD: x,
# "password": "x", smtp_password=x, ?token=x. Anchored on the keyword, bounded quantifiers only.
_KEYWORD_SECRET = re.compile(
    r"(?P<head>(?<![A-Za-z0-9])(?:[A-Za-z0-9]{1,32}_)?(?:password|passwd|pwd|secret|token|api_?key)\b[\"']?\s{0,8}[:=]\s{0,8})"
    r"(?P<secret>'(?:[^'\\\n]|\\.){0,512}'|\"(?:[^\"\\\n]|\\.){0,512}\"|[^\s,;&'\"]+)",
    re.IGNORECASE,
)
_KEYWORD_HINTS = ("pass", "pwd", "secret", "token", "key")

# EMAIL_URL's provider form: the key stands where a host would be, up to the query (or a path, an `@`, a quote, a space).
_KEY_AS_HOST = re.compile(r"(?P<head>(?<![A-Za-z0-9+.-])(?:resend|postmark)://)[^\s\"'<>`/?#@]+", re.IGNORECASE)


def mask_secrets(value: str) -> str:
    """Return *value* with URL userinfo secrets and keyword passwords replaced by ***."""
    if not isinstance(value, str):
        return value
    if "://" in value:
        value = _URL_USERINFO.sub(_mask_userinfo, value)
        value = _KEY_AS_HOST.sub(lambda m: m["head"] + MASK, value)
    lowered = value.lower()
    if any(hint in lowered for hint in _KEYWORD_HINTS):
        value = _KEYWORD_SECRET.sub(lambda m: m["head"] + MASK, value)
    return value


# An email address's local part (who it is), kept apart from URL userinfo (`scheme://user@host` is a
# login name there: no match starts right after `//`). email-validator takes internationalised addresses
# (`zoë.temp@straße.de`), so letters and digits are Unicode ones (`\w`), and the same address is matched
# where text carries it escaped: a bytes repr (`zo\xc3\xab`, an SMTP reply), a JSON string (`zo\u00eb`),
# a URL path (`zo%C3%AB.temp%40stra%C3%9Fe.de`: uvicorn's access log quotes `@` as `%40`). Of the other
# characters an address may hold, `'` (O'Brien) counts inside the local part but never first (a Python
# repr quotes the address: `'ada@x.io'`), and `/ = ? & | { }` and backquote end it: log text uses them
# around values (a path, `to=ada@x.io`, a query string), and masking them away would hide the line's shape.
# Every quantifier is bounded and nothing is scanned past the local part's 64 units and the domain's
# 9 labels from where a match starts: linear in the text's length.
_ESCAPED = r"\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|%[0-9a-fA-F]{2}"
_LOCAL_CHARS = r"\w.!#$*^~+\-"
_PERCENT = r"%(?![0-9a-fA-F]{2})"  # a `%` of the address itself: one reading of `%40`, never two (no backtracking blow-up)
_EMAIL_LOCAL = re.compile(
    rf"(?<![{_LOCAL_CHARS}%])(?<![{_LOCAL_CHARS}%]')(?<!//)(?!(?<=\\)[xu])(?:[{_LOCAL_CHARS}]|{_ESCAPED}|{_PERCENT})(?:[{_LOCAL_CHARS}']|{_ESCAPED}|{_PERCENT}){{0,63}}"
    rf"(?=(?:@|%40)(?:[^\W_]|-|{_ESCAPED}){{1,63}}(?:\.(?:[^\W_]|-|{_ESCAPED}){{1,63}}){{0,8}}"
    rf"\.(?:xn--[a-zA-Z0-9-]{{1,59}}|(?:[^\W\d_]|{_ESCAPED}){{2,24}})(?!\w))"
)


# PostgreSQL quotes row values in an error's DETAIL ("Failing row contains (...)", "Key (email)=(...)").
_ROW_VALUES = re.compile(r"(?P<head>DETAIL:[ \t]{0,4}(?:Failing row contains|Key))[^\n]*")


def redact(value: str) -> str:
    """Secrets and email addresses masked: what may leave the process in a log line or a Sentry event."""
    return mask_personal(mask_secrets(value))


def mask_personal(value: str) -> str:
    """Return *value* with the local part of every email address (the domain kept), the row values
    PostgreSQL quotes in an error's DETAIL and a Dramatiq message's arguments replaced by ***."""
    if not isinstance(value, str):
        return value
    if _MESSAGE_REPR in value:
        value = _mask_message_arguments(value)
    if "DETAIL:" in value:
        value = _ROW_VALUES.sub(lambda m: f"{m['head']} {MASK}", value)
    if "@" in value or "%40" in value:
        value = _EMAIL_LOCAL.sub(MASK, value)
    return value


# A Dramatiq message formatted into text (`Message(queue_name=..., actor_name=..., args=(...), kwargs={...},
# options={...}, message_id=...)`: its repr, in a list's, an exception's or a batch's text): its arguments are a
# write's or an email's payload. Masked from `args=` to `, options=` (to the end if that never comes), by
# str.find: one pass, whatever the payload holds.
_MESSAGE_REPR = "Message("
_ARGUMENTS, _OPTIONS = "args=", ", options="


def _mask_message_arguments(value: str) -> str:
    parts: list[str] = []
    done = 0
    while (at := value.find(_ARGUMENTS, done)) >= 0:
        start = at + len(_ARGUMENTS)
        end = value.find(_OPTIONS, start)
        if end < 0:
            end = len(value)
        parts += (value[done:start], MASK)
        done = end
    parts.append(value[done:])
    return "".join(parts)


def _mask_userinfo(match: re.Match[str]) -> str:
    info = match["info"]
    if info is None:  # a password with a space
        return f"://{match['user']}:{MASK}@"
    user, colon, _ = info.partition(":")
    if colon:
        return f"://{user}:{MASK}@"
    if not info or _scheme(match.string, match.start()).startswith(_LOGIN_SCHEMES):
        return match[0]
    return f"://{MASK}@"


def _scheme(text: str, scheme_end: int) -> str:
    begin = scheme_end
    while begin > 0 and scheme_end - begin < _MAX_SCHEME and text[begin - 1] in _SCHEME_CHARS:
        begin -= 1
    return text[begin:scheme_end].lower()
