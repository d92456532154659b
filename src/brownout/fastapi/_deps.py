"""Dependencies a route declares to reach Brownout's pieces."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from brownout._db import BreakerState
from brownout.fastapi._brownout import Brownout
from brownout.fastapi._errors import Shed


async def get_brownout(request: Request) -> Brownout:  # async: FastAPI runs a plain function in the thread pool
    brownout: Brownout = request.app.state.brownout
    return brownout


BrownoutDep = Annotated[Brownout, Depends(get_brownout)]


async def non_critical(brownout: BrownoutDep) -> None:
    """Declare a route non-critical: shed at once (503) while the breaker is not CLOSED."""
    breaker = brownout.database.breaker
    if breaker.state is not BreakerState.CLOSED:
        raise Shed(max(1.0, breaker.retry_after()))


NonCritical = Depends(non_critical)
