"""User ids as strings: what the create payload accepts, and what clients are shown of older entries."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from app.api.reads import public
from app.dispatch.notifications import CreateNotificationV1

NOTE = {"email": "ada@example.com", "subject": "s"}


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (str(uuid.UUID(int=7)), str(uuid.UUID(int=7))),
        ("42", "42"),
        (42, "42"),  # what the previous release took, and what its queued messages carry
        (2**63 - 1, str(2**63 - 1)),
        ("auth0|5f7c8ec7c33c6c004bbafe82", "auth0|5f7c8ec7c33c6c004bbafe82"),
        ("user_2NNEqL2nrIRdJ194ndJqAHwEfxC", "user_2NNEqL2nrIRdJ194ndJqAHwEfxC"),
        ("042", "042"),  # a string: not the same user as "42"
        ("x" * 128, "x" * 128),
    ],
)
def test_accepted_user_ids(given: object, kept: str) -> None:
    assert CreateNotificationV1.model_validate(NOTE | {"user_id": given}).user_id == kept


@pytest.mark.parametrize(
    "given", ["", " ", "a b", "a/b", "a:b", "a\tb", "\u00e9", "x" * 129, ".", "..", 0, -3, 2**63, True, 4.0, None, [1]]
)
def test_refused_user_ids(given: object) -> None:
    with pytest.raises(ValidationError) as refused:
        CreateNotificationV1.model_validate(NOTE | {"user_id": given})
    assert [error["loc"] for error in refused.value.errors()] == [("user_id",)]


def test_an_entry_the_previous_release_wrote_shows_its_user_id_as_a_string() -> None:
    """Cached items, pending items and stored command results written before carry the number."""
    assert public({"id": "n", "user_id": 42, "read_stamp": 3}) == {"id": "n", "user_id": "42"}
