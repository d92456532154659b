"""The naive mode: the same routes and schema, plain SQLAlchemy with its defaults."""

from __future__ import annotations

import os
import uuid
from typing import Any

from sqlalchemy.engine import make_url


def naive_app() -> Any:
    """`uvicorn --factory bench.chaoskit.naive_app:naive_app`: what the service would be with everything off.

    create_engine() defaults (QueuePool 5 + 10, no pre-ping, no timeouts), one
    transaction per request, no breaker, retry, queue, cache or idempotency: a
    database error is FastAPI's plain 500."""
    from fastapi import Body, FastAPI, HTTPException
    from sqlalchemy import create_engine, func, insert, select, update
    from sqlalchemy.orm import Session

    from app.schema import notifications as table

    engine = create_engine(make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql+psycopg2"))
    app = FastAPI(title="naive")

    def as_json(row: Any) -> dict[str, Any]:
        return {
            "id": str(row.id),
            "user_id": row.user_id,
            "email": row.email,
            "subject": row.subject,
            "body": row.body,
            "read": row.read,
            "created_at": row.created_at.isoformat(),
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/notifications", status_code=201)
    def create(body: dict[str, Any] = Body()) -> dict[str, Any]:  # noqa: B008 (FastAPI's idiom)
        values = {key: body[key] for key in ("user_id", "email", "subject")} | {"body": body.get("body", "")}
        with Session(engine) as session:
            statement = insert(table).values(id=uuid.uuid4(), created_at=func.now(), **values).returning(table)
            row = session.execute(statement).one()
            session.commit()
        return as_json(row)

    def set_read(notification_id: uuid.UUID, value: bool) -> dict[str, Any]:
        with Session(engine) as session:
            statement = update(table).where(table.c.id == notification_id).values(read=value).returning(table)
            row = session.execute(statement).one_or_none()
            session.commit()
        if row is None:
            raise HTTPException(404)
        return as_json(row)

    @app.post("/notifications/{notification_id}/read")
    def mark_read(notification_id: uuid.UUID) -> dict[str, Any]:
        return set_read(notification_id, True)

    @app.post("/notifications/{notification_id}/unread")
    def mark_unread(notification_id: uuid.UUID) -> dict[str, Any]:
        return set_read(notification_id, False)

    @app.get("/notifications/{notification_id}")
    def get_one(notification_id: uuid.UUID) -> dict[str, Any]:
        with Session(engine) as session:
            row = session.execute(select(table).where(table.c.id == notification_id)).one_or_none()
        if row is None:
            raise HTTPException(404)
        return as_json(row)

    @app.get("/users/{user_id}/notifications")
    def list_recent(user_id: str, limit: int = 20) -> dict[str, Any]:
        query = select(table).where(table.c.user_id == user_id).order_by(table.c.created_at.desc(), table.c.id.desc())
        with Session(engine) as session:
            rows = session.execute(query.limit(limit)).all()
        return {"items": [as_json(row) for row in rows], "next": None}

    return app
