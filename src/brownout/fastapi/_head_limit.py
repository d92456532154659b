"""Refuse a request head (request line and headers) longer than BROWNOUT_MAX_HEAD_BYTES (431), before it is read.

uvicorn bounds an incomplete head only with h11 (`h11_max_incomplete_event_size`, 16 KiB by default); the web runs
httptools, where nothing bounds it: a head of 600,000 small headers, each under every per-header bound
(`RequestLimits`), was parsed whole into a list of 600,000 pairs, and the process took 400 MB more to answer it.
uvicorn 0.54 has no option for that and httptools gives no offsets, hence this subclass of uvicorn's
`HttpToolsProtocol`: it counts the bytes of the head being read as they arrive and, once more than the limit has
arrived without the head's end, answers 431 with a short JSON body (the shape of the app's other refusals) and
closes the connection (its write side at once; what the client still sends is dropped for a second, so that the
431 is not lost to a reset); the rest of the head is never parsed. Empty lines before a request line count.

To count one head at a time, on a keep-alive connection and across pipelined requests, the bytes are handed to the
parser in pieces that end where a head or a body may end: a head after its first `\\r\\n\\r\\n` (llhttp takes no
bare LF, and a head ends with an empty line), a Content-Length body after its length. Cutting never changes what
the parser sees, only when; and after a head asking for an upgrade uvicorn does not perform, the rest of the read
is dropped, as plain uvicorn drops it (fed on, it would be parsed as a request of its own). Where a chunked body
ends is the parser's to find: a head that follows one in the same read is counted from the next read, so it may
pass at most one read longer than the limit, never be refused early.

The limit travels in uvicorn's `h11_max_incomplete_event_size`, so one option bounds the head whichever parser runs:
`brownout web` passes `--http brownout.fastapi._head_limit:HeadLimitedHttpToolsProtocol
--h11-max-incomplete-event-size BROWNOUT_MAX_HEAD_BYTES` to uvicorn.
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

DEFAULT_MAX_HEAD_BYTES = 65_536  # BROWNOUT_MAX_HEAD_BYTES's default, where uvicorn was given no limit
LINGER_SECONDS = 1.0  # after the 431, the rest of what the client sends is read and dropped this long, then closed
_END_OF_HEAD = b"\r\n\r\n"
_BLANK = b"\r\n"
_CHUNKED = -1  # _body_left while a chunked (or otherwise framed) body is read


class HeadLimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes: int = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_HEAD_BYTES
        self._body_left: int | None = None  # None: a head is being read; else body bytes still to come
        self._head_bytes = 0  # of the head being read, so far
        self._head_started = False  # past the empty lines a client may send before a request line
        self._tail = b""  # the head's last 3 bytes so far: its end may come split across reads
        self._refusing = False
        self._declined_upgrade = False  # a head asked for an upgrade uvicorn does not perform

    def data_received(self, data: bytes) -> None:
        if self._refusing:  # the 431 is written or waits for the responses before it: the rest is dropped
            return
        while data:
            in_body = self._body_left is not None
            if self._body_left is None:
                if self._head_bytes >= self.max_head_bytes:  # and more comes: this head is longer than the limit
                    self._refuse()
                    return
                piece, data = self._head_piece(data)
            elif self._body_left > 0:
                piece, data = data[: self._body_left], data[self._body_left :]
                self._body_left -= len(piece)
            else:
                piece, data = data, b""
            super().data_received(piece)
            if self.transport.is_closing() or self.transport.get_protocol() is not self:  # a 400, or an upgrade
                return
            if self._declined_upgrade:
                # httptools stops at such a head and plain uvicorn drops the rest of the read; fed on as a body
                # it would be parsed as a request of its own, one a proxy in front took for this one's body.
                return
            if in_body and self._body_left is None:
                # A chunked body ended in this piece and a head may have begun after it; where is the parser's
                # to know: that head is counted from the next read (at most one read more than the limit).
                self._head_bytes = 0

    def _head_piece(self, data: bytes) -> tuple[bytes, bytes]:
        """The next piece of *data* for the parser, counted: up to where the head may end, at most up to the limit."""
        room = self.max_head_bytes - self._head_bytes
        if not self._head_started:
            blank = len(data) - len(data.lstrip(_BLANK))  # not an end of head: nothing has begun
            if blank:
                cut = min(blank, room)
                self._head_bytes += cut
                return data[:cut], data[cut:]
            self._head_started = True
        window = self._tail + data[:room]
        end = window.find(_END_OF_HEAD)
        cut = min(end + len(_END_OF_HEAD) - len(self._tail), len(data)) if end >= 0 else min(room, len(data))
        piece, rest = (data, b"") if cut == len(data) else (data[:cut], data[cut:])
        self._head_bytes += cut
        self._tail = window[-3:] if end < 0 else b""
        return piece, rest

    def on_headers_complete(self) -> None:
        self._declined_upgrade = bool(self.parser.should_upgrade()) and not self._should_upgrade()
        super().on_headers_complete()
        self._body_left = self._body_length()
        self._head_bytes, self._head_started, self._tail = 0, False, b""

    def _body_length(self) -> int:
        length = 0
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return _CHUNKED
            if name == b"content-length":
                length = int(value)  # the parser took it: digits, and only one
        return length

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._body_left = None
        self._head_bytes, self._head_started, self._tail = 0, False, b""

    def _refuse(self) -> None:
        self._refusing = True
        if self.cycle is None or (self.cycle.response_complete and not self.pipeline):
            self._send_431()
        else:  # responses to the requests before it go first, in order
            self.flow.pause_reading()

    def on_response_complete(self) -> None:
        if self._refusing and not self.pipeline:
            self.server_state.total_requests += 1
            if not self.transport.is_closing():
                self._unset_keepalive_if_required()
                self._send_431()
            return
        super().on_response_complete()

    def _send_431(self) -> None:
        detail = f"request head longer than {self.max_head_bytes} bytes"
        self.logger.warning("Request head longer than %d bytes: 431.", self.max_head_bytes)
        body = json.dumps({"detail": detail}).encode()
        content = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n",
            b"\r\n",
            body,
        ]
        self.transport.write(b"".join(content))
        # Closing now, with the client still sending, would reset the connection and could lose the 431 on its
        # way: the write side is closed instead, what still comes is dropped (data_received), then it is closed.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()
