"""Sentry events captured in memory by a real sentry-sdk client: what would have left for Sentry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk

from brownout._observability.sentry import init_sentry
from brownout._settings import Settings

DSN = "https://public@sentry.example.invalid/1"


class SentEvents(list[dict[str, Any]]):
    def text(self) -> str:
        sentry_sdk.flush()
        return json.dumps(self)


@pytest.fixture
def sentry_events() -> Iterator[SentEvents]:
    """Sentry initialised as the service does it, its events kept here. Request it before any app or broker
    fixture: the integrations hook into what is created after they are set up."""
    sent = SentEvents()

    class Capture(sentry_sdk.transport.Transport):
        def capture_envelope(self, envelope: Any) -> None:
            for item in envelope.items:
                if item.type == "event":
                    sent.append(item.payload.json)

    assert init_sentry(Settings(database_url="postgresql://u@localhost/db", sentry_dsn=DSN), transport=Capture)
    try:
        yield sent
    finally:
        sentry_sdk.flush()
        sentry_sdk.init(dsn=None)
