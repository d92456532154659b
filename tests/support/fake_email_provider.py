"""Resend's and Postmark's sending APIs, the subset the email backends use, served for real on 127.0.0.1.

Faithful where the backends depend on it: the token header checked (a wrong or missing one gets the
provider's own 401 body), the request's JSON fields, Resend's idempotency keys (the same key and body
answer the first email's id and send nothing; the same key with another body: 409
``invalid_idempotent_request``; while the first is in progress: 409 ``concurrent_idempotent_requests``),
Postmark's 422 answers with their ErrorCode (406 inactive recipient, 400 unknown sender signature).

And what a test scripts: answers for the next requests (a 503 outage, a 429 with Retry-After), a stall
(the request taken, with or without the email going out, and never answered), or the port refusing
connections (`down`), open connections cut.
"""

from __future__ import annotations

import collections
import hashlib
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Kind = Literal["resend", "postmark"]
PATHS: dict[Kind, str] = {"resend": "/emails", "postmark": "/email"}
STALL_LIMIT_SECONDS = 60.0  # a stalled request is let go at the latest after this (or at release())


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Stall:
    deliver: bool  # the email goes out (and its key is kept) before the answer is withheld


class FakeProvider:
    """One provider's API on 127.0.0.1:port; `url` is its base URL, `email_url()` the EMAIL_URL that reaches it."""

    def __init__(self, kind: Kind, *, key: str | None = None, sender_signature: str | None = None) -> None:
        self.kind = kind
        self.key = key or (f"re_{uuid.uuid4().hex}" if kind == "resend" else str(uuid.uuid4()))
        self.sender_signature = sender_signature  # Postmark: the only From it takes (None: any)
        self.inactive: set[str] = set()  # recipients refused: Postmark 406, Resend's 422 validation_error
        self.deliveries: list[dict[str, Any]] = []  # every email that went out
        self.attempts: list[tuple[float, int | str]] = []  # (time, status or "stall") of every request
        self._script: collections.deque[Answer | _Stall] = collections.deque()
        self._keys: dict[str, tuple[str, str | None]] = {}  # Resend: idempotency key -> (body fingerprint, email id or None)
        self._lock = threading.RLock()  # re-entrant: `handle` holds it around an answer and its attempt
        self._release = threading.Event()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._refuser: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def email_url(self, key: str | None = None) -> str:
        return f"{self.kind}://{key or self.key}?base_url={self.url}"

    # -- what a test scripts ----------------------------------------------------

    def answer_next(
        self, count: int, status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        """The next *count* requests get this answer, whatever they carry (an outage, a rate limit)."""
        with self._lock:
            self._script.extend(Answer(status, body or {}, headers or {}) for _ in range(count))

    def stall_next(self, count: int = 1, *, deliver: bool) -> None:
        """The next *count* requests are taken and never answered (until `release`); *deliver*: the email goes out."""
        with self._lock:
            self._release.clear()
            self._script.extend(_Stall(deliver) for _ in range(count))

    def release(self) -> None:
        """Let stalled requests go (their connections are closed unanswered)."""
        self._release.set()

    def outage(self, count: int) -> None:
        """The next *count* requests get the provider's 5xx answer."""
        if self.kind == "resend":
            body = {"statusCode": 500, "name": "internal_server_error", "message": "An unexpected error occurred."}
        else:
            body = {"ErrorCode": 500, "Message": "Internal server error."}
        self.answer_next(count, 500, body)

    def delivered(self) -> list[dict[str, Any]]:
        """A copy of the emails that went out so far (safe while requests are being served)."""
        with self._lock:
            return [dict(d) for d in self.deliveries]

    # -- up and down ------------------------------------------------------------------

    def up(self) -> None:
        self._stop()
        self._server = _Server(("127.0.0.1", self.port), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"fake-{self.kind}", daemon=True)
        self._thread.start()

    def down(self) -> None:
        """The port bound but not listening: every connect refused; open connections cut."""
        self._stop()
        refuser = socket.socket()
        refuser.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        refuser.bind(("127.0.0.1", self.port))
        self._refuser = refuser

    def close(self) -> None:
        self._release.set()
        self._stop()

    def _stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.cut_connections()
            self._server.server_close()
            self._server = None
        if self._refuser is not None:
            self._refuser.close()
            self._refuser = None

    # -- the API ----------------------------------------------------------------------

    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> Answer | None:
        """The answer to one request, or None for a stall (after it ends: close without answering)."""
        with self._lock:
            planned = self._script.popleft() if self._script else None
        if isinstance(planned, Answer):
            self._attempt(planned.status)
            return planned
        if isinstance(planned, _Stall) and not planned.deliver:
            # Taken and never finished: Resend holds its key as in progress (a replay meanwhile: 409) and,
            # the request failing, lets it go; nothing is sent.
            key = headers.get("idempotency-key") if self.kind == "resend" else None
            if key is not None:
                with self._lock:
                    self._keys.setdefault(key, ("", None))
            self._attempt("stall")
            self._release.wait(STALL_LIMIT_SECONDS)
            if key is not None:
                with self._lock:
                    if self._keys.get(key) == ("", None):
                        del self._keys[key]
            return None
        if isinstance(planned, _Stall):
            self._api(path, headers, raw)
            self._attempt("stall")
            self._release.wait(STALL_LIMIT_SECONDS)
            return None
        with self._lock:  # an email and its attempt appear together: a test that sees the one sees the other
            answer = self._api(path, headers, raw)
            self._attempt(answer.status)
        return answer

    def _attempt(self, status: int | str) -> None:
        with self._lock:
            self.attempts.append((time.time(), status))

    def _api(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        if path != PATHS[self.kind]:
            return Answer(404, {"statusCode": 404, "name": "not_found", "message": "The requested endpoint does not exist."})
        return self._resend(headers, raw) if self.kind == "resend" else self._postmark(headers, raw)

    def _resend(self, headers: dict[str, str], raw: bytes) -> Answer:
        auth = headers.get("authorization")
        if not auth:
            return _resend_error(401, "missing_api_key", "Missing API key in the authorization header.")
        if auth != f"Bearer {self.key}":
            return _resend_error(401, "validation_error", "API key is invalid")
        if not headers.get("content-type", "").startswith("application/json"):
            return _resend_error(400, "validation_error", "Invalid JSON body.")
        try:
            body = json.loads(raw)
        except ValueError:
            return _resend_error(400, "validation_error", "Invalid JSON body.")
        for name in ("from", "to", "subject"):
            if not body.get(name):
                return _resend_error(422, "missing_required_field", f"Missing `{name}` field.")
        if not (body.get("text") or body.get("html")):
            return _resend_error(422, "missing_required_field", "Missing `html` or `text` field.")
        to = body["to"] if isinstance(body["to"], list) else [body["to"]]
        key = headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 256:
            return _resend_error(400, "invalid_idempotency_key", "The key must be between 1-256 chars.")
        fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self._lock:
            if key is not None and key in self._keys:
                kept, email_id = self._keys[key]
                if email_id is None:
                    return _resend_error(
                        409,
                        "concurrent_idempotent_requests",
                        "Same idempotency key used while original request is still in progress.",
                    )
                if kept != fingerprint:
                    return _resend_error(
                        409, "invalid_idempotent_request", "Same idempotency key used with a different request payload."
                    )
                return Answer(200, {"id": email_id})  # a replay: the first email's id, nothing sent
            refused = [address for address in to if address in self.inactive]
            if refused:
                message = (
                    "Invalid `to` field. The email address needs to follow the `email@example.com` or "
                    "`Name <email@example.com>` format."
                )
                return _resend_error(422, "validation_error", message)
            email_id = str(uuid.uuid4())
            if key is not None:
                self._keys[key] = (fingerprint, email_id)
            for address in to:
                self.deliveries.append(
                    {"id": email_id, "from": body["from"], "to": address, "subject": body["subject"], "text": body.get("text"),
                     "ref": key, "at": time.time()}
                )  # fmt: skip
        return Answer(200, {"id": email_id})

    def _postmark(self, headers: dict[str, str], raw: bytes) -> Answer:
        token = headers.get("x-postmark-server-token")
        if not token:
            message = ("No Account or Server API tokens were supplied in the HTTP headers. Please add a header for either "
                       "X-Postmark-Server-Token or X-Postmark-Account-Token.")  # fmt: skip
            return Answer(401, {"ErrorCode": 10, "Message": message})
        if token != self.key:
            message = ("The Server Token you provided in the X-Postmark-Server-Token request header was invalid. Please "
                       "verify that you are using a valid token.")  # fmt: skip
            return Answer(401, {"ErrorCode": 10, "Message": message})
        if not headers.get("content-type", "").startswith("application/json") or "application/json" not in headers.get(
            "accept", ""
        ):
            return Answer(
                422, {"ErrorCode": 409, "Message": "JSON data required: Accept and Content-Type must be application/json."}
            )
        try:
            body = json.loads(raw)
        except ValueError:
            return Answer(422, {"ErrorCode": 402, "Message": "Invalid JSON."})
        if not (body.get("From") and body.get("To") and body.get("Subject") is not None) or not (
            body.get("TextBody") or body.get("HtmlBody")
        ):
            return Answer(422, {"ErrorCode": 300, "Message": "Invalid email request: From, To, Subject and a body are required."})
        if self.sender_signature is not None and self.sender_signature not in body["From"]:
            message = (f"The 'From' address you supplied ({body['From']}) is not a Sender Signature on your account. "
                       "Please add and confirm this address to use it in the 'From' field of your messages.")  # fmt: skip
            return Answer(422, {"ErrorCode": 400, "Message": message})
        if body["To"] in self.inactive:
            message = (f"You tried to send to recipient(s) that have been marked as inactive. Found inactive addresses: "
                       f"{body['To']}. Inactive recipients are ones that have generated a hard bounce, a spam complaint, "
                       "or a manual suppression.")  # fmt: skip
            return Answer(422, {"ErrorCode": 406, "Message": message})
        message_id = next(
            (h.get("Value") for h in body.get("Headers") or [] if str(h.get("Name", "")).lower() == "message-id"), None
        )
        email_id = str(uuid.uuid4())
        with self._lock:
            self.deliveries.append(
                {"id": email_id, "from": body["From"], "to": body["To"], "subject": body["Subject"], "text": body.get("TextBody"),
                 "ref": message_id, "stream": body.get("MessageStream"), "at": time.time()}
            )  # fmt: skip
        submitted = datetime.now(UTC).isoformat()
        return Answer(200, {"To": body["To"], "SubmittedAt": submitted, "MessageID": email_id, "ErrorCode": 0, "Message": "OK"})


def _resend_error(status: int, name: str, message: str) -> Answer:
    return Answer(status, {"statusCode": status, "name": name, "message": message})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeProvider) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def cut_connections(self) -> None:
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the providers' edges: the backend's client pools connections
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {name.lower(): value for name, value in self.headers.items()}
        answer = self.server.fake.handle(self.path.split("?")[0], headers, raw)
        if answer is None:  # a stall: the connection is closed, never answered
            self.close_connection = True
            return
        payload = json.dumps(answer.body).encode()
        try:
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a test reads `attempts` and `deliveries`."""
