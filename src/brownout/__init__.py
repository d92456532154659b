"""Brownout: keep a FastAPI + SQLAlchemy service on PostgreSQL useful while its database is sick."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("brownout")
except PackageNotFoundError:  # pragma: no cover - a source tree not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
