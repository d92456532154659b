"""Rate.parse: the forms settings may spell a rate in, and a clear refusal of anything else."""

from __future__ import annotations

import pytest

from brownout._auth.rate_limit import Rate


@pytest.mark.parametrize(
    ("text", "count", "seconds"),
    [
        ("600/minute", 600, 60.0),
        ("10/second", 10, 1.0),
        ("1000/hour", 1000, 3600.0),
        ("5000/day", 5000, 86400.0),
        ("50/30s", 50, 30.0),
        ("3/5m", 3, 300.0),
        ("100/2h", 100, 7200.0),
        ("1/s", 1, 1.0),
        ("20/minutes", 20, 60.0),
        ("20/min", 20, 60.0),
        ("7/2.5s", 7, 2.5),
        (" 600 / Minute ", 600, 60.0),
    ],
)
def test_valid_forms(text: str, count: int, seconds: float) -> None:
    assert Rate.parse(text) == Rate(count, seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "600",
        "minute",
        "600/",
        "/minute",
        "600/fortnight",
        "0/minute",
        "-5/minute",
        "1.5/minute",
        "10/0s",
        "10/-3s",
        "10/minute/extra",
        "ten/minute",
        "600 per minute",
    ],
)
def test_invalid_forms_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"rate .*expected '<count>/<period>'.*600/minute"):
        Rate.parse(text)


def test_a_rate_checks_its_own_fields() -> None:
    with pytest.raises(ValueError, match="count"):
        Rate(0, 60)
    with pytest.raises(ValueError, match="seconds"):
        Rate(10, 0)
    with pytest.raises(ValueError, match="seconds"):
        Rate(10, float("inf"))
