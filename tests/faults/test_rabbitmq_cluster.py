"""A real three-node RabbitMQ cluster: the command queue (quorum) survives the loss of its leader's node.

The cluster (tests/support/rabbit_cluster.py) is started once for the module, its nodes are SIGKILLed and
brought back by the tests, and each test starts with every node running. The shared broker on 5672 is not used.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from brownout._dispatch.publisher import Publisher, PublishRejected
from tests.integration.test_publisher import message
from tests.support.rabbit_cluster import RabbitCluster
from tests.support.rabbit_nodes import InOrder

PUBLISH_DEADLINE = 2.0
FIRST_CONFIRM_BOUND = 10.0  # seconds from a leader's kill to a confirmed publish on a survivor (target: under 5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    started = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        started.start()
        yield started
    finally:
        started.stop()


@pytest.fixture
def running(cluster: RabbitCluster) -> RabbitCluster:
    """The cluster with every node up (a test before may have left one down)."""
    down = [node for node in cluster.nodes if not node.running]
    for node in down:
        node.launch()
    for node in down:
        node.wait_ready()
    if len(cluster.running_names()) != len(cluster.nodes):
        raise RuntimeError(f"nodes missing from the cluster: {cluster.running_names()}")
    return cluster


@pytest.fixture
def cluster_queue() -> str:
    return f"bo-cluster-{uuid.uuid4().hex[:10]}"


def publish_until_confirmed(publisher: Publisher, queue: str, number: int, give_up_at: float) -> list[str]:
    """Publish *number* until confirmed; return the rejection reasons seen before."""
    reasons: list[str] = []
    while time.monotonic() < give_up_at:
        try:
            publisher.publish(message(queue, number, actor_name="apply_command"), timeout=PUBLISH_DEADLINE)
            return reasons
        except PublishRejected as rejected:
            reasons.append(rejected.reason)
            time.sleep(0.1)
    raise AssertionError(f"no confirmed publish by the deadline; rejections: {reasons[-5:]} of {len(reasons)}")


def test_a_publisher_whose_node_led_the_queue_publishes_on_a_survivor_soon_after_the_kill(
    running: RabbitCluster, cluster_queue: str
) -> None:
    """Its node dies with the queue's leader; it reconnects to a survivor during the election. RabbitMQ nacks
    publishes on a channel opened then for as long as that channel lives: the publisher must reopen it."""
    urls = [node.url for node in running.nodes]
    with Publisher(
        url=urls, queue_name=cluster_queue, max_length=10000, queue_type="quorum", confirm_timeout=PUBLISH_DEADLINE, rng=InOrder()
    ) as publisher:
        publisher.publish(message(cluster_queue, 0, actor_name="apply_command"))
        leader = running.leader(cluster_queue)
        assert leader is running.nodes[0], "declared through the first node, which leads it"

        leader.kill()
        killed_at = time.monotonic()
        reasons = publish_until_confirmed(publisher, cluster_queue, 1, killed_at + 30)
        first_confirm = time.monotonic() - killed_at
        print(f"first confirm {first_confirm:.1f}s after the leader kill ({len(reasons)} rejected first: {set(reasons)})")

        for number in range(2, 12):  # and it stays confirmed
            publisher.publish(message(cluster_queue, number, actor_name="apply_command"), timeout=PUBLISH_DEADLINE)

    assert first_confirm < FIRST_CONFIRM_BOUND
    assert running.leader(cluster_queue) is not leader
