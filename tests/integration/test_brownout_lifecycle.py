"""brownout.fastapi.Brownout's life: what it leaves behind when its start fails half-way, or once closed."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from fastapi import FastAPI

from app.dispatch.notifications import build_registry
from brownout import Settings
from brownout.fastapi import Brownout, NotStarted
from brownout.fastapi import _brownout as brownout_module
from tests.support.polling import wait_until


def threads_now() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.is_alive()}


def test_a_start_that_fails_half_way_closes_what_it_built(
    api_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The health monitor is built last but one: the Redis link, the database pool, the publisher's I/O thread and
    the override poller already run when it fails (a failure injected at that step; the rest is real)."""
    before = threads_now()

    def failing_monitor(*args: object, **kwargs: object) -> None:
        raise RuntimeError("monitor could not start")

    monkeypatch.setattr(brownout_module, "build_monitor", failing_monitor)
    brownout = Brownout(api_settings(), registry=build_registry())
    with pytest.raises(RuntimeError, match="monitor could not start"):
        brownout.start()
    assert wait_until(lambda: not (threads_now() - before), timeout=10), [t.name for t in threads_now() - before]
    assert brownout.link is None and brownout.override is None
    with pytest.raises(NotStarted):
        brownout.database  # noqa: B018


def test_once_closed_the_pieces_are_gone(api_settings: Callable[..., Settings]) -> None:
    brownout = Brownout(api_settings(), registry=build_registry()).start()
    assert brownout.database.breaker is not None
    brownout.close()
    for piece in ("database", "dispatcher", "monitor", "reads"):
        with pytest.raises(NotStarted):
            getattr(brownout, piece)


def test_init_app_twice_is_refused(api_settings: Callable[..., Settings]) -> None:
    app = FastAPI()
    Brownout(api_settings(), registry=build_registry()).init_app(app)
    with pytest.raises(RuntimeError, match="twice"):
        Brownout(api_settings(), registry=build_registry()).init_app(app)
