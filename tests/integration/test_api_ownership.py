"""Ownership on the write path: an end user marks only their own notifications, on every path (direct,
queued and applied by the worker), sees only the commands they issued, and no caller's Idempotency-Key
can collide with, or claim, another caller's write. Real PostgreSQL, Redis and RabbitMQ."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from sqlalchemy import func, select

from app.dispatch.notifications import CREATE, MARK_READ, build_registry
from app.schema import notifications
from brownout._auth.keys import entry_for
from brownout._db import Database
from brownout._dispatch.dead_letters import store
from brownout._dispatch.dispatcher import Dispatcher
from brownout._dispatch.envelope import Envelope
from brownout._dispatch.waiting import WaitLimits
from brownout._schema import applied_commands, dead_letters
from brownout._settings import Settings
from brownout._worker.actors import ApplyRuntime, declare_apply_actor
from tests.support.api_server import RunningApi, serve_in_thread
from tests.support.credentials import SERVICE_KEY_ENTRY
from tests.support.jwt_issuer import SECRET, mint_hs256, supabase_claims
from tests.support.polling import wait_until
from tests.support.rabbit import ready_count
from tests.support.worker_rig import WorkerRig

READER = "bo_a-reader-key-for-the-ownership-tests-0123456"
OTHER_WRITER = "bo_another-writer-key-for-the-ownership-tests"
MAX_LENGTH = 1000  # the queue's, as the web and the worker declare it
NOTE = {"email": "ada@example.com", "subject": "Hello", "body": "b"}


@pytest.fixture
def api(api_settings: Callable[..., Settings]) -> Iterator[RunningApi]:
    keys = ",".join((SERVICE_KEY_ENTRY, entry_for("reader", READER, ["read"]), entry_for("other", OTHER_WRITER, ["write"])))
    with serve_in_thread(api_settings(api_keys=keys, jwt_secret=SECRET, queue_max_length=MAX_LENGTH)) as running:
        yield running


@pytest.fixture
def db(make_database: Callable[..., Database]) -> Database:
    return make_database()


@pytest.fixture
def run_worker(
    make_database: Callable[..., Database], queue_name: str, make_worker_rig: Callable[..., WorkerRig]
) -> Callable[..., None]:
    """The real apply actor on this test's queue, with its own Database (as in its own dyno)."""

    def start(limits: WaitLimits | None = None) -> None:
        rig = make_worker_rig(max_length=MAX_LENGTH)
        runtime = ApplyRuntime(
            database=make_database(),
            registry=build_registry(),
            limits=limits or WaitLimits(),
            defer_base_seconds=0.05,
            defer_cap_seconds=0.2,
        )
        declare_apply_actor(rig.broker, runtime, queue_name=queue_name)
        rig.start({queue_name}, threads=1)

    return start


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def as_user(user_id: str) -> dict[str, str]:
    return bearer(mint_hs256(supabase_claims(time.time(), sub=user_id)))


def create_for(api: RunningApi, user_id: str) -> str:
    response = api.client.post("/notifications", json=NOTE | {"user_id": user_id})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def count(db: Database, table: Any) -> int:
    with db.session() as session:
        return int(session.execute(select(func.count()).select_from(table)).scalar_one())


def read_of(db: Database, notification_id: str) -> bool:
    with db.session() as session:
        return bool(
            session.execute(select(notifications.c.read).where(notifications.c.id == uuid.UUID(notification_id))).scalar_one()
        )


def test_a_user_marks_their_own_notification_and_not_anothers(api: RunningApi, db: Database) -> None:
    mine, theirs = create_for(api, "ada"), create_for(api, "bob")
    as_ada = as_user("ada")
    marked = api.client.post(f"/notifications/{mine}/read", headers=as_ada)
    assert marked.status_code == 200, marked.text
    assert marked.json()["read"] is True and read_of(db, mine)
    assert api.client.post(f"/notifications/{mine}/unread", headers=as_ada).json()["read"] is False

    recorded = count(db, applied_commands)
    refused = api.client.post(f"/notifications/{theirs}/read", headers=as_ada)
    assert refused.status_code == 404, refused.text
    unknown = uuid.uuid4()
    missing = api.client.post(f"/notifications/{unknown}/read", headers=as_ada)
    assert missing.status_code == 404
    # The same answer as for a notification that does not exist: its existence is not revealed.
    assert refused.json() == {"detail": missing.json()["detail"].replace(str(unknown), theirs)}
    assert count(db, applied_commands) == recorded, "nothing recorded"
    assert read_of(db, theirs) is False
    assert api.client.get(f"/notifications/{theirs}").json()["read"] is False

    as_bob = api.client.post(f"/notifications/{theirs}/read", headers=as_user("bob"))
    assert as_bob.status_code == 200 and read_of(db, theirs)
    reader = api.client.post(f"/notifications/{theirs}/unread", headers=bearer(READER))
    assert reader.status_code == 403, "a service needs the write scope"


