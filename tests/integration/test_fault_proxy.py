"""FaultProxy against the real PostgreSQL: each mode as a psycopg2 client sees it.

The messages asserted here are the ones the error classifier must recognise;
the tests pin them so that a libpq upgrade that changes them fails loudly.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from tests.support.echo_server import echo_server
from tests.support.tcp_proxy import FaultProxy

SERVER = ("127.0.0.1", 5432)
CLOSED = "server closed the connection unexpectedly"
RESET_AT_CONNECT = re.compile(f"Connection reset by peer|{CLOSED}")


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(upstream_host=SERVER[0], upstream_port=SERVER[1]) as started:
        yield started


def connect(proxy: FaultProxy, **options: Any) -> psycopg2.extensions.connection:
    """A connection through the proxy that gives up connecting after 2 s."""
    params: dict[str, Any] = {"connect_timeout": 2, "sslmode": "disable"} | options
    conn: psycopg2.extensions.connection = psycopg2.connect(
        host="127.0.0.1", port=proxy.port, user="postgres", dbname="postgres", **params
    )
    return conn


def select_one(conn: psycopg2.extensions.connection) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        row = cur.fetchone()
    conn.rollback()
    assert row is not None
    return int(row[0])


class BlockedQuery:
    """Runs ``SELECT 1`` in a thread, so a test can see it hang and then fail."""

    def __init__(self, conn: psycopg2.extensions.connection) -> None:
        self.error: BaseException | None = None
        self.returned = False
        self._conn = conn
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            select_one(self._conn)
            self.returned = True
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            self.error = error

    def finished_within(self, seconds: float) -> bool:
        self._thread.join(seconds)
        return not self._thread.is_alive()


@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_pass_through_relays_queries_and_counts_connections(proxy: FaultProxy, sslmode: str) -> None:
    with connect(proxy, sslmode=sslmode) as conn:
        assert select_one(conn) == 1
        assert conn.info.ssl_in_use is (sslmode == "require")
        assert proxy.connection_count == 1
        assert proxy.open_connections == 1
    conn.close()
    deadline = time.monotonic() + 5
    while proxy.open_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.open_connections == 0


def test_refuse_is_connection_refused_then_pass_through_rebinds_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    proxy.refuse()

    with pytest.raises(psycopg2.OperationalError) as refused:
        connect(proxy)

    assert str(refused.value) == (
        f'connection to server at "127.0.0.1", port {port} failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?\n"
    )
    assert proxy.connection_count == 0

    proxy.pass_through()
    assert proxy.port == port
    with connect(proxy) as conn:
        assert select_one(conn) == 1
    conn.close()


def test_refuse_leaves_open_connections_working(proxy: FaultProxy) -> None:
    conn = connect(proxy)
    proxy.refuse()
    try:
        assert select_one(conn) == 1
    finally:
        conn.close()


@pytest.mark.parametrize("sslmode", ["disable", "prefer", "require"])
def test_reset_fails_the_connect_with_a_reset_or_closed_error(proxy: FaultProxy, sslmode: str) -> None:
    proxy.reset()

    with pytest.raises(psycopg2.OperationalError) as reset:
        connect(proxy, sslmode=sslmode)

    # Which of the two depends on whether the RST beats the client's first
    # packet: both are seen here, so the classifier must know both.
    message = str(reset.value)
    assert message.startswith(f'connection to server at "127.0.0.1", port {proxy.port} failed: ')
    assert RESET_AT_CONNECT.search(message), message
    assert proxy.connection_count == 1
    assert proxy.open_connections == 0


@pytest.mark.parametrize(
    ("sslmode", "expected"),
    [
        ("disable", CLOSED),
        # libpq's TLS write meets the RST, defers the error, then reads EOF.
        ("require", "SSL SYSCALL error: EOF detected"),
    ],
)
def test_reset_existing_breaks_an_idle_connection(proxy: FaultProxy, sslmode: str, expected: str) -> None:
    conn = connect(proxy, sslmode=sslmode)
    assert select_one(conn) == 1

    proxy.reset_existing()

    with pytest.raises(psycopg2.OperationalError) as broken:
        select_one(conn)
    assert str(broken.value).startswith(expected), str(broken.value)
    assert conn.closed
    assert proxy.open_connections == 0
    with connect(proxy, sslmode=sslmode) as fresh:  # the mode itself is unchanged
        assert select_one(fresh) == 1
    fresh.close()


def test_silence_makes_a_connect_wait_for_its_own_timeout(proxy: FaultProxy) -> None:
    proxy.silence()
    started = time.monotonic()

    with pytest.raises(psycopg2.OperationalError) as silent:
        connect(proxy, connect_timeout=2)

    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed <= 15.0
    assert str(silent.value) == (f'connection to server at "127.0.0.1", port {proxy.port} failed: timeout expired\n')
    assert proxy.connection_count == 1  # accepted: the client's timeout did the work


@pytest.mark.parametrize(
    ("sslmode", "ending", "expected"),
    [
        ("disable", "reset_existing", CLOSED),
        ("require", "reset_existing", CLOSED),
        ("disable", "stop", CLOSED),
        # A FIN without TLS close_notify: OpenSSL reports a bare EOF.
        ("require", "stop", "SSL SYSCALL error: EOF detected"),
    ],
)
def test_silence_mid_query_blocks_until_the_connection_is_broken(
    proxy: FaultProxy, sslmode: str, ending: str, expected: str
) -> None:
    conn = connect(proxy, sslmode=sslmode, options="-c statement_timeout=0")
    try:
        assert select_one(conn) == 1
        proxy.silence()

        query = BlockedQuery(conn)
        assert not query.finished_within(1.0), "a silenced connection answered"

        getattr(proxy, ending)()
        assert query.finished_within(10.0)
        assert not query.returned
        assert isinstance(query.error, psycopg2.OperationalError)
        assert str(query.error).startswith(expected), str(query.error)
    finally:
        conn.close()


def test_a_silenced_connection_stays_silent_after_pass_through(proxy: FaultProxy) -> None:
    old = connect(proxy)
    try:
        proxy.silence()
        proxy.pass_through()
        query = BlockedQuery(old)
        assert not query.finished_within(0.5)

        with connect(proxy) as fresh:  # new connections are relayed again
            assert select_one(fresh) == 1
        fresh.close()

        proxy.reset_existing()
        assert query.finished_within(10.0)
    finally:
        old.close()


def test_stop_is_idempotent_and_frees_the_port() -> None:
    proxy = FaultProxy(upstream_host=SERVER[0], upstream_port=SERVER[1]).start()
    conn = connect(proxy)
    threads_before = threading.active_count()

    proxy.stop()
    proxy.stop()

    assert threading.active_count() < threads_before
    with pytest.raises(psycopg2.OperationalError, match="Connection refused"):
        connect(proxy)
    with pytest.raises(psycopg2.OperationalError, match=CLOSED):
        select_one(conn)
    conn.close()


def test_small_writes_are_forwarded_at_once() -> None:
    """Write-write-read through the proxy: without TCP_NODELAY on its sockets the second
    small chunk waits for the first one's delayed ACK (about 9 ms a round here, 364 ms in all);
    with it, 3 ms in all."""
    server = socket.create_server(("127.0.0.1", 0))
    rounds = 40

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            for _ in range(rounds):
                got = b""
                while len(got) < 2:
                    got += conn.recv(2 - len(got))
                conn.sendall(b"!")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=server.getsockname()[1]) as relay:
        client = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        for _ in range(rounds):
            client.sendall(b"a")
            client.sendall(b"b")
            assert client.recv(1) == b"!"
        elapsed = time.monotonic() - started
        client.close()
    thread.join(timeout=10)
    server.close()
    print(f"\n{rounds} write-write-read rounds through the proxy: {elapsed * 1000:.0f} ms")
    assert elapsed < rounds * 0.005, f"{elapsed:.3f} s: the proxy delays small writes (Nagle + delayed ACK)"


def test_refuse_keeps_connections_the_kernel_completed_before_the_proxy_took_them() -> None:
    """A connect returns once the kernel has queued it, before the acceptor takes it: refusing
    right then must not reset it (closing a listener resets its backlog), or a test that connects
    and refuses at once sees a reset it did not ask for."""
    with echo_server() as port, FaultProxy(upstream_host="127.0.0.1", upstream_port=port) as relay:
        burst = [socket.create_connection(relay.address, timeout=5) for _ in range(60)]
        relay.refuse()
        echoed = []
        for sock in burst:
            try:
                sock.sendall(b"ping")
                echoed.append(sock.recv(4) == b"ping")
            except OSError:
                echoed.append(False)
            sock.close()
        assert echoed == [True] * len(burst)
