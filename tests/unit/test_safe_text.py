"""Caller text is checked by its type: a model that declares SafeLine or SafeText refuses what cannot be stored,
what breaks an email header and what makes text lie about itself, with the field named (a 422 at the edge)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from brownout import SafeLine, SafeText


class AnyNewModel(BaseModel):  # a model written later: it is covered by declaring the types, nothing else
    title: SafeLine
    notes: SafeText = ""


@pytest.mark.parametrize(
    ("title", "named"),
    [
        ("Hi\r\nBcc: eve@example.com", "U+000D"),
        ("a\x00b", "NUL"),
        ("report\u202egnp.exe", "RIGHT-TO-LEFT OVERRIDE"),
        ("one\u2028two", "LINE SEPARATOR"),
        ("bell\x07", "U+0007"),
        ("c1\x85", "U+0085"),
        ("isolate\u2066x\u2069", "LEFT-TO-RIGHT ISOLATE"),
    ],
)
def test_a_line_refuses_controls_separators_and_bidi(title: str, named: str) -> None:
    with pytest.raises(ValidationError) as refused:
        AnyNewModel(title=title)
    (error,) = refused.value.errors()
    assert error["loc"] == ("title",) and named in error["msg"]


def test_text_keeps_tabs_and_line_breaks_and_refuses_the_rest() -> None:
    assert AnyNewModel(title="Welcome, Ada", notes="line one\r\nline two\tend").notes.endswith("\tend")
    assert AnyNewModel(title="Grüße 👋 مرحبا").title == "Grüße 👋 مرحبا"  # ordinary text in any script passes
    with pytest.raises(ValidationError, match="RIGHT-TO-LEFT OVERRIDE"):
        AnyNewModel(title="t", notes="spoof \u202e")
    with pytest.raises(ValidationError, match="NUL"):
        AnyNewModel(title="t", notes="a\x00")
