"""The floor: a raw bulk insert of the same audit rows into a fresh copy of the schema.

What writing the audit trail cannot go below: the rows the benchmark run actually wrote (so the
same row count and the same widths per table) are read back from its audit database and inserted
with the same DBAPI driver (sqlite3 / psycopg2) into a fresh database holding the same tables,
constraints and indexes, as plain ``INSERT``s of pre-built tuples, one transaction per chunk.
Only the inserts and commits are timed, not the reads that build the tuples.

No ``ON CONFLICT``, no SQLAlchemy, no hashing, no reads: just the writes.

On PostgreSQL psycopg2's ``cursor.executemany`` is one round trip per row, slower than the batched
inserts SQLAlchemy itself issues (``insertmanyvalues``), so it is no floor there; the floor on
PostgreSQL is ``psycopg2.extras.execute_values`` (multi-row ``INSERT ... VALUES``, the same plain
INSERT, 1000 rows a statement). ``executemany`` is measured too at 10k rows and below, for reference.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine

from airflow_elspeth.audit import schema

# Tuples per transaction. About what one fork chunk of 1000 rows x 3 branches writes (~10 audit rows a
# row), so the floor commits no more often than the provider does.
FLOOR_CHUNK = 10_000


def audit_tables() -> list[str]:
    """Audit tables in dependency order (the Alembic version table is not part of the trail)."""
    return [table.name for table in schema.metadata.sorted_tables]


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
    :returns: {"seconds": total, "rows": total, "transactions": n, "per_table": {table: seconds}}
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
    }
