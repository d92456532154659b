"""A TCP proxy that tests can make misbehave, so faults are real sockets.

``FaultProxy`` sits between the code under test and a service (PostgreSQL,
RabbitMQ, Redis) on 127.0.0.1. A test switches its mode at any time; what a
psycopg2 client (libpq 17) then sees, ``connect`` being ``connection to server
at "127.0.0.1", port N failed:``:

- ``pass_through()`` (default): bytes are relayed both ways; when either side
  closes, both are closed.
- ``refuse()``: the listening socket is closed, the kernel answers a connect
  with RST: ``connect Connection refused``. Open connections go on working.
  ``pass_through()`` (or any other mode) binds the same port again.
- ``reset()``: a new connection is accepted and closed with ``SO_LINGER`` 0
  (RST). ``connect server closed the connection unexpectedly`` or, when the
  RST beats the client's first packet, ``connect Connection reset by peer``.
  ``reset_existing()`` (any mode) does the same to every open client
  connection and closes its upstream: an idle client's next query fails with
  ``server closed the connection unexpectedly`` (plain) or ``SSL SYSCALL
  error: EOF detected`` (TLS); one blocked in a query with ``server closed
  the connection unexpectedly`` either way.
- ``silence()``: accept and never answer. A new connection is accepted but
  the upstream is never contacted; open connections stop relaying both ways.
  Client bytes are read and dropped, so the client's kernel sees them
  acknowledged and no reply ever: a connect ends at the client's own
  ``connect_timeout`` (``connect timeout expired``), a query only at a
  client-side deadline. A silenced connection stays silent for life, even
  after ``pass_through()``: its stream is already broken (a reply may have
  been dropped), so reviving it is a fault no real network produces. It ends
  when the client closes it, on ``reset_existing()`` or on ``stop()``.

``stop()`` closes everything with FIN and joins its threads: ``server closed
the connection unexpectedly`` (plain) or ``SSL SYSCALL error: EOF detected``
(TLS). One thread accepts and one serves each connection, all waiting in
``selectors`` for at most 50 ms, so mode switches and ``stop()`` are prompt
without busy loops. Nothing is written to stdout.
"""

from __future__ import annotations

import dataclasses
import enum
import selectors
import socket
import struct
import threading
from collections.abc import Callable

_TICK_SECONDS = 0.05
_SWITCH_SECONDS = 2.0  # longest a mode switch or reset_existing() waits
_IO_SECONDS = 5.0  # upstream connect, and a send to a peer that does not read


class Mode(enum.Enum):
    """What the proxy does with connections; see the module docstring."""

    PASS_THROUGH = "pass_through"
    REFUSE = "refuse"
    RESET = "reset"
    SILENCE = "silence"