def test_a_queued_mark_on_anothers_notification_is_told_apart_from_a_missing_one_by_nothing(
    api: RunningApi, db: Database, queue_name: str, run_worker: Callable[..., None]
) -> None:
    """Its command's status is what a mark of a notification that does not exist shows, at every moment: queued
    while it waits for a creation, then dropped with the same reason (it was dropped at once, "not the caller's
    notification", which told the caller the id exists)."""
    theirs, mine, unknown = create_for(api, "bob"), create_for(api, "ada"), str(uuid.uuid4())
    api.brownout.database.breaker.force_open()
    commands = {}
    for target in (theirs, unknown):
        queued = api.client.post(f"/notifications/{target}/read", headers=as_user("ada"))
        assert queued.status_code == 202, queued.text  # the database cannot tell whose it is now
        commands[target] = queued.json()["command_id"]
    # Her own mark, queued beside them (one batch for the worker): refusing one write costs the other nothing.
    assert api.client.post(f"/notifications/{mine}/read", headers=as_user("ada")).status_code == 202
    # Bob's reads do not show ada's queued mark as if it were his.
    shown = api.client.get(f"/notifications/{theirs}", headers=as_user("bob"))
    assert shown.status_code == 200 and shown.json()["read"] is False, shown.text
    api.brownout.database.breaker.reset()

    def status(target: str) -> dict[str, Any]:
        answer = api.client.get(f"/commands/{commands[target]}", headers=as_user("ada"))
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    run_worker(WaitLimits(dependency_seconds=2.0))
    assert wait_until(lambda: read_of(db, mine) is True, timeout=20)
    assert status(theirs)["status"] == status(unknown)["status"] == "queued"  # both wait for a creation
    assert wait_until(lambda: status(theirs)["status"] == status(unknown)["status"] == "dropped", timeout=20)
    reasons = {target: status(target)["result"]["dropped"].replace(target, "ID") for target in (theirs, unknown)}
    assert reasons[theirs] == reasons[unknown]
    assert ready_count(queue_name) == 0 and count(db, dead_letters) == 0, "an ordinary refusal is no dead letter"
    assert read_of(db, theirs) is False
    assert api.client.get(f"/notifications/{theirs}", headers=as_user("bob")).json()["read"] is False


def test_a_command_is_seen_by_its_issuer_and_a_reader_only(
    api: RunningApi, db: Database, queue_name: str, run_worker: Callable[..., None]
) -> None:
    mine = create_for(api, "ada")
    api.brownout.database.breaker.force_open()
    queued = api.client.post(f"/notifications/{mine}/read", headers=as_user("ada"))
    assert queued.status_code == 202, queued.text
    path = f"/commands/{queued.json()['command_id']}"

    def seen_by() -> dict[str, int]:
        return {
            who: api.client.get(path, headers=headers).status_code
            for who, headers in (("ada", as_user("ada")), ("bob", as_user("bob")), ("reader", bearer(READER)))
        }

    assert seen_by() == {"ada": 200, "bob": 404, "reader": 200}  # from the pending record in Redis
    assert "caller" not in api.client.get(path, headers=as_user("ada")).json()
    api.brownout.database.breaker.reset()
    run_worker()
    assert wait_until(lambda: read_of(db, mine), timeout=20)
    assert api.client.get(path, headers=as_user("ada")).json()["status"] == "applied"
    assert seen_by() == {"ada": 200, "bob": 404, "reader": 200}  # from applied_commands
    assert api.client.get(f"/commands/{uuid.uuid4()}", headers=as_user("ada")).status_code == 404


def test_a_dead_lettered_command_is_seen_by_its_issuer_only(api: RunningApi, db: Database, queue_name: str) -> None:
    dispatcher: Dispatcher = api.services.writes._dispatcher
    envelope = dispatcher.accept(MARK_READ, {"notification_id": str(uuid.uuid4())}, caller="user:ada")
    with db.session() as session:
        store(session, envelope.to_message(queue_name), "waited too long")
        session.commit()
    path = f"/commands/{envelope.command_id}"
    failed = api.client.get(path, headers=as_user("ada"))
    assert failed.status_code == 200 and failed.json()["status"] == "failed", failed.text
    assert api.client.get(path, headers=as_user("bob")).status_code == 404
    assert api.client.get(path, headers=bearer(READER)).status_code == 200


