"""Multi-row INSERTs that take their rows as one JSON parameter.

Why: handed a list of parameter sets, SQLAlchemy builds a multi-row VALUES
clause and processes every value of every row in Python (bind processors,
placeholders, psycopg2's quoting): about a hundred microseconds per row here,
which is most of what a batched write costs the worker under the GIL. With
`jsonb_to_recordset`, the rows travel as a single string that `json.dumps`
writes in C, and PostgreSQL does the typing. Statements are built once, at
import, from the table's own column types.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table, TextClause, text
from sqlalchemy.dialects import postgresql

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


def insert_rows(
    table: Table,
    columns: Sequence[str],
    *,
    computed: Mapping[str, str] | None = None,
    conflict: str,
    returning: Sequence[str],
) -> TextClause:
    """INSERT INTO *table* the rows of the JSON array bound as `rows` (see `rows_param`).

    *columns* are read from each row's object; *computed* adds columns given as
    SQL expressions, evaluated once per row, in the array's order (a sequence's
    nextval). *conflict* is the ON CONFLICT target, DO NOTHING.
    """
    extra = dict(computed or {})
    targets = ", ".join((*columns, *extra))
    values = ", ".join((*(f"r.{name}" for name in columns), *extra.values()))
    return text(
        f"INSERT INTO {table.name} ({targets}) SELECT {values} FROM {recordset(table, columns)} "  # noqa: S608 - names from the caller's Table and code, never input; the rows are one bound parameter
        f"ON CONFLICT ({conflict}) DO NOTHING RETURNING {', '.join(returning)}"
    )


def recordset(table: Table, columns: Sequence[str], *, extra: Mapping[str, str] | None = None) -> str:
    """`FROM` item `r`: the JSON array bound as `rows`, typed as *table*'s *columns* plus *extra* (name: SQL type)."""
    typed = [f"{name} {table.c[name].type.compile(dialect=_DIALECT)}" for name in columns]
    typed += [f"{name} {sql_type}" for name, sql_type in (extra or {}).items()]
    return f"jsonb_to_recordset(CAST(:rows AS jsonb)) AS r({', '.join(typed)})"


def rows_param(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The parameters of an `insert_rows` statement: uuids and datetimes as their text."""
    return {"rows": json.dumps(rows, default=str, separators=(",", ":"), ensure_ascii=False)}
