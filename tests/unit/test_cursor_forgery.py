"""A cursor that decodes but was never handed out (a forged timestamp) is a 400, like any other bad cursor."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import pytest

from app.api.queries import BadCursor, Position


def forged(created: str) -> str:
    return base64.urlsafe_b64encode(f"{created}:{uuid.uuid4()}".encode()).decode().rstrip("=")


@pytest.mark.parametrize("created", ["99999999999999999999999", str(2**63), "-1", "-99999999999999999999"])
def test_a_timestamp_out_of_range_is_a_bad_cursor(created: str) -> None:
    with pytest.raises(BadCursor, match="cursor"):
        Position.decode(forged(created))


def test_a_cursor_the_service_hands_out_still_decodes() -> None:
    moment = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    position = Position(round(moment.timestamp() * 1_000_000), str(uuid.uuid4()))
    assert Position.decode(position.encode()) == position
