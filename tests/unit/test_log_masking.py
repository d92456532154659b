"""Secrets are masked in every log line, whichever logger or handler writes it, without anyone remembering to."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator
from typing import Any

import pytest
from uvicorn.config import LOGGING_CONFIG

from brownout._observability.logs import configure_logging
from brownout._settings import Settings

SECRET = "hunter2"
URL = f"postgresql://app:{SECRET}@db.internal:5432/app"


@pytest.fixture
def restored_logging() -> Iterator[None]:
    factory = logging.getLogRecordFactory()
    touched = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "dramatiq", "a.new.module")
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in touched}
    yield
    logging.setLogRecordFactory(factory)
    for name, (handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = propagate
    configure_logging(Settings(database_url="postgresql://u@localhost/db"))
    logging.setLogRecordFactory(factory)


def test_every_logger_and_handler_masks_a_password(restored_logging: None, capsys: Any) -> None:
    root = io.StringIO()
    configure_logging(Settings(database_url="postgresql://u@localhost/db"), stream=root)
    logging.config.dictConfig(LOGGING_CONFIG)  # what uvicorn does in each web process, after us or before
    later = io.StringIO()
    added = logging.StreamHandler(later)  # a handler nobody told about masking, added afterwards
    logging.getLogger("dramatiq").addHandler(added)
    logging.getLogger("a.new.module").addHandler(added)

    logging.getLogger("root.child").warning("cannot reach %s", URL)
    logging.getLogger("uvicorn.error").error("startup failed for %s", URL)
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/health?next={URL}", "1.1", 200
    )
    logging.getLogger("dramatiq").warning("broker error: %s", ConnectionError(f"lost {URL}"))
    logging.getLogger("a.new.module").warning(f"an f-string with {URL}")
    try:
        raise RuntimeError(f"connect to {URL} failed")
    except RuntimeError:
        logging.getLogger("root.child").exception("with a traceback")

    captured = capsys.readouterr()
    lines = {"root": root.getvalue(), "uvicorn": captured.err + captured.out, "added later": later.getvalue()}
    for where, text in lines.items():
        assert text, f"nothing was logged through {where}"
        assert SECRET not in text, f"{where}: {text}"
    assert "cannot reach postgresql://app:***@db.internal:5432/app" in lines["root"]
    assert "RuntimeError: connect to postgresql://app:***@db.internal:5432/app failed" in lines["root"]  # the traceback
    assert "uvicorn.error" not in lines["root"]  # uvicorn's own handlers wrote those
    assert '"GET /health?next=postgresql://app:***@db.internal:5432/app HTTP/1.1" 200' in lines["uvicorn"]
    assert "startup failed for postgresql://app:***@db" in lines["uvicorn"]
    assert lines["added later"].count("postgresql://app:***@db.internal") == 2


def test_json_lines_mask_extra_fields_and_tracebacks(restored_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(Settings(database_url="postgresql://u@localhost/db", log_format="json"), stream=stream)
    try:
        raise RuntimeError(f"connect to {URL} failed")
    except RuntimeError:
        logging.getLogger("brownout.test").exception("failed", extra={"target": URL, "attempt": 2})
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert SECRET not in json.dumps(line)
    assert line["target"] == "postgresql://app:***@db.internal:5432/app" and line["attempt"] == 2
    assert "postgresql://app:***@db.internal" in line["exc_info"]


def test_arguments_keep_their_types(restored_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(Settings(database_url="postgresql://u@localhost/db"), stream=stream)
    logging.getLogger("brownout.test").warning("%d rows, %.1f s, %r", 3, 0.25, {"url": URL})
    logging.getLogger("brownout.test").warning("%(count)d for %(url)s", {"count": 4, "url": URL})
    text = stream.getvalue()
    assert "3 rows, 0.2 s" in text and "4 for postgresql://app:***@db" in text and SECRET not in text


def test_an_address_in_a_path_is_masked_in_the_access_log_as_uvicorn_quotes_it(restored_logging: None, capsys: Any) -> None:
    from uvicorn.protocols.utils import get_path_with_query_string

    configure_logging(Settings(database_url="postgresql://u@localhost/db"), stream=io.StringIO())
    logging.config.dictConfig(LOGGING_CONFIG)
    for path in ("/users/ada@example.com/notifications", "/users/zoë.temp@straße.de/notifications"):
        scope: Any = {"path": path, "query_string": b"cc=grace@navy.example.com"}
        logging.getLogger("uvicorn.access").info(  # uvicorn's h11 and httptools protocols, word for word
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", get_path_with_query_string(scope), "1.1", 200
        )
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert '"GET /users/***%40example.com/notifications?cc=***@navy.example.com HTTP/1.1" 200' in text, text
    assert '"GET /users/***%40stra%C3%9Fe.de/notifications?cc=***@navy.example.com HTTP/1.1" 200' in text, text
    assert "ada" not in text and "zo" not in text and "grace" not in text


def test_a_bytes_argument_is_masked_as_it_prints(restored_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(Settings(database_url="postgresql://u@localhost/db"), stream=stream)
    reply = "4.2.1 <zoë.temp@straße.de> mailbox busy".encode()  # an SMTP server's reply, as smtplib keeps it
    logging.getLogger("brownout.test").warning("refused: %s, again %r, %d", reply, reply, 451)
    logging.getLogger("brownout.test").warning("no address: %r", b"4.2.0 busy")
    text = stream.getvalue()
    assert "refused: b'4.2.1 <***@stra\\xc3\\x9fe.de> mailbox busy', again b'4.2.1 <***@stra" in text, text
    assert ", 451" in text and "no address: b'4.2.0 busy'" in text and "zo" not in text
