"""A throwaway RabbitMQ node: a real alarm and a real restart, which the shared node must never see."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pika
import pytest

from tests.support.polling import wait_until

RABBITMQ_SBIN = os.environ.get("BROWNOUT_TEST_RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin")  # the scripts, not the su wrappers


def require_rabbitmq_scripts() -> None:
    """Fail under CI (a missing prerequisite must not pass as a skip), skip elsewhere, without RabbitMQ's scripts."""
    if not os.path.exists(f"{RABBITMQ_SBIN}/rabbitmq-server"):
        message = f"no RabbitMQ scripts in {RABBITMQ_SBIN} (BROWNOUT_TEST_RABBITMQ_SBIN)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PortTaken(RuntimeError):
    """The node could not listen on the port chosen for it."""


class ThrowawayRabbit:
    """A RabbitMQ node of our own (name, ports, data, cookie in a temp folder), started for
    this module and shut down after it; `ctl` runs rabbitmqctl against it only."""

    def __init__(self, folder: Path, *, node: str | None = None, home: Path | None = None, erl_args: str = "") -> None:
        """*home*: where the Erlang cookie is (nodes of one cluster share it); *erl_args*: extra VM flags."""
        self.node = node or f"bo-test-{uuid.uuid4().hex[:8]}@localhost"
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.home = home or folder / "home"
        self.erl_args = erl_args
        self.home.mkdir(exist_ok=True)
        (folder / "env.conf").write_text("")
        (folder / "enabled_plugins").write_text("[].\n")
        self._choose_ports()

    def _choose_ports(self) -> None:
        folder = self.folder
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        inherited = {key: value for key, value in os.environ.items() if not key.startswith(("RABBITMQ_", "ERL_"))}
        self.env = inherited | {
            "HOME": str(self.home),  # the node writes its Erlang cookie here; ctl reads it
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "env.conf"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        if self.erl_args:
            self.env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = self.erl_args

    def start(self) -> None:
        """Start the node; a port taken between its probe and the node's bind (another test's ephemeral port,
        seen in CI) means new ports and another try, up to three."""
        for attempt in range(3):
            try:
                self._start_once()
                return
            except PortTaken:
                if attempt == 2:
                    raise
                self._choose_ports()

    def _start_once(self) -> None:
        (self.folder / "stdout").write_bytes(b"")  # a PortTaken is read from this attempt's output only
        self.launch()
        self.wait_ready()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        """Start the node's VM without waiting for it (`wait_ready` does)."""
        with open(self.folder / "stdout", "ab") as output:
            self.process = subprocess.Popen(
                [f"{RABBITMQ_SBIN}/rabbitmq-server"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: ours to end, and only ours
            )

    def wait_ready(self, timeout: float = 120) -> None:
        if not wait_until(self._accepts_amqp, timeout=timeout, interval=0.5):
            raise RuntimeError(f"throwaway RabbitMQ did not start; see {self.folder}")

    def _accepts_amqp(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            if b"could_not_start_listener" in (self.folder / "stdout").read_bytes():
                raise PortTaken(self.port)
            raise RuntimeError(f"throwaway RabbitMQ exited; see {self.folder / 'stdout'}")
        try:
            parameters = pika.URLParameters(self.url)
            parameters.socket_timeout = parameters.stack_timeout = 2.0
            pika.BlockingConnection(parameters).close()
            return True
        except pika.exceptions.AMQPError:
            return False

    def ctl(self, *arguments: str, tool: str = "rabbitmqctl") -> str:
        done = subprocess.run(
            [f"{RABBITMQ_SBIN}/{tool}", "-n", self.node, *arguments],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        return done.stdout.decode()

    def kill(self) -> None:
        """SIGKILL of the whole process group (the VM and its helpers): the node's loss, not a shutdown."""
        if self.running:
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if not self.running:
            return
        assert self.process is not None
        try:
            self.ctl("shutdown")
            self.process.wait(20)
        except (subprocess.SubprocessError, OSError):
            self.kill()
