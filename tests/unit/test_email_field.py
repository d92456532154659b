"""The notification's `email` field: pydantic's EmailStr exactly, its check remembered per address."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, EmailStr, Field, ValidationError

from app.dispatch.notifications import CreateNotificationV1, UserId, normalized_email


class WithEmailStr(BaseModel):  # CreateNotificationV1 as it was declared, with pydantic's EmailStr
    model_config = ConfigDict(extra="forbid", frozen=True, title="CreateNotificationV1")

    user_id: UserId
    email: EmailStr
    subject: str = Field(min_length=1, max_length=200)
    body: str = Field(default="", max_length=10_000)


ADDRESSES: list[Any] = [
    "ada@example.com",
    "Ada@EXAMPLE.com",
    "  ada@example.com  ",
    "Ada Lovelace <ada@example.com>",
    '"Ada L" <ada@example.com>',
    "ada+tag@sub.example.co.uk",
    "ü@exämple.de",
    "用户@例子.广告",
    '"quoted"@example.com',
    "ada@[127.0.0.1]",
    "a..b@example.com",
    ".ada@example.com",
    "ada@localhost",
    "ada@example",
    "ada@-example.com",
    "ada@example.com\n",
    "ada@example.com\r\nBcc: eve@example.com",
    "x" * 65 + "@example.com",
    "ada@" + "x" * 250 + ".com",
    "no-at-sign",
    "",
    5,
    None,
]


def outcome(model: type[BaseModel], value: Any, *, as_json: bool) -> Any:
    fields = {"user_id": 1, "email": value, "subject": "s"}
    try:
        parsed = model.model_validate_json(json.dumps(fields)) if as_json else model.model_validate(fields)
    except ValidationError as invalid:
        return [(error["type"], error["loc"], error["msg"]) for error in invalid.errors()]
    return parsed.model_dump()


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("value", ADDRESSES)
def test_accepts_refuses_and_normalises_as_email_str(value: Any, as_json: bool) -> None:
    for _ in range(2):  # the second time from the memo
        assert outcome(CreateNotificationV1, value, as_json=as_json) == outcome(WithEmailStr, value, as_json=as_json)


def test_the_json_schema_is_email_str_s() -> None:
    assert CreateNotificationV1.model_json_schema() == WithEmailStr.model_json_schema()


def test_an_address_is_checked_once() -> None:
    normalized_email.cache_clear()
    for _ in range(3):
        CreateNotificationV1.model_validate({"user_id": 1, "email": "Memo@Example.com", "subject": "s"})
    info = normalized_email.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_a_refused_address_is_not_remembered() -> None:
    normalized_email.cache_clear()
    for _ in range(2):
        with pytest.raises(ValidationError):
            CreateNotificationV1.model_validate({"user_id": 1, "email": "not-an-address", "subject": "s"})
    assert normalized_email.cache_info().currsize == 0
