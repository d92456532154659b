"""A throwaway three-node RabbitMQ cluster on this machine: names, ports, data and one Erlang cookie of its own.

The shared broker on 5672 is never touched. Nodes start in parallel (two cores are tight for three Erlang VMs:
each VM runs one scheduler and never busy-waits), then the second and third join the first with rabbitmqctl, the
documented way. `kill` is a SIGKILL of a node's whole process group; `start` brings it back on its own data, where
it rejoins the cluster by itself.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pika

from tests.support.polling import wait_until
from tests.support.throwaway_rabbit import RABBITMQ_SBIN, free_port

# One scheduler, no busy waiting: an idle VM then costs (almost) no CPU.
ERL_ARGS = "+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none"


class ClusterNode:
    def __init__(self, folder: Path, name: str, home: Path) -> None:
        self.name = name
        self.folder = folder
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir()
        (folder / "env.conf").write_text("")
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        inherited = {key: value for key, value in os.environ.items() if not key.startswith(("RABBITMQ_", "ERL_"))}
        self.env = inherited | {
            "HOME": str(home),  # the cluster's one Erlang cookie is there
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "env.conf"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS,
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with open(self.folder / "stdout", "ab") as output:
            self.process = subprocess.Popen(
                [f"{RABBITMQ_SBIN}/rabbitmq-server"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: ours to kill, and only ours
            )

    def wait_ready(self, timeout: float = 120) -> None:
        if not wait_until(self._accepts_amqp, timeout=timeout, interval=0.5):
            raise RuntimeError(f"RabbitMQ node {self.name} did not start; see {self.folder}")

    def _accepts_amqp(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"RabbitMQ node {self.name} exited; see {self.folder / 'stdout'}")
        try:
            parameters = pika.URLParameters(self.url)
            parameters.socket_timeout = parameters.stack_timeout = 2.0
            pika.BlockingConnection(parameters).close()
            return True
        except pika.exceptions.AMQPError:
            return False

    def ctl(self, *arguments: str, tool: str = "rabbitmqctl", timeout: float = 60) -> str:
        done = subprocess.run(
            [f"{RABBITMQ_SBIN}/{tool}", "-n", self.name, *arguments],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        return done.stdout.decode()

    def kill(self) -> None:
        """SIGKILL, the whole process group (the VM and its helpers): the node's loss, not a shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if not self.running:
            return
        try:
            self.ctl("shutdown", timeout=30)
            assert self.process is not None
            self.process.wait(20)
        except (subprocess.SubprocessError, OSError):
            self.kill()


class RabbitCluster:
    def __init__(self, folder: Path, size: int = 3) -> None:
        home = folder / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        tag = uuid.uuid4().hex[:6]
        self.nodes = [ClusterNode(folder / f"node{i}", f"bo-c{tag}-{i}@localhost", home) for i in range(1, size + 1)]

    @property
    def url(self) -> str:
        """Every node, ';'-separated: RABBITMQ_URL for a cluster."""
        return ";".join(node.url for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.wait_ready(), self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        if not wait_until(lambda: len(self.running_names()) == len(self.nodes), timeout=60, interval=0.5):
            raise RuntimeError(f"the cluster did not form: {self.running_names()}")

    def running_names(self) -> list[str]:
        node = next(node for node in self.nodes if node.running)
        status = json.loads(node.ctl("cluster_status", "--formatter", "json"))
        return list(status.get("running_nodes", []))

    def node(self, name: str) -> ClusterNode:
        return next(node for node in self.nodes if node.name == name)

    def leader(self, queue: str) -> ClusterNode:
        """The node leading *queue* (a quorum queue), asked of a running member."""
        asker = next(node for node in self.nodes if node.running)
        members = json.loads(asker.ctl("quorum_status", queue, "--formatter", "json", tool="rabbitmq-queues"))
        leaders = [member["Node Name"] for member in members if member.get("Raft State") == "leader"]
        if not leaders:
            raise RuntimeError(f"no leader for {queue}: {members}")
        return self.node(leaders[0])

    def stop(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(), self.nodes))
