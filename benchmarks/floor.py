"""The floor: a raw bulk insert of the same audit rows into a fresh copy of the schema.

What writing the audit trail cannot go below: the rows the benchmark run actually wrote (so the
same row count and the same widths per table) are read back from its audit database and inserted
with the same DBAPI driver (sqlite3 / psycopg2) into a fresh database holding the same tables,
constraints and indexes, as plain ``INSERT``s of pre-built tuples, one transaction per chunk.
Only the inserts and commits are timed, not the reads that build the tuples.

No ``ON CONFLICT``, no SQLAlchemy, no hashing, no reads: just the writes.

:func:`store_bytes` measures what an audit store holds on disk (the run's, and the floor's fresh copy
of the same rows, measured the same way after its inserts).

On PostgreSQL psycopg2's ``cursor.executemany`` is one round trip per row, slower than the batched
inserts SQLAlchemy itself issues (``insertmanyvalues``), so it is no floor there; the floor on
PostgreSQL is ``psycopg2.extras.execute_values`` (multi-row ``INSERT ... VALUES``, the same plain
INSERT, 1000 rows a statement). ``executemany`` is measured too at 10k rows and below, for reference.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from airflow_elspeth.audit import schema

# Tuples per transaction. About what one fork chunk of 1000 rows x 3 branches writes (~10 audit rows a
# row), so the floor commits no more often than the provider does.
FLOOR_CHUNK = 10_000


def audit_tables() -> list[str]:
    """Audit tables in dependency order (the Alembic version table is not part of the trail)."""
    return [table.name for table in schema.metadata.sorted_tables]


def store_bytes(engine: Engine, tables: Sequence[str]) -> dict[str, Any]:
    """Bytes on disk of an audit store, as the lean floor counts its own (its SQLite file).

    SQLite: ``PRAGMA wal_checkpoint(TRUNCATE)``, then the main file's size plus the WAL's (0 after
    the checkpoint): the whole file, so every table in it (``tables`` is not used), their indexes and
    free pages. The ``-shm`` WAL index (32 KiB, deleted when the last connection closes) is not
    counted. PostgreSQL: the sum of ``pg_total_relation_size`` over ``tables`` (heap, TOAST, free
    space and visibility maps, every index), dead row versions included, as autovacuum left them.

    :param engine: the store.
    :param tables: the PostgreSQL tables to count.
    :returns: {"bytes": total, ...}: SQLite adds main_file_bytes and wal_bytes; PostgreSQL per_table.
    :raises RuntimeError: the checkpoint could not complete (a reader held the WAL).
    """
    if engine.dialect.name == "sqlite":
        path = Path(str(engine.url.database))
        with engine.connect() as conn:
            busy, _, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        if busy:
            raise RuntimeError(f"PRAGMA wal_checkpoint(TRUNCATE) on {path} could not complete (busy)")
        wal = path.with_name(path.name + "-wal")
        main_bytes, wal_bytes = path.stat().st_size, wal.stat().st_size if wal.exists() else 0
        return {"bytes": main_bytes + wal_bytes, "main_file_bytes": main_bytes, "wal_bytes": wal_bytes}
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            per_table = {
                name: conn.exec_driver_sql(
                    "SELECT pg_total_relation_size(%(name)s::regclass)", {"name": name}
                ).scalar_one()
                for name in tables
            }
        return {"bytes": sum(per_table.values()), "per_table": per_table}
    raise ValueError(f"no bytes-on-disk measure for the {engine.dialect.name!r} dialect")


def _read(engine: Engine, table: str, columns: list[str], chunk: int) -> Iterator[list[tuple[Any, ...]]]:
    raw = engine.raw_connection()
    try:
        if engine.dialect.name == "postgresql":
            cursor = raw.cursor(name=f"floor_read_{table}")  # server-side: streamed
            cursor.itersize = chunk
        else:
            cursor = raw.cursor()
        cursor.execute(f'SELECT {", ".join(columns)} FROM "{table}"')
        while rows := cursor.fetchmany(chunk):
            yield [tuple(r) for r in rows]
        cursor.close()
    finally:
        raw.close()


def measure(source: Engine, target: Engine, *, method: str, chunk: int = FLOOR_CHUNK) -> dict[str, Any]:
    """Copy every audit table of ``source`` into ``target`` (fresh, empty), timing only the writes.

    :param method: ``executemany`` (DBAPI ``cursor.executemany``) or ``execute_values`` (psycopg2).
    :returns: {"seconds": total, "rows": total, "transactions": n, "per_table": {table: seconds},
        "disk": :func:`store_bytes` of ``target`` after the inserts}
    """
    schema.metadata.create_all(target)
    dialect = target.dialect.name
    placeholder = "?" if dialect == "sqlite" else "%s"
    per_table: dict[str, float] = {}
    rows_total = transactions = 0
    raw = target.raw_connection()
    try:
        cursor = raw.cursor()
        for name in audit_tables():
            columns = [c.name for c in schema.metadata.tables[name].columns]
            column_list = ", ".join(f'"{c}"' for c in columns)
            elapsed = 0.0
            if method == "executemany":
                sql = (
                    f'INSERT INTO "{name}" ({column_list}) VALUES ({", ".join([placeholder] * len(columns))})'
                )
                for batch in _read(source, name, columns, chunk):
                    started = time.perf_counter()
                    cursor.executemany(sql, batch)
                    raw.commit()
                    elapsed += time.perf_counter() - started
                    rows_total += len(batch)
                    transactions += 1
            elif method == "execute_values":
                from psycopg2.extras import execute_values

                sql = f'INSERT INTO "{name}" ({column_list}) VALUES %s'
                for batch in _read(source, name, columns, chunk):
                    started = time.perf_counter()
                    execute_values(cursor, sql, batch, page_size=1000)
                    raw.commit()
                    elapsed += time.perf_counter() - started
                    rows_total += len(batch)
                    transactions += 1
            else:
                raise ValueError(f"unknown floor method {method!r}")
            per_table[name] = round(elapsed, 3)
        cursor.close()
    finally:
        raw.close()
    return {
        "method": method,
        "seconds": round(sum(per_table.values()), 3),
        "rows": rows_total,
        "transactions": transactions,
        "chunk": chunk,
        "per_table": per_table,
        "disk": store_bytes(target, audit_tables()),
    }
