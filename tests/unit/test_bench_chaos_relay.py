"""The chaos harness's own proxies (bench/chaoskit/relay.py) keep FaultProxy's faults, and its
calibration judges a step as documented. Loopback sockets only: no service needed."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chaoskit.calibrate import Calibration  # noqa: E402
from bench.chaoskit.load import step_verdict  # noqa: E402
from bench.chaoskit.proxies import Proxy, ProxyHub  # noqa: E402
from tests.support.echo_server import echo_server  # noqa: E402


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port


@pytest.fixture(scope="module", params=[False, True], ids=["copy", "splice"])
def hub(request: pytest.FixtureRequest, echo_port: int) -> Iterator[ProxyHub]:
    hub = ProxyHub({"echo": echo_port}, splice=request.param)  # one child per variant: each takes a second to start
    yield hub
    hub.stop()
    assert hub.process.returncode == 0


@pytest.fixture
def proxy(hub: ProxyHub) -> Iterator[Proxy]:
    proxy = hub.proxies["echo"]
    yield proxy
    proxy.pass_through()
    proxy.reset_existing()


def _client(proxy: Proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def _echoes(sock: socket.socket, data: bytes = b"ping", *, wait: float = 5.0) -> bool:
    """Whether *data* comes back within *wait* seconds (short where silence is expected, long on a busy machine)."""
    sock.settimeout(wait)
    sock.sendall(data)
    got = b""
    try:
        while len(got) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                return False
            got += chunk
    except TimeoutError:
        return False
    return got == data


def test_relays_both_ways_large_and_small(proxy: Proxy) -> None:
    with _client(proxy) as sock:
        assert _echoes(sock)
        assert _echoes(sock, b"x" * 3_000_000)  # more than any buffer on the way: backpressure both ways


def test_refuse_closes_the_listener_only_and_pass_through_binds_the_same_port(proxy: Proxy) -> None:
    with _client(proxy) as open_one:
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        assert _echoes(open_one)
        proxy.pass_through()
        with _client(proxy) as sock:
            assert _echoes(sock)


def test_refuse_keeps_connections_the_kernel_completed_before_the_relay_took_them(proxy: Proxy) -> None:
    """A connect returns once the kernel has queued it, before the relay's accept: refusing then
    must not reset it (closing a listener resets its backlog)."""
    os.kill(proxy.hub.pid, signal.SIGSTOP)  # the relay takes none of them until it has the command
    try:
        burst = [_client(proxy) for _ in range(200)]  # more than the relay accepts per wake-up
        refusing = threading.Thread(target=proxy.refuse)
        refusing.start()
    finally:
        os.kill(proxy.hub.pid, signal.SIGCONT)
    refusing.join(timeout=10)
    try:
        assert [_echoes(sock) for sock in burst] == [True] * len(burst)
    finally:
        for sock in burst:
            sock.close()


def test_reset_answers_new_connections_with_rst(proxy: Proxy) -> None:
    proxy.reset()
    with pytest.raises(ConnectionResetError):
        with _client(proxy) as sock:
            sock.sendall(b"x")
            sock.recv(10)


def test_reset_existing_sends_rst_to_open_connections(proxy: Proxy) -> None:
    with _client(proxy) as sock:
        assert _echoes(sock)
        proxy.reset_existing()
        assert proxy.counts()[1] == 0
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"x")
            sock.recv(10)


def test_silence_black_holes_new_and_open_connections_for_good(proxy: Proxy) -> None:
    with _client(proxy) as open_one:
        assert _echoes(open_one)
        proxy.silence()
        assert not _echoes(open_one, wait=0.3)
        with _client(proxy) as new_one:  # accepted, never answered
            assert not _echoes(new_one, wait=0.3)
        proxy.pass_through()
        assert not _echoes(open_one, wait=0.3)  # a silenced stream stays broken
        with _client(proxy) as sock:
            assert _echoes(sock)


def test_a_calibration_step_fails_on_p99_lag_or_errors() -> None:
    stop = {"p99_ms": 100.0, "lag_ms": 20.0, "lag_fraction": 0.01, "error_fraction": 0.01}
    fast = [[i * 0.01, i * 0.01 + 0.001, i * 0.01 + 0.02, "list", 200, 0, "", 0] for i in range(200)]
    assert step_verdict(fast, 0, stop)["ok"]
    late = [row[:1] + [row[0] + 0.05] + row[2:] for row in fast[:3]] + fast[3:]
    assert step_verdict(late, 0, stop)["lagged"]
    assert not step_verdict(fast, 3, stop)["ok"]  # shed requests were never sent: lag
    slow = [row[:2] + [row[0] + 0.2] + row[3:] for row in fast]
    assert not step_verdict(slow, 0, stop)["ok"]
    failed = [row[:4] + [503] + row[5:] for row in fast[:3]] + fast[3:]
    assert not step_verdict(failed, 0, stop)["ok"]


def test_the_timeline_runs_at_the_fraction_of_the_last_step_that_passed() -> None:
    steps = [
        {"writes": 10.0, "reads": 20.0, "ok": True},
        {"writes": 20.0, "reads": 40.0, "ok": True},
        {"writes": 40.0, "reads": 80.0, "ok": False},
    ]
    calibration = Calibration(steps, 0.5, 1 / 3)
    assert calibration.capacity == 60.0
    assert calibration.rates() == (10.0, 20.0)
