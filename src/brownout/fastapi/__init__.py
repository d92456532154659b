"""FastAPI integration: a lifespan that builds and closes Brownout's pieces, its middleware and error mapping,
and the dependencies a route uses.

    brownout = Brownout(settings, registry=registry)
    app = brownout.init_app(FastAPI(lifespan=my_lifespan))  # my_lifespan runs inside Brownout's
"""

from brownout._admission import Criticality
from brownout._auth.callers import Caller
from brownout.fastapi._auth import CallerDep, current_caller, require_scope
from brownout.fastapi._body_limit import BodyTooLarge
from brownout.fastapi._brownout import Brownout, NotStarted
from brownout.fastapi._deps import BrownoutDep, NonCritical, get_brownout, non_critical
from brownout.fastapi._errors import Shed, field_errors, retry_after_header
from brownout.fastapi._fast_reads import CachedRoute

__all__ = [
    "BodyTooLarge",
    "Brownout",
    "BrownoutDep",
    "CachedRoute",
    "Caller",
    "CallerDep",
    "Criticality",
    "NonCritical",
    "NotStarted",
    "Shed",
    "current_caller",
    "field_errors",
    "get_brownout",
    "non_critical",
    "require_scope",
    "retry_after_header",
]
