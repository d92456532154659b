"""A throwaway three-node RabbitMQ cluster on this machine: names, ports, data and one Erlang cookie of its own.

Each node is a ThrowawayRabbit sharing the cluster's cookie; the shared broker on 5672 is never touched. Nodes
start in parallel (two cores are tight for three Erlang VMs: each runs one scheduler and never busy-waits), then
the second and third join the first with rabbitmqctl, the documented way. A node's `kill` is a SIGKILL of its
process group; `launch` and `wait_ready` bring it back on its own data, where it rejoins the cluster by itself.
"""

from __future__ import annotations

import json
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.polling import wait_until
from tests.support.throwaway_rabbit import ThrowawayRabbit

# One scheduler, no busy waiting: an idle VM then costs (almost) no CPU.
ERL_ARGS = "+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none"


class RabbitCluster:
    def __init__(self, folder: Path, size: int = 3) -> None:
        home = folder / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        tag = uuid.uuid4().hex[:6]
        self.nodes = []
        for i in range(1, size + 1):
            (folder / f"node{i}").mkdir()
            node = ThrowawayRabbit(folder / f"node{i}", node=f"bo-c{tag}-{i}@localhost", home=home, erl_args=ERL_ARGS)
            self.nodes.append(node)

    @property
    def url(self) -> str:
        """Every node, ';'-separated: RABBITMQ_URL for a cluster."""
        return ";".join(node.url for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.launch()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.wait_ready(), self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
        if not wait_until(lambda: len(self.running_names()) == len(self.nodes), timeout=60, interval=0.5):
            raise RuntimeError(f"the cluster did not form: {self.running_names()}")

    def running_names(self) -> list[str]:
        node = next(node for node in self.nodes if node.running)
        status = json.loads(node.ctl("cluster_status", "--formatter", "json"))
        return list(status.get("running_nodes", []))

    def leader(self, queue: str) -> ThrowawayRabbit:
        """The node leading *queue* (a quorum queue), asked of a running member."""
        asker = next(node for node in self.nodes if node.running)
        members = json.loads(asker.ctl("quorum_status", queue, "--formatter", "json", tool="rabbitmq-queues"))
        leaders = [member["Node Name"] for member in members if member.get("Raft State") == "leader"]
        if not leaders:
            raise RuntimeError(f"no leader for {queue}: {members}")
        return next(node for node in self.nodes if node.node == leaders[0])

    def stop(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(), self.nodes))
