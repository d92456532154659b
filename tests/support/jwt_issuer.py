"""A fake of Supabase Auth's signing side: keys, tokens as it mints them, and its JWKS
endpoint served over real HTTP on loopback (with switches for an outage or a stall)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://abcdefghijklmnop.supabase.co/auth/v1"
SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"  # Supabase's local default shape


class FakeClock:
    """Epoch seconds that only move when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SigningKey:
    """A private key with its kid, and its public half as a JWK and as PEM."""

    def __init__(self, kind: str, kid: str | None = None) -> None:
        self.kid = kid or f"{kind.lower()}-{uuid.uuid4().hex[:8]}"
        self.alg = {"EC": "ES256", "RSA": "RS256"}[kind]
        self.private: Any = ec.generate_private_key(ec.SECP256R1()) if kind == "EC" else rsa.generate_private_key(65537, 2048)
        algorithm: Any = ECAlgorithm if kind == "EC" else RSAAlgorithm
        self.jwk: dict[str, Any] = {**algorithm.to_jwk(self.private.public_key(), as_dict=True)}
        self.jwk.update(kid=self.kid, alg=self.alg, use="sig", key_ops=["verify"])
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def mint(self, payload: dict[str, Any], *, kid: str | None = None, alg: str | None = None) -> str:
        return jwt.encode(payload, self.private, algorithm=alg or self.alg, headers={"kid": kid or self.kid})


def supabase_claims(now: float, **overrides: Any) -> dict[str, Any]:
    """An access token's payload as Supabase Auth writes it; `None` in overrides drops a claim."""
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "authenticated",
        "sub": str(uuid.uuid4()),
        "exp": int(now) + 3600,
        "iat": int(now),
        "email": "user@example.com",
        "role": "authenticated",
        "aal": "aal1",
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }
    payload.update(overrides)
    return {name: value for name, value in payload.items() if value is not None}


def mint_hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(payload: dict[str, Any], header: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token PyJWT refuses to mint: HMAC with a public key's bytes as the secret (algorithm
    confusion), or unsigned (`hmac_key` None: alg none, empty signature)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if hmac_key is None:
        return signing_input + "."
    return signing_input + "." + _b64(hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest())


class JwksServer:
    """Supabase's /auth/v1/.well-known/jwks.json on 127.0.0.1, counting its requests.

    `stall()` makes it accept requests and never answer them (until `close`); `body`
    replaces the document with raw bytes (a broken proxy, an oversized answer)."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = list(keys)
        self.body: bytes | None = None
        self.status = 200
        self.requests = 0
        self._stalling = threading.Event()
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests += 1
                if server._stalling.is_set():
                    server._release.wait(60)
                    return
                body = server.body if server.body is not None else json.dumps({"keys": server.keys}).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/auth/v1/.well-known/jwks.json"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stall(self) -> None:
        self._stalling.set()

    def close(self) -> None:
        """Stop listening: the port refuses connections afterwards. Idempotent."""
        self._release.set()
        if not self._thread.is_alive():
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@contextmanager
def jwks_server(keys: list[dict[str, Any]]) -> Iterator[JwksServer]:
    server = JwksServer(keys)
    try:
        yield server
    finally:
        server.close()


def refused_url() -> str:
    """A loopback URL nobody listens on: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/auth/v1/.well-known/jwks.json"
