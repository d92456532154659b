"""One circuit breaker for the whole fleet, its state in Redis (`BROWNOUT_BREAKER_BACKEND=redis`).

Without it, each of a dozen processes learns of an outage alone: 5 failing
calls each, a trial each per open period, and recovery at a dozen moments.
Hand-written because no library does this well: pybreaker's Redis storage is
not atomic across processes, and resilience4j and Polly refuse shared state.

- **Hot path, no round trip.** A `SharedBreaker` is a `CircuitBreaker` whose
  state fields are the process's view of the fleet's state; CLOSED costs what
  the local breaker costs. A thread keeps the view current from pub/sub
  (each transition is published) and re-reads it every `refresh_seconds`.
- **Failures are reported, successes stay local.** Each transient failure is
  added to a sorted set in Redis; `failure_threshold` of them within
  `window_seconds`, from any processes, open the breaker for everyone. So the
  count is fleet-wide over a window, not strictly consecutive.
- **One trial fleet-wide.** In HALF_OPEN a call runs only with the trial
  lease (SET NX PX: a crashed holder's lease expires).
- **Probe-gated recovery.** With `probe_gated`, OPEN ends when a health check
  passes (`on_health`), not after a timer, so no user request is the probe
  that finds the database still down.
- **One report per fleet opening.** The failure script says whether this
  call's failure opened the breaker; only that process sends the Sentry event
  (scope `fleet`), the others hear of the opening and send nothing.
- **Redis unreachable.** The first failed Redis call (or a view older than
  `view_ttl`) switches to the local breaker's own logic, logged once; when
  Redis answers again the process adopts the shared state, logged once.
  Each Redis call has the link's deadline (50 ms by default).

Every transition runs as one Lua script (src/brownout/_fleet/scripts.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import redis

from brownout._cache.redis_link import RedisLink, RedisUnavailable
from brownout._db.circuit_breaker import NOT_TRIAL, BreakerListener, BreakerState, CircuitBreaker
from brownout._db.errors import ErrorKind
from brownout._fleet import scripts

log = logging.getLogger(__name__)


class SharedBreaker(CircuitBreaker):
    def __init__(
        self,
        *,
        link: RedisLink,
        subscriber: redis.Redis,
        window_seconds: float = 10.0,
        probe_gated: bool = True,
        refresh_seconds: float = 1.0,
        lease_seconds: float | None = None,
        listeners: Iterable[BreakerListener] = (),
        **breaker_options: Any,
    ) -> None:
        super().__init__(listeners=listeners, **breaker_options)
        self._link = link
        self._subscriber = subscriber
        self.window_seconds = window_seconds
        self.probe_gated = probe_gated
        self._refresh_seconds = refresh_seconds
        self._view_ttl = 3 * refresh_seconds
        self._lease_ms = int(1000 * (lease_seconds if lease_seconds is not None else self.open_seconds))
        base = link.key("breaker", self.name)
        self._keys = [base, base + ":failures", base + ":lease"]
        self.channel = base + ":events"
        self._scripts = {
            name: link.client.register_script(source)
            for name, source in {
                "failure": scripts.FAILURE,
                "trial": scripts.TRIAL,
                "trial_result": scripts.TRIAL_RESULT,
                "probe": scripts.PROBE_PASSED,
                "reset": scripts.RESET,
                "view": scripts.VIEW,
            }.items()
        }
        self._member = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._failure_seq = itertools.count(1)
        self._epoch = -1
        self._lease_token: str | None = None
        self.shared = False  # True while the view is the fleet's; False: the local breaker decides
        self._fresh_until = 0.0
        self.remote_transitions = 0
        self.last_transition_remote = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life ---------------------------------------------------------------

    def start(self) -> SharedBreaker:
        self._sync()
        self._thread = threading.Thread(target=self._follow, name=f"brownout-breaker-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._refresh_seconds + 2)
        self._subscriber.close()

    # -- the call protocol, shared --------------------------------------------

    def _before_call_slow(self, casualty: bool = False) -> int:
        if not self._usable() or self._forced is not None or self._state is BreakerState.CLOSED:
            return super()._before_call_slow(casualty)  # CLOSED here: wary, decided by this process alone
        if self._state is BreakerState.OPEN and (self.probe_gated or self._clock() < self._open_until):
            return self._refuse()
        token = uuid.uuid4().hex
        answer = self._run("trial", token, self._lease_ms, "1" if self.probe_gated else "0")
        if answer is None:
            return super()._before_call_slow(casualty)
        self._adopt(answer[:3], remote=False)
        if not int(answer[3]):
            if self.state is BreakerState.CLOSED:  # the fleet's, just adopted
                return NOT_TRIAL
            return self._refuse()
        with self._lock:
            self._trial_id += 1
            self._trial_active = True
            self._trial_started = self._clock()
            self._lease_token = token
            return self._trial_id

    def record_failure(self, permit: int, kind: ErrorKind) -> None:
        if not kind.is_transient or self._forced is not None or not self._usable():
            super().record_failure(permit, kind)
            return
        if permit > NOT_TRIAL:
            answer = self._verdict(permit, "fail")
        else:
            member = f"{self._member}-{next(self._failure_seq)}"  # itertools.count: atomic under the GIL
            answer = self._run(
                "failure",
                member,
                int(self.window_seconds * 1000),
                self.failure_threshold,
                int(self.open_seconds * 1000),
            )
        if answer is None:  # Redis failed just now: count it here
            super().record_failure(permit, kind)
            return
        self._adopt(answer, remote=False)
        if permit <= NOT_TRIAL:
            with self._lock:
                if self._state is BreakerState.CLOSED:
                    self._become_wary(permit)  # the fleet has not opened (yet): one call at a time here
        for listener in self._listeners:
            self._safely(listener.on_failure, self, kind)
        if permit <= NOT_TRIAL and len(answer) > 3 and int(answer[3]):
            self._report_opening(kind, scope="fleet")  # this failure opened it: the rest of the fleet only hears of it

    def record_success(self, permit: int) -> None:
        if permit <= NOT_TRIAL or self._forced is not None or not self._usable():
            super().record_success(permit)
            return
        answer = self._verdict(permit, "ok")
        if answer is None:
            super().record_success(permit)
        else:
            self._adopt(answer, remote=False)

    def release(self, permit: int) -> None:
        if permit > NOT_TRIAL and self._usable():
            self._verdict(permit, "release")
        super().release(permit)

    def reset(self) -> None:
        super().reset()
        answer = self._run("reset")
        if answer is not None:
            self._adopt(answer, remote=False)

    def on_health(self, result: dict[str, Any]) -> None:
        """The health monitor's hook: a passing check ends OPEN fleet-wide (probe-gated recovery)."""
        if result.get("healthy") and self.probe_gated and self._state is BreakerState.OPEN and self._forced is None:
            answer = self._run("probe")
            if answer is not None:
                self._adopt(answer, remote=False)

    def claim_probe(self) -> bool:
        """One health probe per interval for the whole fleet while degraded (True: this process's
        turn). Without Redis every process probes for itself."""
        if not self._usable():
            return True
        key = self._keys[0] + ":probe"
        ttl_ms = max(1, int(self._refresh_seconds * 1000))
        try:
            return bool(self._link.run(lambda client: client.set(key, self._member, nx=True, px=ttl_ms)))
        except RedisUnavailable:
            return True

    def snapshot(self) -> dict[str, object]:
        return super().snapshot() | {"mode": "shared" if self.shared else "local", "probe_gated": self.probe_gated}

    # -- internals ----------------------------------------------------------

    def _verdict(self, permit: int, verdict: str) -> list[Any] | None:
        with self._lock:
            if permit != self._trial_id or not self._trial_active:
                return None  # a replaced trial's late verdict
            self._trial_active = False
            token, self._lease_token = self._lease_token, None
        if token is None:
            return None
        return self._run("trial_result", token, verdict, self.success_threshold, int(self.open_seconds * 1000))

    def _refuse(self) -> int:
        with self._lock:
            refused = self._refusal(self._clock())
        for listener in self._listeners:
            self._safely(listener.on_rejected, self)
        raise refused

    def _usable(self) -> bool:
        return self.shared and self._clock() < self._fresh_until

    def _run(self, script: str, *args: object) -> list[Any] | None:
        """Run a transition script; None (and local mode) when Redis does not answer."""
        try:
            arguments: list[Any] = [self.channel, *args]
            answer = self._link.run(lambda client: self._scripts[script](keys=self._keys, args=arguments))
        except RedisUnavailable as exc:
            self._set_shared(False, str(exc))
            return None
        self._fresh_until = self._clock() + self._view_ttl
        return list(answer)

    def _adopt(self, view: list[Any], *, remote: bool, authoritative: bool = False) -> None:
        """Make the fleet's state (state, ms until open_until, epoch) this process's view.

        News with an older epoch is ignored, except from the periodic re-read (*authoritative*):
        if Redis lost the breaker's hash (a restart without persistence, a failover, eviction),
        the epoch starts again from 0, and the re-read is how every process follows it."""
        state, remaining_ms, epoch = BreakerState(_text(view[0])), int(view[1]), int(view[2])
        with self._lock:
            if epoch < self._epoch and not authoritative:
                return  # older news
            self._epoch = epoch
            transition = None
            if self._forced is None and state is not self._state:
                transition = self._move(state)
                if state is not BreakerState.HALF_OPEN:
                    self._trial_active = False
            if state is BreakerState.OPEN:
                self._open_until = self._clock() + remaining_ms / 1000
        if transition is not None:
            self.last_transition_remote = remote
            if remote:
                self.remote_transitions += 1
            self._notify_transition(transition)

    def _sync(self) -> None:
        answer = self._run("view")
        if answer is not None:
            self._adopt(answer, remote=True, authoritative=True)
            self._set_shared(True)

    def _set_shared(self, shared: bool, why: str = "") -> None:
        if shared == self.shared:
            return
        self.shared = shared
        if shared:
            self._fresh_until = self._clock() + self._view_ttl
            log.warning("breaker %r: shared through Redis (state %s)", self.name, self._state.value)
        else:
            log.warning("breaker %r: Redis unreachable (%s): falling back to this process's own breaker", self.name, why)
        for listener in self._listeners:
            hook = getattr(listener, "on_mode", None)
            if hook is not None:
                self._safely(hook, self, shared)

    def _follow(self) -> None:
        """Pub/sub for transitions as they happen, a re-read every refresh as a safety net."""
        while not self._stop.is_set():
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                self._sync()
                next_sync = self._clock() + self._refresh_seconds
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=self._refresh_seconds)
                    if message is not None and message.get("type") == "message":
                        state, remaining, epoch = _text(message["data"]).split(":")
                        self._fresh_until = self._clock() + self._view_ttl
                        self._adopt([state, remaining, epoch], remote=True)
                    if self._clock() >= next_sync:
                        self._sync()
                        next_sync = self._clock() + self._refresh_seconds
                        if not self.shared:
                            break  # resubscribe: the subscription may have died with Redis
            except (redis.RedisError, OSError) as exc:
                self._set_shared(False, f"{type(exc).__name__}: {exc}")
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: S110 - best-effort close of a subscription being dropped; what ended it is already recorded
                    pass
            self._stop.wait(self._refresh_seconds)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
