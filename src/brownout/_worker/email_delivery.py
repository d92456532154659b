"""What an email backend (SMTP, Resend, Postmark) answers, in the few kinds the `send_email` actor acts on.

Every backend sorts its answers into the same outcomes, because what to do next depends only on the kind:

- ``sent``: taken by the server or provider; the actor records the send.
- ``failed_transient``: unreachable, down (5xx), timed out, busy: retried with backoff.
- ``rate_limited``: retried after the provider's ``Retry-After`` (or the backoff when it gives none).
- ``rejected``: this email can never go (bad request, refused recipient): one dead letter with the reason.
- ``bad_credentials``: the provider refuses the key, the account or the sender; every email would fail
  alike until the operator fixes it, so none is dead-lettered: they wait (retried with backoff), counted,
  and the process says so in one log line (`CredentialsAlarm`), not one per email.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from brownout._dispatch.outbox import EmailJob

log = logging.getLogger("brownout._worker.email")


class Outcome(enum.Enum):
    SENT = "sent"
    FAILED_TRANSIENT = "failed_transient"
    RATE_LIMITED = "rate_limited"
    REJECTED = "rejected"
    BAD_CREDENTIALS = "bad_credentials"


@dataclass(frozen=True)
class Delivery:
    """One attempt's outcome; *reason* is masked (no key, no password) and says what the other side said."""

    outcome: Outcome
    reason: str = ""
    retry_after: float | None = None  # seconds, from a rate-limited answer


SENT = Delivery(Outcome.SENT)


class EmailBackend(Protocol):
    """Hands one email to a server or provider, within its deadline; never raises for the other side's failures."""

    name: str  # the metric label: smtp, resend, postmark

    def send(self, job: EmailJob, sender: str) -> Delivery: ...

    def close(self) -> None: ...


class CredentialsAlarm:
    """One log line per process when the backend starts refusing our credentials, one when it takes them again.

    A refused key fails every email alike: a line per attempt would bury the logs and say nothing new."""

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self._refused = False
        self._lock = threading.Lock()

    @property
    def refused(self) -> bool:
        return self._refused

    def observe(self, delivery: Delivery) -> None:
        with self._lock:
            if delivery.outcome is Outcome.BAD_CREDENTIALS and not self._refused:
                self._refused = True
                log.error(
                    "email backend %s refuses our credentials (%s): emails wait in the outbox until they are fixed",
                    self._backend,
                    delivery.reason,
                )
            elif delivery.outcome is Outcome.SENT and self._refused:
                self._refused = False
                log.warning("email backend %s takes our credentials again: waiting emails are being sent", self._backend)
