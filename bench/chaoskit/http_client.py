"""The load generator's HTTP client: cheap enough that its own cost stays out of the latencies."""

from __future__ import annotations

import asyncio

from bench.chaoskit.helpers import now


class LeanHttp:
    """A small HTTP/1.1 keep-alive client for one server on 127.0.0.1.

    The load generator's own cost is part of every latency it reports, so it
    sends with asyncio streams and parses only what uvicorn answers (status,
    headers, a Content-Length or chunked body), a fraction of httpx's CPU per
    request. Connections are reused one request at a time, never after 2 s idle
    (uvicorn closes them at 5 s); like browsers and httpx, a request that meets
    a reused connection already closed by the server, before a byte of answer,
    is sent once more on a new one (the server never read it)."""

    IDLE_SECONDS = 2.0

    def __init__(self, url: str, max_idle: int, *, headers: dict[str, str] | None = None) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.max_idle = max_idle
        self.head = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())  # sent with every request

    async def request(
        self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.head}"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        if body or method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        data = head.encode() + b"\r\n" + body
        while self.idle:
            since, reader, writer = self.idle.pop()
            if now() - since > self.IDLE_SECONDS or reader.at_eof():
                writer.close()
                continue
            try:
                return await self._exchange(reader, writer, data)
            except _NothingReceived:
                continue  # closed by the server while idle: the request never reached it
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            return await self._exchange(reader, writer, data)
        except _NothingReceived as exc:
            raise ConnectionResetError("server closed the connection without answering") from exc

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        reuse = False
        try:
            try:
                writer.write(data)
                status_line = await reader.readline()
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise _NothingReceived from exc
            if not status_line:
                raise _NothingReceived
            status = int(status_line.split(b" ", 2)[1])
            found: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                found[name.strip().lower()] = value.strip()
            if "content-length" in found:
                payload = await reader.readexactly(int(found["content-length"]))
            elif found.get("transfer-encoding", "").lower() == "chunked":
                payload = b""
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    chunk = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    payload += chunk[:-2]
            else:
                payload = await reader.read()
                found["connection"] = "close"
            reuse = found.get("connection", "").lower() != "close" and len(self.idle) < self.max_idle
            return status, found, payload
        finally:
            if reuse:
                self.idle.append((now(), reader, writer))
            else:
                writer.close()

    async def close(self) -> None:
        for _, _, writer in self.idle:
            writer.close()
        self.idle.clear()


class _NothingReceived(Exception):
    """The connection failed before the first byte of an answer."""
