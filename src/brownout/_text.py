"""Text a caller sends, checked once by its type: what PostgreSQL cannot store, what breaks an email header,
and what makes text lie about itself is refused at validation (422 naming the field), never later.

`SafeLine` (a subject, a name): no control character at all, no line or paragraph separator, no bidi
override, embedding or isolate (U+202A-U+202E, U+2066-U+2069: they make a subject display as something it
is not). `SafeText` (a body): the same, but tabs and line breaks (LF, CR) are ordinary text.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated

from pydantic import AfterValidator

_BIDI = "\u202a-\u202e\u2066-\u2069"
_LINE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}]")
_TEXT = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029{_BIDI}]")


def _refusal(character: str) -> ValueError:
    name = "NUL" if character == "\x00" else unicodedata.name(character, "a control character")
    return ValueError(f"must not contain U+{ord(character):04X} ({name})")


def safe_line(value: str) -> str:
    found = _LINE.search(value)  # one linear scan, whatever the input
    if found:
        raise _refusal(found.group())
    return value


def safe_text(value: str) -> str:
    found = _TEXT.search(value)
    if found:
        raise _refusal(found.group())
    return value


SafeLine = Annotated[str, AfterValidator(safe_line)]
SafeText = Annotated[str, AfterValidator(safe_text)]
