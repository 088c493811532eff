"""Dialect-aware bulk statements shared by every writer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from itertools import islice
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most ``size`` items (streams; never materialises ``items``)."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def insert_ignore(conn: Connection, table: Table, values: Sequence[dict[str, Any]]) -> None:
    """Bulk insert that skips rows whose key already exists (``ON CONFLICT DO NOTHING``).

    Every conflict is ignored, including the partial unique index on terminal outcomes, which is
    what makes retried and concurrent writers idempotent.
    """
    if not values:
        return
    dialect = conn.dialect.name
    if dialect == "postgresql":
        stmt = postgresql.insert(table).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).on_conflict_do_nothing()
    else:
        raise NotImplementedError(f"audit store supports sqlite and postgresql, not {dialect}")
    conn.execute(stmt, list(values))


def upsert(
    conn: Connection, table: Table, values: Sequence[dict[str, Any]], *, update: Sequence[str]
) -> None:
    """Bulk insert that overwrites the ``update`` columns of rows whose primary key exists."""
    if not values:
        return
    keys = [c.name for c in table.primary_key.columns]
    dialect = conn.dialect.name
    if dialect == "postgresql":
        pg_stmt = postgresql.insert(table)
        pg = pg_stmt.on_conflict_do_update(index_elements=keys, set_={c: pg_stmt.excluded[c] for c in update})
        conn.execute(pg, list(values))
    elif dialect == "sqlite":
        lite_stmt = sqlite.insert(table)
        lite = lite_stmt.on_conflict_do_update(
            index_elements=keys, set_={c: lite_stmt.excluded[c] for c in update}
        )
        conn.execute(lite, list(values))
    else:
        raise NotImplementedError(f"audit store supports sqlite and postgresql, not {dialect}")


def db_now(conn: Connection) -> datetime:
    """The audit clock: the database server's time (UTC, aware), so workers' clocks never disagree."""
    if conn.dialect.name == "sqlite":
        # An embedded SQLite file lives on this machine: its clock is this clock.
        return datetime.now(timezone.utc)
    value = conn.execute(select(func.clock_timestamp())).scalar_one()
    return value.astimezone(timezone.utc)
