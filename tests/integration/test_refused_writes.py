"""A write whose data breaks a rule its apply checks (here: an order for a customer who does not exist) is
refused the same way on both paths: 422 with the reason when applied at once, recorded `dropped` with the
reason when the worker applies it; never a 500, never a dead letter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Header
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from brownout import Command, Effect, Envelope, Queued, Refused, Registry, Settings
from brownout._schema import applied_commands, dead_letters
from brownout._worker.actors import ApplyRuntime, declare_apply_actor
from brownout.fastapi import Brownout
from tests.support.polling import wait_until
from tests.support.worker_rig import WorkerRig


class PlaceOrderV1(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order_id: int
    customer_id: int


def place_order(session: Session, envelope: Envelope, payload: BaseModel) -> Effect:
    assert isinstance(payload, PlaceOrderV1)
    if session.execute(text("SELECT 1 FROM customers WHERE id = :id"), {"id": payload.customer_id}).first() is None:
        raise Refused(f"customer {payload.customer_id} does not exist")
    session.execute(text("INSERT INTO orders VALUES (:o, :c)"), {"o": payload.order_id, "c": payload.customer_id})
    return Effect({"id": payload.order_id})


def registry() -> Registry:
    built = Registry()
    built.register(
        Command(
            name="place_order",
            versions={1: PlaceOrderV1},
            scope=lambda payload: "orders",
            entity=lambda payload, derived: derived,
            apply=place_order,
            entity_kind="order",
        )
    )
    return built


@pytest.fixture
def shop(api_settings: Callable[..., Settings], queue_name: str) -> Iterator[tuple[TestClient, Brownout]]:
    brownout = Brownout(api_settings(), registry=registry())
    app = brownout.init_app(FastAPI())

    @app.post("/orders")
    def order(body: PlaceOrderV1, idempotency_key: str = Header()) -> dict[str, Any]:
        outcome = brownout.dispatcher.submit("place_order", body.model_dump(), idempotency_key=idempotency_key)
        return {"queued": isinstance(outcome, Queued)}

    with TestClient(app, raise_server_exceptions=False) as client:
        with brownout.database.session() as s:
            s.execute(text("CREATE TABLE customers (id bigint PRIMARY KEY)"))
            s.execute(text("CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers)"))
            s.execute(text("INSERT INTO customers VALUES (1)"))
            s.commit()
        yield client, brownout


def count(brownout: Brownout, table: Any) -> int:
    with brownout.database.session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def test_applied_at_once_a_refusal_is_a_422_with_its_reason_and_nothing_recorded(
    shop: tuple[TestClient, Brownout],
) -> None:
    client, brownout = shop
    assert client.post("/orders", json={"order_id": 1, "customer_id": 1}, headers={"Idempotency-Key": "a"}).json() == {
        "queued": False
    }
    refused = client.post("/orders", json={"order_id": 2, "customer_id": 99}, headers={"Idempotency-Key": "b"})
    assert refused.status_code == 422, refused.text
    assert refused.json() == {"detail": "customer 99 does not exist"}
    assert count(brownout, applied_commands) == 1


def test_queued_a_refusal_is_recorded_dropped_with_its_reason_not_dead_lettered(
    shop: tuple[TestClient, Brownout], make_worker_rig: Callable[..., WorkerRig], queue_name: str
) -> None:
    client, brownout = shop
    brownout.database.breaker.force_open()
    queued = client.post("/orders", json={"order_id": 3, "customer_id": 99}, headers={"Idempotency-Key": "c"})
    assert queued.json() == {"queued": True}, queued.text
    brownout.database.breaker.reset()
    outcomes: list[str] = []
    runtime = ApplyRuntime(database=brownout.database, registry=registry(), observe=lambda o, s: outcomes.append(o))
    rig = make_worker_rig(max_length=brownout.settings.queue_max_length)  # the queue as the web declared it
    declare_apply_actor(rig.broker, runtime, queue_name=queue_name)
    rig.start({queue_name}, threads=1)
    assert wait_until(lambda: outcomes == ["dropped"], timeout=20), outcomes
    with brownout.database.session() as s:
        row = s.execute(select(applied_commands.c.outcome, applied_commands.c.result)).one()
    assert (row.outcome, row.result) == ("dropped", {"dropped": "customer 99 does not exist"})
    assert count(brownout, dead_letters) == 0


def test_a_refused_write_gives_its_key_back_for_the_corrected_one(shop: tuple[TestClient, Brownout]) -> None:
    """The key was claimed in Redis for the refused body, and the corrected body under it was a 422 conflict."""
    client, brownout = shop
    refused = client.post("/orders", json={"order_id": 4, "customer_id": 99}, headers={"Idempotency-Key": "d"})
    assert refused.status_code == 422, refused.text
    corrected = client.post("/orders", json={"order_id": 4, "customer_id": 1}, headers={"Idempotency-Key": "d"})
    assert corrected.status_code == 200 and corrected.json() == {"queued": False}, corrected.text
    again = client.post("/orders", json={"order_id": 5, "customer_id": 1}, headers={"Idempotency-Key": "d"})
    assert again.status_code == 422 and "another body" in again.text  # a key that recorded a write stays its
