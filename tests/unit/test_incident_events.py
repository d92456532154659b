"""The per-fingerprint limit on incident events, on a fake clock."""

from __future__ import annotations

import dramatiq

from brownout._dispatch.dead_letters import command_name
from brownout._observability.incident_events import FingerprintLimiter, active, disable
from tests.support.fakes import FakeClock

OPEN_SSL = ("brownout", "breaker-open", "ssl")


def test_one_event_per_fingerprint_per_interval_and_the_next_carries_the_count() -> None:
    clock = FakeClock()
    limiter = FingerprintLimiter(600, clock=clock)
    verdicts = []
    for _ in range(10):
        verdicts.append(limiter.admit(OPEN_SSL))
        clock.advance(30)
    assert verdicts == [0] + [None] * 9
    clock.advance(600 - 270)  # 600 s after the one sent
    assert limiter.admit(OPEN_SSL) == 9
    assert limiter.admit(OPEN_SSL) is None
    clock.advance(600)
    assert limiter.admit(OPEN_SSL) == 1


def test_fingerprints_are_limited_apart() -> None:
    limiter = FingerprintLimiter(600, clock=FakeClock())
    assert limiter.admit(OPEN_SSL) == 0
    assert limiter.admit(("brownout", "breaker-open", "disconnect")) == 0
    assert limiter.admit(("brownout", "disconnect-burst", "ssl")) == 0
    assert limiter.admit(OPEN_SSL) is None


def test_fingerprints_beyond_the_bound_forget_the_oldest() -> None:
    clock = FakeClock()
    limiter = FingerprintLimiter(600, clock=clock)
    for index in range(512):
        assert limiter.admit(("brownout", "dead-letter", f"command_{index}")) == 0
        clock.advance(0.001)
    assert limiter.admit(("brownout", "dead-letter", "one_more")) == 0
    assert limiter.admit(("brownout", "dead-letter", "command_0")) == 0  # forgotten: news again
    assert limiter.admit(("brownout", "dead-letter", "command_511")) is None


def test_nothing_is_active_until_sentry_enables_it() -> None:
    disable()
    assert active() is False


def test_a_dead_letter_is_named_by_its_envelope_s_command_only_when_it_has_one() -> None:
    def message(*args: object, actor: str = "apply_command") -> dramatiq.Message[object]:
        return dramatiq.Message(queue_name="q", actor_name=actor, args=args, kwargs={}, options={})

    assert command_name(message({"name": "create_notification", "payload": {}})) == "create_notification"
    assert command_name(message({"name": "create_notification"}, actor="send_email")) is None
    assert command_name(message({"name": 7})) is None
    assert command_name(message("not an envelope")) is None
    assert command_name(message()) is None