@dataclasses.dataclass(eq=False)
class _Connection:
    """One client connection and, while it relays, its upstream socket."""

    client: socket.socket
    silenced: bool
    upstream: socket.socket | None = None
    reset_requested: bool = False
    closed: threading.Event = dataclasses.field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def _no_delay(sock: socket.socket) -> socket.socket:
    """Forward each chunk at once. Without TCP_NODELAY, Nagle's algorithm held a small
    chunk until the previous one was acknowledged, and the peer's delayed ACK made
    that 20-50 ms: measured through this proxy, a RabbitMQ publish confirm took p50
    22 ms / p99 50 ms instead of 1.2 / 5.7 ms direct. A fault proxy must add no latency
    of its own, or the chaos run's latency figures measure the proxy."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the peer receives RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` whose failures a test controls."""

    def __init__(
        self,
        *,
        upstream_host: str,
        upstream_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        on_client_bytes: Callable[[object, bytes], None] | None = None,
    ) -> None:
        """*on_client_bytes*(stream, data) sees what each client sends, before it is relayed (a wire observer)."""
        self._on_client_bytes = on_client_bytes
        self._upstream = (upstream_host, upstream_port)
        self._listen_host = listen_host
        self._port = listen_port
        self._mode = Mode.PASS_THROUGH
        self._cond = threading.Condition()  # guards everything below and wakes switchers
        self._listener: socket.socket | None = None
        self._connections: set[_Connection] = set()
        self._accepted = 0
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None

    def start(self) -> FaultProxy:
        """Bind the listening port and start accepting; returns self."""
        if self._acceptor is not None:
            raise RuntimeError("FaultProxy already started")
        self._listener = self._bind()
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close every socket and join every thread; safe to call twice."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join()
        with self._cond:
            threads = [c.thread for c in self._connections if c.thread is not None]
        for thread in threads:
            thread.join()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the one the kernel picked when 0 was asked)."""
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self._listen_host, self._port)

    @property
    def connection_count(self) -> int:
        """Connections accepted since start (refused ones never count)."""
        with self._cond:
            return self._accepted

    @property
    def open_connections(self) -> int:
        """Client connections accepted and not yet closed."""
        with self._cond:
            return len(self._connections)

    def pass_through(self) -> None:
        """Relay new connections (listening again after ``refuse()``)."""
        self._switch(Mode.PASS_THROUGH)

    def refuse(self) -> None:
        """Stop listening: new connects get "Connection refused"."""
        self._switch(Mode.REFUSE)

    def reset(self) -> None:
        """Accept new connections and answer each with RST."""
        self._switch(Mode.RESET)

    def silence(self) -> None:
        """Black-hole new and open connections; open ones stay silent for good."""
        self._switch(Mode.SILENCE)

    def reset_existing(self) -> None:
        """Send RST to every open client connection and wait until they are closed."""
        with self._cond:
            connections = list(self._connections)
            for connection in connections:
                connection.reset_requested = True
        for connection in connections:
            connection.closed.wait(_SWITCH_SECONDS)

    def _switch(self, mode: Mode) -> None:
        """Set the mode; return once the listening socket matches it, so the
        very next connect a test makes already sees the new behaviour."""
        with self._cond:
            self._mode = mode
            if mode is Mode.SILENCE:
                for connection in self._connections:
                    connection.silenced = True
            if self._acceptor is None or self._stopping.is_set():
                return
            listening = mode is not Mode.REFUSE
            if not self._cond.wait_for(
                lambda: (self._listener is not None) == listening or self._stopping.is_set(), _SWITCH_SECONDS
            ):
                raise RuntimeError(f"FaultProxy could not switch to {mode.value} on port {self._port}")

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind despite TIME_WAIT
        try:
            listener.bind((self._listen_host, self._port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._port = listener.getsockname()[1]
        return listener

    def _accept_loop(self) -> None:
        """Accept, and open or close the listener to match the mode. Only this
        thread touches the listener, so the selector never holds a socket that
        was closed behind its back."""
        registered: socket.socket | None = None
        with selectors.DefaultSelector() as selector:
            while not self._stopping.is_set():
                with self._cond:
                    if self._mode is Mode.REFUSE and self._listener is not None:
                        # A client's connect returns once the kernel queues it; closing the
                        # listener would reset that backlog, so those connections go on.
                        self._listener.setblocking(False)
                        while self._accept_one(self._listener):
                            pass
                        if registered is not None:
                            selector.unregister(registered)
                        self._listener.close()
                        self._listener = registered = None
                        self._cond.notify_all()
                    elif self._mode is not Mode.REFUSE and self._listener is None:
                        try:
                            self._listener = self._bind()
                        except OSError:
                            pass  # port briefly unavailable: retried next tick
                        self._cond.notify_all()
                    if self._listener is not None and registered is None:
                        registered = self._listener
                        selector.register(registered, selectors.EVENT_READ)
                if registered is None:
                    self._stopping.wait(_TICK_SECONDS)
                elif selector.select(_TICK_SECONDS):
                    self._accept_one(registered)
        with self._cond:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._cond.notify_all()

    def _accept_one(self, listener: socket.socket) -> bool:
        """Take one queued connection; whether there was one."""
        try:
            client, _ = listener.accept()
        except OSError:  # none queued (non-blocking), or the listener is closing
            return False
        client.setblocking(True)  # accept() hands a non-blocking listener's flag on
        try:
            _no_delay(client)
        except OSError:  # the client is gone already
            client.close()
            return True
        with self._cond:
            self._accepted += 1
            if self._mode is Mode.RESET:
                _abort(client)
                return True
            connection = _Connection(client, silenced=self._mode is Mode.SILENCE)
            connection.thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self._connections.add(connection)
        connection.thread.start()
        return True

    def _serve(self, connection: _Connection) -> None:
        try:
            if not connection.silenced:
                connection.upstream = _no_delay(socket.create_connection(self._upstream, timeout=_IO_SECONDS))
            self._relay(connection)
        except OSError:
            pass  # either side failed: close both, below
        finally:
            with self._cond:
                self._connections.discard(connection)
            if connection.reset_requested:
                _abort(connection.client)
            else:
                connection.client.close()
            if connection.upstream is not None:
                connection.upstream.close()
            connection.closed.set()

    def _relay(self, connection: _Connection) -> None:
        """Copy bytes until a side closes; drop them once silenced.

        Readiness comes from the selector, so ``recv`` never blocks; the
        socket timeout only bounds ``sendall`` to a peer that stops reading."""
        client, upstream = connection.client, connection.upstream
        with selectors.DefaultSelector() as selector:
            for source, target in ((client, upstream), (upstream, client)):
                if source is not None:
                    source.settimeout(_IO_SECONDS)
                    selector.register(source, selectors.EVENT_READ, target)
            while not self._stopping.is_set() and not connection.reset_requested:
                for key, _ in selector.select(_TICK_SECONDS):
                    readable: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = readable.recv(65536)
                    if readable is client and not data:
                        return  # the client is gone: nothing left to serve
                    if connection.silenced:
                        if not data:  # upstream gone: a silenced client must not notice
                            selector.unregister(readable)
                        continue
                    if not data:
                        return
                    if readable is client and self._on_client_bytes is not None:
                        self._on_client_bytes(connection, data)
                    key.data.sendall(data)
