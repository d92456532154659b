"""Every fault proxy of a run on one selector loop, in one child process, driven over its stdin.

tests/support's FaultProxy serves each connection from a thread of its own: on a loaded machine its
threads hand the GIL to one another at every chunk, and the run kept three such processes. Here one
thread serves every listener and connection with non-blocking sockets (`bench/chaos.py --proxy-cost`
measures both). The faults are FaultProxy's, with the same client-visible behaviour:

- pass: relay both ways; when either side closes, both are closed;
- refuse: the listener is closed (connects get RST); open connections go on;
- reset: a new connection is accepted and closed with SO_LINGER 0 (RST);
- silence: new connections are accepted and never reach the upstream; open ones stop relaying for good
  (bytes read and dropped), until the client closes or reset_existing;
- reset_existing: RST to every open client connection, its upstream closed.

A peer that takes nothing for 5 s, or an upstream that does not accept within 5 s, closes the link.
With `splice`, bytes go socket -> pipe -> socket in the kernel (os.splice) instead of through Python.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import selectors
import socket
import struct
import sys
import time

from bench.chaoskit.processes import first_in_line

_TICK_SECONDS = 0.05
_IO_SECONDS = 5.0  # upstream connect, and a peer that takes nothing
_CHUNK = 256 * 1024
_PIPE_CHUNK = 64 * 1024  # a pipe's default capacity
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
MODES = ("pass_through", "refuse", "reset", "silence")


class Mode(enum.Enum):
    PASS_THROUGH = "pass_through"  # noqa: S105 - a mode's name, not a password
    REFUSE = "refuse"
    RESET = "reset"
    SILENCE = "silence"


def _abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets RST, not FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Flow:
    """Bytes from one socket to the other: what was read and is not yet written (in Python or in a pipe)."""

    __slots__ = ("src", "dst", "buf", "pipe", "in_pipe")

    def __init__(self, src: socket.socket, dst: socket.socket, splice: bool) -> None:
        self.src, self.dst = src, dst
        self.buf = b""
        self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) if splice else None
        self.in_pipe = 0

    @property
    def pending(self) -> bool:
        return bool(self.buf) or self.in_pipe > 0

    def pull(self, scratch: memoryview) -> bool:
        """Read what the source has and write what the destination takes; False at the source's EOF."""
        if self.pipe is not None:
            n = os.splice(self.src.fileno(), self.pipe[1], _PIPE_CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            if n == 0:
                return False
            self.in_pipe += n
            self.push()
            return True
        n = self.src.recv_into(scratch)
        if n == 0:
            return False
        try:
            sent = self.dst.send(scratch[:n])
        except BlockingIOError:
            sent = 0
        if sent < n:
            self.buf = bytes(scratch[sent:n])
        return True

    def push(self) -> None:
        """Write what is pending, as far as the destination takes it."""
        try:
            if self.pipe is not None:
                while self.in_pipe:
                    self.in_pipe -= os.splice(self.pipe[0], self.dst.fileno(), self.in_pipe, flags=os.SPLICE_F_MOVE)
            elif self.buf:
                self.buf = self.buf[self.dst.send(self.buf) :]
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None


class _Link:
    """One client connection and, while it relays, its upstream."""

    __slots__ = ("proxy", "client", "upstream", "connecting", "silenced", "up", "down", "since", "events")

    def __init__(self, proxy: _Proxy, client: socket.socket, silenced: bool) -> None:
        self.proxy, self.client, self.silenced = proxy, client, silenced
        self.upstream: socket.socket | None = None
        self.connecting = False
        self.up: _Flow | None = None  # client -> upstream
        self.down: _Flow | None = None  # upstream -> client
        self.since: float | None = None  # waiting (connect, or a peer that takes nothing) since
        self.events: dict[socket.socket, int] = {}


class _Proxy:
    """One listening port in front of one upstream port."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = 0
        self.mode = Mode.PASS_THROUGH
        self.listener: socket.socket | None = None
        self.links: set[_Link] = set()
        self.accepted = 0


class RelayHub:
    """The loop: listeners, links and the command stream (one line in, "ok" out), all on one thread."""

    def __init__(self, upstream_ports: list[int], *, splice: bool = False) -> None:
        self.splice = splice
        self.proxies = [_Proxy(port) for port in upstream_ports]
        self.selector = selectors.DefaultSelector()
        self.scratch = memoryview(bytearray(_CHUNK))
        self.running = True
        for proxy in self.proxies:
            self._listen(proxy)

    # -- commands ------------------------------------------------------------

    def command(self, line: str) -> str:
        """`MODE INDEX`, `reset_existing INDEX`, `count INDEX`, `stop`: the answer to write back."""
        op, _, arg = line.strip().partition(" ")
        if op == "stop":
            self.running = False
            return "ok"
        try:
            proxy = self.proxies[int(arg)]
        except (ValueError, IndexError):
            return f"unknown {line.strip()}"
        if op == "reset_existing":
            for link in list(proxy.links):
                self._close(link, reset=True)
            return "ok"
        if op == "count":
            return f"{proxy.accepted} {len(proxy.links)}"
        if op not in MODES:
            return f"unknown {op}"
        proxy.mode = Mode(op)
        if proxy.mode is Mode.SILENCE:
            for link in list(proxy.links):
                self._silence(link)
        if proxy.mode is Mode.REFUSE and proxy.listener is not None:
            # A client's connect returns once the kernel queues it; closing the listener would
            # reset that backlog, so connections already made are taken first and go on.
            while self._accept(proxy):
                pass
            self.selector.unregister(proxy.listener)
            proxy.listener.close()
            proxy.listener = None
        elif proxy.mode is not Mode.REFUSE and proxy.listener is None:
            give_up = time.monotonic() + 2.0
            while not self._listen(proxy):
                if time.monotonic() > give_up:
                    return f"could not bind {proxy.port}"
                time.sleep(0.01)
        return "ok"

    def _listen(self, proxy: _Proxy) -> bool:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind despite TIME_WAIT
        try:
            listener.bind(("127.0.0.1", proxy.port))
            listener.listen(512)
        except OSError:
            listener.close()
            if proxy.port == 0:
                raise
            return False
        listener.setblocking(False)
        proxy.port = listener.getsockname()[1]
        proxy.listener = listener
        self.selector.register(listener, READ, proxy)
        return True

    # -- the loop --------------------------------------------------------------

    def serve(self, commands: int, answer: int) -> None:
        """Run until `stop` or the command stream's EOF (the harness gone); then close everything with FIN."""
        os.set_blocking(commands, False)
        self.selector.register(commands, READ, None)
        pending = b""
        last_sweep = time.monotonic()
        while self.running:
            for key, mask in self.selector.select(_TICK_SECONDS):
                data = key.data
                if isinstance(data, tuple):
                    self._ready(data[0], key.fileobj, mask)  # type: ignore[arg-type]
                elif isinstance(data, _Proxy):
                    self._accept(data)
                elif key.fd == commands:
                    chunk = os.read(commands, 4096)
                    if not chunk:
                        self.running = False
                        break
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        os.write(answer, (self.command(line.decode()) + "\n").encode())
            if time.monotonic() - last_sweep >= _TICK_SECONDS:
                last_sweep = time.monotonic()
                self._sweep(last_sweep)
        for proxy in self.proxies:
            for link in list(proxy.links):
                self._close(link)
            if proxy.listener is not None:
                proxy.listener.close()
        self.selector.close()

    def _sweep(self, now: float) -> None:
        """Close links that waited too long on a connect or on a peer that takes nothing."""
        for proxy in self.proxies:
            for link in list(proxy.links):
                if link.since is not None and now - link.since > _IO_SECONDS:
                    self._close(link)

    def _accept(self, proxy: _Proxy) -> bool:
        """Take up to 64 queued connections; whether more may be waiting."""
        for _ in range(64):
            if proxy.listener is None:
                return False
            try:
                client, _ = proxy.listener.accept()
            except OSError:  # BlockingIOError: none left
                return False
            proxy.accepted += 1
            if proxy.mode is Mode.RESET:
                _abort(client)
                continue
            client.setblocking(False)
            try:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay of the proxy's own
            except OSError:
                client.close()
                continue
            link = _Link(proxy, client, silenced=proxy.mode is Mode.SILENCE)
            proxy.links.add(link)
            if not link.silenced:
                self._connect(link)
            self._update(link)
        return True

    def _connect(self, link: _Link) -> None:
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.upstream, link.connecting, link.since = upstream, True, time.monotonic()
        code = upstream.connect_ex(link.proxy.upstream)
        if code not in (0, errno.EINPROGRESS):
            self._close(link)

    def _ready(self, link: _Link, sock: socket.socket, mask: int) -> None:
        if link.client.fileno() < 0:
            return  # closed earlier in this round of events
        try:
            if link.connecting:
                if sock is link.upstream and link.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self._close(link)
                    return
                if sock is link.upstream:
                    self._connected(link)
            elif link.silenced:
                if not sock.recv(_CHUNK):
                    if sock is link.client:
                        self._close(link)
                        return
                    self._drop_upstream(link)  # a silenced client must not notice
            else:
                assert link.up is not None and link.down is not None
                if mask & WRITE:
                    (link.up if sock is link.upstream else link.down).push()
                if mask & READ and not (link.up if sock is link.client else link.down).pull(self.scratch):
                    self._close(link)
                    return
            self._update(link)
        except BlockingIOError:
            pass  # a spurious wake-up: nothing to read after all
        except OSError:  # reset, refused, broken pipe: close both
            self._close(link)

    def _connected(self, link: _Link) -> None:
        assert link.upstream is not None
        link.connecting, link.since = False, None
        link.up = _Flow(link.client, link.upstream, self.splice)
        link.down = _Flow(link.upstream, link.client, self.splice)

    def _silence(self, link: _Link) -> None:
        link.silenced = True
        link.since = None
        if link.connecting:
            self._drop_upstream(link)
        self._update(link)

    def _drop_upstream(self, link: _Link) -> None:
        if link.upstream is not None:
            self._set(link, link.upstream, 0)
            link.upstream.close()
            link.upstream = None

    def _update(self, link: _Link) -> None:
        """Register each socket for what it waits on: reading stops while the other side has not taken the last chunk."""
        client_events = upstream_events = 0
        if link.silenced:
            client_events, upstream_events = READ, READ
        elif link.connecting:
            upstream_events = WRITE
        elif link.up is not None and link.down is not None:
            if link.up.pending:
                upstream_events |= WRITE
            else:
                client_events |= READ
            if link.down.pending:
                client_events |= WRITE
            else:
                upstream_events |= READ
            stalled = link.up.pending or link.down.pending
            link.since = (link.since or time.monotonic()) if stalled else None
        self._set(link, link.client, client_events)
        if link.upstream is not None:
            self._set(link, link.upstream, upstream_events)

    def _set(self, link: _Link, sock: socket.socket, events: int) -> None:
        old = link.events.get(sock, 0)
        if events == old:
            return
        if not old:
            self.selector.register(sock, events, (link,))
        elif not events:
            self.selector.unregister(sock)
        else:
            self.selector.modify(sock, events, (link,))
        link.events[sock] = events

    def _close(self, link: _Link, *, reset: bool = False) -> None:
        for sock in list(link.events):
            self._set(link, sock, 0)
        for flow in (link.up, link.down):
            if flow is not None:
                flow.close()
        if reset:
            _abort(link.client)
        else:
            link.client.close()
        if link.upstream is not None:
            link.upstream.close()
        link.proxy.links.discard(link)


def hub_child(upstream_ports: list[int], *, splice: bool = False) -> None:
    """`--proxy-hub PORT,PORT,...`: print the listening ports, then serve commands from stdin."""
    first_in_line()  # part of the network, not of the service
    hub = RelayHub(upstream_ports, splice=splice)
    sys.stdout.write("ports " + " ".join(str(p.port) for p in hub.proxies) + "\n")
    sys.stdout.flush()
    hub.serve(sys.stdin.fileno(), sys.stdout.fileno())
    os.write(sys.stdout.fileno(), b"ok\n")
