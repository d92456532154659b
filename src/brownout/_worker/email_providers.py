"""HTTPS email providers: Resend and Postmark, each a small adapter on one shared httpx client.

Why beside SMTP: some hosts block outbound SMTP (Railway below its Pro plan: port 587 times out), while
HTTPS always leaves. Each call has a connect deadline (at most ``CONNECT_SECONDS``) and ``timeout`` for the
whole call, connect included: httpx's own timeouts bound each wait (a read, a write), so a server answering a
byte at a time, each within the read timeout, would hold a worker thread for as long as it likes. The call
therefore runs on an event loop of its own under `asyncio.timeout`, which cancels it wherever it is; a
client per call (a new TLS handshake per email: milliseconds, against an email's seconds of retries).

The key travels only in a request header: never in a URL, a reason, a log line or a metric label, and
every reason is passed through `mask_secrets` with the key itself replaced too.

Idempotency: Resend keeps an ``Idempotency-Key`` 24 h and answers a replay with the first email's id
without sending again, so an attempt cut by the deadline after Resend took it is retried harmlessly.
Postmark has no such key: a resent email carries the same ``Message-ID`` header, and the actor's send
record keeps every answered send single (src/brownout/_worker/email.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import httpx

from brownout._dispatch.outbox import EmailJob
from brownout._redaction import mask_secrets
from brownout._worker.email_delivery import SENT, Delivery, Outcome

Provider = Literal["resend", "postmark"]
BASE_URLS: dict[Provider, str] = {"resend": "https://api.resend.com", "postmark": "https://api.postmarkapp.com"}
CONNECT_SECONDS = 3.0  # a TCP and TLS handshake to a provider's edge takes milliseconds; longer is an outage
MAX_RETRY_AFTER_SECONDS = 3600.0  # never trust a Retry-After to park an email longer than the backoff's cap
IDEMPOTENCY_PREFIX = "brownout-email/"  # a key of ours never collides with the service's own sends' keys

# Postmark error codes that refuse the account or the sender, the same for every email: the emails wait for
# the operator (bad or missing token, sender signature missing or unconfirmed, not allowed to send, account
# pending, account may not send). Any other 422 is this email's own fault (300 invalid request, 406 inactive
# recipient) and final.
POSTMARK_ACCOUNT_CODES = frozenset({10, 400, 401, 405, 412, 413})
# Resend error names that refuse the sender for every email.
RESEND_SENDER_NAMES = frozenset({"invalid_from_address"})


@dataclass(frozen=True)
class ProviderTarget:
    """A provider, its key and base URL, from ``EMAIL_URL``; repr never shows the key."""

    provider: Provider
    key: str = field(repr=False)
    base_url: str
    message_stream: str = "outbound"  # Postmark's stream of transactional emails

    @classmethod
    def from_url(cls, url: str) -> ProviderTarget:
        """Parse ``resend://KEY`` or ``postmark://SERVER_TOKEN``, with ``?base_url=`` (https, or http to this
        host only) and, for Postmark, ``?message_stream=``; raise ValueError (the key masked)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        shown = f"{scheme}://***" + (f"?{mask_secrets(parts.query)}" if parts.query else "")  # never the key's part
        if scheme not in BASE_URLS:
            raise ValueError(f"EMAIL_URL: scheme {scheme!r} is neither resend nor postmark")
        provider: Provider = "resend" if scheme == "resend" else "postmark"
        key = unquote(parts.netloc)
        if not key or parts.path not in ("", "/"):
            raise ValueError(f"EMAIL_URL {shown!r}: put the key right after {scheme}:// (and nothing but the query)")
        if "@" in key or ":" in key:
            raise ValueError(f"EMAIL_URL {shown!r}: the key goes alone after {scheme}://; point elsewhere with ?base_url=")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - ({"base_url", "message_stream"} if provider == "postmark" else {"base_url"})
        if unknown:
            raise ValueError(f"EMAIL_URL {shown!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
        base_url = query.get("base_url", [BASE_URLS[provider]])[-1].rstrip("/")
        _check_base_url(base_url, shown)
        stream = query.get("message_stream", ["outbound"])[-1] or "outbound"
        return cls(provider, key, base_url, stream)


def _check_base_url(base_url: str, shown: str) -> None:
    parts = urlsplit(base_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"EMAIL_URL {shown!r}: base_url must be an https:// URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(
            f"EMAIL_URL {shown!r}: base_url over plain http:// is for this host only (the key would travel in clear)"
        )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProviderBackend:
    """The shared part: one httpx client (pooled connections, thread-safe), deadlines, transport failures."""

    name: str

    def __init__(self, target: ProviderTarget, *, timeout: float = 10.0) -> None:
        self.target = target
        self.name = target.provider
        self._deadline = timeout
        self._timeouts = httpx.Timeout(timeout, connect=min(timeout, CONNECT_SECONDS))

    def send(self, job: EmailJob, sender: str) -> Delivery:
        path, body, headers = self.request(job, sender)
        answer = self._post(path, body, headers)
        return answer if isinstance(answer, Delivery) else self.classify(answer)

    def request(self, job: EmailJob, sender: str) -> tuple[str, dict[str, Any], dict[str, str]]:
        """The provider's (path, JSON body, headers) for *job*."""
        raise NotImplementedError

    def classify(self, response: httpx.Response) -> Delivery:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing held between calls (a client per call)."""

    def _post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response | Delivery:
        """The answer, or a transient Delivery for a connect error, a timeout or a dropped connection."""
        try:
            return asyncio.run(self._apost(path, body, {"Accept": "application/json", **headers}))
        except (TimeoutError, httpx.TimeoutException) as exc:
            return Delivery(
                Outcome.FAILED_TRANSIENT, self._masked(f"{self.name}: no answer within the deadline ({type(exc).__name__})")
            )
        except httpx.TransportError as exc:
            return Delivery(Outcome.FAILED_TRANSIENT, self._masked(f"{self.name}: {type(exc).__name__}: {exc}"))

    async def _apost(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        async with (
            asyncio.timeout(self._deadline),
            httpx.AsyncClient(base_url=self.target.base_url, timeout=self._timeouts, follow_redirects=False) as client,
        ):
            return await client.post(path, json=body, headers=headers)

    def _masked(self, text: str) -> str:
        """*text* without the key, should the other side (or an exception) ever quote it."""
        key = self.target.key
        return mask_secrets(text.replace(key, "***") if len(key) >= 8 else text)

    def _delivery(self, outcome: Outcome, response: httpx.Response, detail: str) -> Delivery:
        reason = self._masked(f"{self.name} answered {response.status_code}: {detail}"[:1000])
        retry_after = retry_after_seconds(response.headers.get("Retry-After")) if outcome is Outcome.RATE_LIMITED else None
        return Delivery(outcome, reason, retry_after)


class ResendBackend(ProviderBackend):
    """``POST /emails`` with ``Authorization: Bearer KEY`` and ``Idempotency-Key: brownout-email/<entity id>``.

    The body is the same on every attempt (no date, nothing random): Resend answers a replay of the key with
    another body by 409 ``invalid_idempotent_request``."""

    def request(self, job: EmailJob, sender: str) -> tuple[str, dict[str, Any], dict[str, str]]:
        body = {"from": sender, "to": [job.to], "subject": job.subject, "text": job.body}
        headers = {"Authorization": f"Bearer {self.target.key}", "Idempotency-Key": f"{IDEMPOTENCY_PREFIX}{job.entity_id}"}
        return "/emails", body, headers

    def classify(self, response: httpx.Response) -> Delivery:
        status = response.status_code
        error = _json_object(response)
        name = str(error.get("name", ""))
        detail = f"{name}: {error.get('message', response.reason_phrase)}" if name else _text(response)
        if 200 <= status < 300:
            return SENT
        if status == 429:  # rate_limit_exceeded, daily_quota_exceeded, monthly_quota_exceeded
            return self._delivery(Outcome.RATE_LIMITED, response, detail)
        if status in (401, 403) or name in RESEND_SENDER_NAMES:  # a bad key, or a domain not verified
            return self._delivery(Outcome.BAD_CREDENTIALS, response, detail)
        if status == 409 and name == "concurrent_idempotent_requests":  # our earlier attempt is still running
            return self._delivery(Outcome.FAILED_TRANSIENT, response, detail)
        if status == 409:  # invalid_idempotent_request: this key went with another body (EMAIL_FROM changed?)
            detail += " (an earlier attempt with another body may have been sent)"
            return self._delivery(Outcome.REJECTED, response, detail)
        if 400 <= status < 500:
            return self._delivery(Outcome.REJECTED, response, detail)
        return self._delivery(Outcome.FAILED_TRANSIENT, response, detail)


class PostmarkBackend(ProviderBackend):
    """``POST /email`` with ``X-Postmark-Server-Token``; the stable Message-ID as a header of the email."""

    def request(self, job: EmailJob, sender: str) -> tuple[str, dict[str, Any], dict[str, str]]:
        body = {
            "From": sender,
            "To": job.to,
            "Subject": job.subject,
            "TextBody": job.body,
            "MessageStream": self.target.message_stream,
            "Headers": [{"Name": "Message-ID", "Value": job.message_id}],
        }
        return "/email", body, {"X-Postmark-Server-Token": self.target.key}

    def classify(self, response: httpx.Response) -> Delivery:
        status = response.status_code
        error = _json_object(response)
        code = error.get("ErrorCode")
        detail = f"ErrorCode {code}: {error.get('Message', '')}" if code is not None else _text(response)
        if 200 <= status < 300 and code in (0, None):
            return SENT
        if status == 429:
            return self._delivery(Outcome.RATE_LIMITED, response, detail)
        if status in (401, 403) or code in POSTMARK_ACCOUNT_CODES:
            return self._delivery(Outcome.BAD_CREDENTIALS, response, detail)
        if 400 <= status < 500 or 200 <= status < 300:  # 422 with ErrorCode 300 (invalid), 406 (inactive recipient), ...
            return self._delivery(Outcome.REJECTED, response, detail)
        return self._delivery(Outcome.FAILED_TRANSIENT, response, detail)


def provider_backend(target: ProviderTarget, *, timeout: float) -> ProviderBackend:
    return ResendBackend(target, timeout=timeout) if target.provider == "resend" else PostmarkBackend(target, timeout=timeout)


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) as seconds within [0, MAX_RETRY_AFTER_SECONDS]; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        parsed = json.loads(response.content)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _text(response: httpx.Response) -> str:
    return response.text[:300].strip() or response.reason_phrase
