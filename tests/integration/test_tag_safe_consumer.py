"""A job delivered on a channel since closed is never settled on the new one (the email queue's consumer).

Against the real RabbitMQ: a consumer takes a job, its connection goes (as a lost link or a health-gate
pause makes Dramatiq rebuild it), a new consumer takes a job under the same delivery tag (tags restart at
1 per channel), and the old job's ack arrives, as Dramatiq's Worker sends it, to the new consumer. Dramatiq's
stock consumer acknowledged the new consumer's job, which had not run: RabbitMQ dropped it, and its outbox
row, already marked published, was never relayed again. The broker's consumer now skips that ack.
"""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.rabbitmq import _RabbitmqConsumer

from brownout._dispatch.queues import BrownoutRabbitmqBroker, TagSafeConsumer
from tests.support.polling import wait_until
from tests.support.rabbit import RABBITMQ_URL, ready_count


def next_message(consumer: Any) -> Any:
    give_up = time.monotonic() + 10
    while time.monotonic() < give_up:
        message = next(consumer)
        if message is not None:
            return message
    raise AssertionError("no delivery")


@pytest.mark.parametrize("consumer_class", [TagSafeConsumer, _RabbitmqConsumer], ids=["brownout", "dramatiq-stock"])
def test_an_ack_from_a_closed_channel_does_not_settle_another_job(queue_name: str, consumer_class: type[Any]) -> None:
    broker = BrownoutRabbitmqBroker(url=RABBITMQ_URL, max_length=100)
    broker.consumer_class = consumer_class
    try:
        broker.declare_queue(queue_name, ensure=True)
        for n in range(2):
            broker.enqueue(dramatiq.Message(queue_name=queue_name, actor_name="send_email", args=(n,), kwargs={}, options={}))
        first = broker.consume(queue_name, prefetch=1, timeout=100)
        old_job = next_message(first)
        first.close()  # the link is lost: RabbitMQ takes the unacknowledged job back
        second = broker.consume(queue_name, prefetch=1, timeout=100)
        new_job = next_message(second)
        assert old_job._tag == new_job._tag == 1  # the same tag, on another channel
        second.ack(old_job)  # the old job's handler finished: Dramatiq acks it through the current consumer
        second.close()
        # Both jobs back in the queue: nothing ran to completion on an open channel. Dramatiq's stock consumer
        # leaves one: the new job, acknowledged by the old job's tag, is gone (the defect, kept visible here).
        expected = 2 if consumer_class is TagSafeConsumer else 1
        assert wait_until(lambda: ready_count(queue_name) == expected, timeout=5), ready_count(queue_name)
    finally:
        broker.close()