def test_the_same_key_from_two_callers_makes_two_commands(api: RunningApi, db: Database) -> None:
    key = {"Idempotency-Key": "same-key"}
    body = NOTE | {"user_id": "ada"}
    first = api.client.post("/notifications", json=body, headers=key)
    other = api.client.post("/notifications", json=body, headers=key | bearer(OTHER_WRITER))
    again = api.client.post("/notifications", json=body, headers=key)
    assert first.status_code == other.status_code == 201, (first.text, other.text)
    assert first.json()["id"] != other.json()["id"], "neither caller claims the other's write"
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"], "the same caller's retry is a replay"
    assert count(db, notifications) == 2

    mine = first.json()["id"]
    api.brownout.database.breaker.force_open()
    by_service = api.client.post(f"/notifications/{mine}/read", headers=key)
    by_user = api.client.post(f"/notifications/{mine}/read", headers=key | as_user("ada"))
    assert by_service.status_code == by_user.status_code == 202, (by_service.text, by_user.text)
    assert by_service.json()["command_id"] != by_user.json()["command_id"]


def test_a_retry_of_a_creation_the_previous_release_accepted_is_the_same_write(
    api: RunningApi, db: Database, queue_name: str, run_worker: Callable[..., None]
) -> None:
    """The upgrade window: the previous release claimed the key (and queued the write) without a caller in
    its ids; the same service retrying with the same key after the upgrade gets the same command."""
    writes = api.services.writes
    body = NOTE | {"user_id": "ada"}
    api.brownout.database.breaker.force_open()
    legacy = writes._dispatcher.accept(CREATE, body, idempotency_key="before-the-upgrade")
    assert legacy.caller is None
    writes._claim_key(legacy)  # what the previous release did for a client's key
    assert writes._dispatcher.enqueue(legacy).command_id == legacy.command_id  # type: ignore[union-attr]

    retried = api.client.post("/notifications", json=body, headers={"Idempotency-Key": "before-the-upgrade"})
    assert retried.status_code == 202, retried.text
    assert retried.json()["command_id"] == str(legacy.command_id) and retried.json()["id"] == str(legacy.entity_id)
    api.brownout.database.breaker.reset()
    run_worker()
    assert wait_until(lambda: count(db, applied_commands) == 1 and ready_count(queue_name) == 0, timeout=20)
    assert count(db, notifications) == 1


def test_a_message_queued_by_the_previous_release_applies_once(
    api: RunningApi, db: Database, queue_name: str, run_worker: Callable[..., None]
) -> None:
    dispatcher: Dispatcher = api.services.writes._dispatcher
    envelope = dispatcher.accept(CREATE, NOTE | {"user_id": "ada"}, idempotency_key="old")
    data = envelope.model_dump(mode="json")
    del data["caller"]  # the previous release's envelope has no such field
    assert Envelope.model_validate(data).caller is None
    message: dramatiq.Message[Any] = dataclass_replace_args(envelope.to_message(queue_name), data)
    for _ in range(2):  # delivered twice
        dispatcher._publisher.publish(message)  # type: ignore[union-attr]
    run_worker()
    assert wait_until(lambda: count(db, applied_commands) == 1 and ready_count(queue_name) == 0, timeout=20)
    assert count(db, notifications) == 1
    assert count(db, dead_letters) == 0


def dataclass_replace_args(message: dramatiq.Message[Any], data: dict[str, Any]) -> dramatiq.Message[Any]:
    return message.copy(args=(data,))


def test_anothers_notification_queued_then_applied_answers_a_mark_as_a_missing_one(
    api: RunningApi, db: Database, queue_name: str, run_worker: Callable[..., None]
) -> None:
    """Its pending entry stays in Redis after the worker applies it: a mark that waited for a creation asked Redis
    and was queued (202) where a missing id was a 404."""
    api.brownout.database.breaker.force_open()
    created = api.client.post("/notifications", json=NOTE | {"user_id": "bob"})
    assert created.status_code == 202, created.text
    theirs = created.json()["id"]
    api.brownout.database.breaker.reset()
    run_worker()
    assert wait_until(lambda: count(db, applied_commands) == 1 and ready_count(queue_name) == 0, timeout=20)
    unknown = str(uuid.uuid4())
    missing = api.client.post(f"/notifications/{unknown}/read", headers=as_user("ada"))
    other = api.client.post(f"/notifications/{theirs}/read", headers=as_user("ada"))
    assert other.status_code == missing.status_code == 404, other.text
    assert other.json() == {"detail": missing.json()["detail"].replace(unknown, theirs)}
