"""Group commit for the worker's actor threads: the writes in flight share one transaction.

Why: draining a backlog one write per transaction pays a COMMIT (an fsync)
and four round trips, each with its Python overhead under the GIL, per
write. `GroupCommit.apply` puts the envelope in the next batch instead
(app/dispatch/apply_batch.py: one transaction, one COMMIT, each envelope's
own outcome) and returns its outcome once that batch has committed, so the
actor acknowledges its message only after the COMMIT holding its write.

No thread of its own: a caller that finds no batch running leads the next
one. It waits up to `linger_seconds` for every write in flight to queue
(`capacity`: the adaptive drain's limit; without it, it does not wait), takes
the queue, runs the batch on its own connection and hands every caller in it
its outcome; a caller still queued then leads the next batch. The leader is
an actor thread holding its own message's permit, so the adaptive drain sees
a failed attempt as before (worker/drain.py).

A batch is applied in entity-key order (stable: a creation stays before the
writes that need it), so batches of several worker processes lock rows in
the same order and cannot deadlock one another.

A batch that fails as a whole (the database unreachable: a transient failure
outlasting `execute_with_retry`'s retries, the breaker open) fails every
envelope in it with that exception, which the actor turns into a hold, as
for a single write; the retry is safe because apply is idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from app.db import Database, execute_with_retry
from app.dispatch.apply import AppliedWrite, Path
from app.dispatch.apply_batch import Outcome, Pending, apply_batch

log = logging.getLogger(__name__)


class BatchInterrupted(Exception):
    """Raised to the others in a batch whose leader was interrupted (its outcome is unknown)."""


class _Ticket:
    __slots__ = ("item", "outcome", "leads", "ready")

    def __init__(self, item: Pending) -> None:
        self.item = item
        self.outcome: Outcome | None = None
        self.leads = False
        self.ready = threading.Event()  # set when the outcome is in, or when the lead is handed over


class GroupCommit:
    """One per worker process; thread-safe. See the module docstring."""

    def __init__(
        self,
        database: Database,
        *,
        max_batch: int = 64,
        linger_seconds: float = 0.0,
        capacity: Callable[[], int] | None = None,
        path: Path = "queued",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or linger_seconds < 0:
            raise ValueError(f"need max_batch >= 1 and linger_seconds >= 0, got {max_batch} and {linger_seconds}")
        self.database = database
        self.max_batch = max_batch
        self.linger_seconds = linger_seconds
        self.capacity = capacity
        """How many writes can be in flight at once (the adaptive drain's limit); None: no lingering."""
        self.path: Path = path
        self.on_batch = on_batch
        """Told each batch's size before it runs (metrics, tests)."""
        self._lock = threading.Lock()
        self._filled = threading.Condition(self._lock)  # the queue reached the lingering leader's target
        self._queue: list[_Ticket] = []
        self._running = False  # a leader is lingering or its batch is under way
        self._target = max_batch + 1

    def apply(self, item: Pending) -> AppliedWrite:
        """Apply *item* in a batch; return its AppliedWrite once committed, or raise its error."""
        ticket = _Ticket(item)
        with self._lock:
            self._queue.append(ticket)
            if not self._running:
                self._running = ticket.leads = True
            elif len(self._queue) >= self._target:
                self._filled.notify()
        if not ticket.leads:
            self._wait(ticket)
        if ticket.outcome is None:  # leading: the first caller, or handed the lead
            self._lead(ticket)
        outcome = ticket.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def apply_now(self, items: Sequence[Pending]) -> list[Outcome]:
        """Run one batch of *items* in this thread (what a leader does); raises when it fails whole."""
        with self.database.session() as session:
            return execute_with_retry(
                session,
                lambda: apply_batch(session, items, path=self.path),
                idempotent=True,  # every envelope that committed comes back a duplicate
            )

    def _wait(self, ticket: _Ticket) -> None:
        try:
            ticket.ready.wait()
        except BaseException:  # interrupted (a time limit): leave the queue, pass the lead on
            with self._lock:
                if ticket in self._queue:  # else it is in a batch under way, whose outcome nobody reads
                    self._queue.remove(ticket)
                    if ticket.leads:
                        self._hand_over()
            raise

    def _lead(self, ticket: _Ticket) -> None:
        """Linger, take the queue (this ticket first), run it, hand the lead on, then the outcomes out."""
        with self._lock:
            try:
                self._linger()
            except BaseException:
                self._queue.remove(ticket)
                self._hand_over()
                raise
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
        interrupted: BaseException | None = None
        try:
            outcomes = self._run(batch)
        except BaseException as exc:
            interrupted = exc
            outcomes = [BatchInterrupted(f"the batch's leader was interrupted: {exc!r}")] * len(batch)
        with self._lock:
            self._hand_over()
        for queued, outcome in zip(batch, outcomes, strict=True):
            queued.outcome = outcome
            queued.ready.set()
        if interrupted is not None:
            raise interrupted

    def _hand_over(self) -> None:
        """Under the lock: the first caller still queued leads next (each caller is woken once)."""
        if self._queue:
            successor = self._queue[0]
            successor.leads = True
            successor.ready.set()
        else:
            self._running = False

    def _run(self, batch: list[_Ticket]) -> list[Outcome]:
        """Apply in entity-key order (see the module docstring); outcomes in *batch*'s order."""
        if self.on_batch is not None:
            self.on_batch(len(batch))
        ordered = sorted(batch, key=lambda queued: queued.item.envelope.entity_key)
        try:
            results = self.apply_now([queued.item for queued in ordered])
        except Exception as failed:  # the whole batch: the database is unavailable
            return [failed] * len(batch)
        by_ticket = {id(queued): outcome for queued, outcome in zip(ordered, results, strict=True)}
        return [by_ticket[id(queued)] for queued in batch]

    def _linger(self) -> None:
        """Under the lock: wait until every write in flight has queued, for at most linger_seconds,
        and no longer than a fifth of that once nobody joins (other actors may hold the threads)."""
        if self.capacity is None or self.linger_seconds <= 0:
            return
        target = max(1, min(self.max_batch, self.capacity()))
        deadline = time.monotonic() + self.linger_seconds
        self._target = target
        try:
            while len(self._queue) < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                queued = len(self._queue)
                self._filled.wait(min(left, self.linger_seconds / 5))
                if len(self._queue) == queued:
                    break
        finally:
            self._target = self.max_batch + 1
