"""Dialect-aware bulk statements shared by every writer."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from operator import itemgetter
from typing import Any

from sqlalchemy import Column, Connection, Dialect, Engine, Table, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from airflow_elspeth.audit.schema import UTCDateTime, utc_sqlite_text

# Errors of an audit database that is unreachable or busy for a while (server down or restarting,
# network cut, pool exhausted, SQLite locked past its busy timeout): retrying later can succeed.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError, PoolTimeoutError)
# Such errors are "not yet" for a waiting coalesce until its deadline plus this grace.
TRANSIENT_ERROR_GRACE = timedelta(minutes=5)


def insert_ignore(conn: Connection, table: Table, values: Sequence[dict[str, Any]]) -> None:
    """Bulk insert that skips rows whose key already exists (``ON CONFLICT DO NOTHING``).

    Every conflict is ignored, including the partial unique index on terminal outcomes, which is
    what makes retried and concurrent writers idempotent. Every dict must have the same keys (the
    columns written; the others take their defaults).
    """
    if not values:
        return
    columns = tuple(values[0])
    if len(columns) == 1:
        (column,) = columns
        insert_tuples(conn, table, columns, [(value[column],) for value in values])
        return
    row_of = itemgetter(*columns)  # a C-level dict-to-tuple
    insert_tuples(conn, table, columns, [row_of(value) for value in values])


# Rows per multi-row VALUES statement on PostgreSQL: psycopg 3 binds on the server, which takes at
# most 65,535 parameters a statement; psycopg2 interpolates on the client and has no such limit.
_PG_MAX_PARAMETERS = 32_000
_PG_MAX_ROWS = 1_000


def insert_tuples(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    *,
    bound: Collection[str] = (),
) -> int:
    """:func:`insert_ignore` of prebuilt tuples (values in ``columns`` order): the hot path.

    The statement goes to the DBAPI cursor as SQL text (``exec_driver_sql``), so SQLAlchemy neither
    compiles it nor processes parameters row by row; only columns whose type converts values (the
    audit timestamps, booleans) are converted, once per distinct value. SQLite gets one
    ``executemany``; PostgreSQL multi-row ``VALUES`` (one round trip per page, not per row).

    :param bound: columns whose values the caller already converted with :func:`bind_value`
        (e.g. one timestamp shared by every row of a batch).
    :returns: how many rows were inserted (the others' keys existed).
    """
    if not rows:
        return 0
    insert = _compiled_insert(conn.dialect, table, tuple(columns))
    converters = tuple((i, p) for i, p in insert.converters if columns[i] not in bound)
    if converters:
        rows = _converted(rows, converters)
    if insert.one_row is not None:  # SQLite
        return int(conn.exec_driver_sql(insert.one_row, list(rows)).rowcount)
    if insert.copy is not None and len(rows) >= PG_COPY_MIN_ROWS:
        return _copy_insert(conn, insert.copy, rows)
    page = max(1, min(_PG_MAX_ROWS, _PG_MAX_PARAMETERS // len(columns)))
    inserted = 0
    for start in range(0, len(rows), page):
        part = rows[start : start + page]
        sql = insert.prefix + ",".join([insert.placeholder] * len(part)) + insert.suffix
        inserted += conn.exec_driver_sql(sql, tuple(value for row in part for value in row)).rowcount
    return inserted


# PostgreSQL: batches of at least this many rows go through COPY (below, multi-row VALUES).
PG_COPY_MIN_ROWS = 100
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_field(value: Any) -> str:
    """One value in COPY's text format (the values are what the VALUES path would bind)."""
    if value.__class__ is str:  # most values: ids, hashes, JSON; escaped only if they need it
        text: str = value
    elif value is None:
        return "\\N"
    elif value is True or value is False:
        return "t" if value else "f"
    elif isinstance(value, datetime):
        return value.isoformat()
    else:
        text = str(value)
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return text.translate(_COPY_ESCAPES)
    return text


@dataclass(frozen=True)
class _Copy:
    """The statements of :func:`_copy_insert` for one (table, columns)."""

    create_staging: str
    copy: str
    move: str
    clear: str


def _copy_statements(dialect: Dialect, table: Table, columns: tuple[str, ...]) -> _Copy:
    quote = dialect.identifier_preparer.quote
    digest = hashlib.sha256(",".join(columns).encode()).hexdigest()[:8]
    staging = quote(f"elspeth_copy_{table.name}_{digest}")
    target, names = quote(table.name), ",".join(quote(c) for c in columns)
    return _Copy(
        # Only the columns written and the rows' order, no constraints: the target's constraints
        # judge the rows, in order (the first of two conflicting rows wins, as with VALUES).
        create_staging=f"CREATE TEMP TABLE IF NOT EXISTS {staging} AS"
        f" SELECT {names}, 0::bigint AS elspeth_row FROM {target} WITH NO DATA",
        copy=f"COPY {staging} FROM STDIN",
        move=f"INSERT INTO {target} ({names}) SELECT {names} FROM {staging} ORDER BY elspeth_row"
        " ON CONFLICT DO NOTHING",
        clear=f"TRUNCATE {staging}",  # the next batch of the same transaction starts empty
    )


def _copy_insert(conn: Connection, statements: _Copy, rows: Sequence[tuple[Any, ...]]) -> int:
    """``INSERT … ON CONFLICT DO NOTHING`` of ``rows`` through ``COPY`` into a session-private
    staging table (about twice as fast as multi-row VALUES; benchmarks/RESULTS.md). Same
    transaction, same conflicts ignored, the same count returned.
    """
    # Asked every time: a rolled-back transaction takes a staging table it created with it.
    conn.exec_driver_sql(statements.create_staging)
    text_rows = "".join("\t".join(map(_copy_field, row)) + f"\t{number}\n" for number, row in enumerate(rows))
    driver_connection: Any = conn.connection.driver_connection
    with driver_connection.cursor() as cursor:
        cursor.copy_expert(statements.copy, io.StringIO(text_rows))
    inserted = conn.exec_driver_sql(statements.move).rowcount
    conn.exec_driver_sql(statements.clear)
    return int(inserted)


def bind_value(conn: Connection, column: Column[Any], value: Any) -> Any:
    """``value`` as :func:`insert_tuples` sends it for ``column`` (pass the column in ``bound``)."""
    processor = _bind_processor(conn.dialect, column)
    return value if processor is None else processor(value)


def _bind_processor(dialect: Dialect, column: Column[Any]) -> Callable[[Any], Any] | None:
    """The column type's own bind processor (for UTCDateTime: its aware-UTC check and SQLite's
    storage format), so what is stored is what a SQLAlchemy insert would have stored; on SQLite
    the audit timestamps take the same conversion fused into one function."""
    if dialect.name == "sqlite" and isinstance(column.type, UTCDateTime):
        return utc_sqlite_text
    processor: Callable[[Any], Any] | None = column.type.dialect_impl(dialect).bind_processor(dialect)
    return processor


@dataclass(frozen=True)
class _Insert:
    one_row: str | None  # the executemany statement (SQLite); None: multi-row VALUES pages
    prefix: str
    placeholder: str
    suffix: str
    converters: tuple[tuple[int, Callable[[Any], Any]], ...]  # (column position, bind processor)
    copy: _Copy | None  # PostgreSQL through psycopg2 (its copy_expert): COPY for large batches


_inserts: dict[tuple[str, str, str, tuple[str, ...]], _Insert] = {}


def _compiled_insert(dialect: Dialect, table: Table, columns: tuple[str, ...]) -> _Insert:
    key = (dialect.name, dialect.driver, table.name, columns)
    found = _inserts.get(key)
    if found is not None:
        return found
    if dialect.name not in ("sqlite", "postgresql"):
        raise NotImplementedError(f"audit store supports sqlite and postgresql, not {dialect.name}")
    quote = dialect.identifier_preparer.quote
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    placeholder = "(" + ",".join([mark] * len(columns)) + ")"
    prefix = f"INSERT INTO {quote(table.name)} ({','.join(quote(c) for c in columns)}) VALUES "
    suffix = " ON CONFLICT DO NOTHING"
    converters = []
    for position, name in enumerate(columns):
        processor = _bind_processor(dialect, table.c[name])
        if processor is not None:
            converters.append((position, processor))
    found = _Insert(
        prefix + placeholder + suffix if dialect.name == "sqlite" else None,
        prefix,
        placeholder,
        suffix,
        tuple(converters),
        _copy_statements(dialect, table, columns) if dialect.driver == "psycopg2" else None,
    )
    _inserts[key] = found
    return found


def _converted(
    rows: Sequence[tuple[Any, ...]], converters: tuple[tuple[int, Callable[[Any], Any]], ...]
) -> list[tuple[Any, ...]]:
    # Each distinct value converted once: a batch shares a handful of timestamps across its rows.
    memos: list[dict[Any, Any]] = [{} for _ in converters]
    converted = []
    for row in rows:
        values = list(row)
        for (position, processor), memo in zip(converters, memos, strict=True):
            value = values[position]
            try:
                values[position] = memo[value]
            except KeyError:
                values[position] = memo[value] = processor(value)
        converted.append(tuple(values))
    return converted


def refresh_statistics(conn: Connection, tables: Sequence[Table]) -> None:
    """PostgreSQL: ``ANALYZE`` tables a run has just filled in bulk (SQLite: nothing to do).

    Autovacuum analyses a table only some time after a fraction of it changed; a run written faster
    than that leaves the planner the statistics of empty tables, and it then joins node states to
    decisions by nested loops over sequential scans (the summary's late-arrival query ran for more
    than six minutes at 20k rows in a benchmark). ANALYZE samples a bounded number of rows, so its
    cost does not grow with the run.
    """
    if conn.dialect.name == "postgresql":
        quote = conn.dialect.identifier_preparer.quote
        conn.exec_driver_sql("ANALYZE " + ", ".join(quote(table.name) for table in tables))


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
    value: datetime = conn.execute(select(func.clock_timestamp())).scalar_one()
    return value.astimezone(timezone.utc)


# A fixed 64-bit key for pg_advisory_xact_lock held by a migration or a conversion of the store,
# derived from a name so it is unlikely to collide with another application's advisory locks.
MIGRATION_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"airflow_elspeth.audit.migrate").digest()[:8], "big", signed=True
)


@contextmanager
def immediate_transaction(connection: Connection) -> Iterator[None]:
    """One SQLite transaction that holds the database's write lock from its first statement.

    Python's sqlite3 module (in its default, legacy transaction control) neither begins a
    transaction before DDL or a SELECT nor lets a caller choose ``IMMEDIATE``; with
    ``isolation_level = None`` it leaves transaction control to the SQL we send, and its
    ``commit()``/``rollback()`` still act on the transaction SQLite reports as open.
    """
    driver_connection: Any = connection.connection.driver_connection
    if not hasattr(driver_connection, "isolation_level"):
        raise NotImplementedError(f"unsupported SQLite driver {connection.dialect.driver!r}")
    previous = driver_connection.isolation_level
    driver_connection.isolation_level = None
    try:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
    finally:
        driver_connection.isolation_level = previous


def chunk_lock_key(run_id: str, chunk: int) -> int:
    """The 64-bit advisory lock key of one chunk of one audit run (PostgreSQL)."""
    digest = hashlib.sha256(f"airflow_elspeth:{run_id}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def ordered_write(
    engine: Engine, run_id: str, chunks: Iterable[int], *, decider: bool
) -> Iterator[Connection]:
    """A transaction ordered against every other writer of the same chunks' event log.

    Event times are the audit clock read inside the writing transaction, so a decision can only
    trust the log if no event stamped before its own clock reading commits after it. This takes
    that guarantee from the database instead of a timing assumption:

    * PostgreSQL: branch writers (``decider=False``) hold a shared advisory lock per chunk, the
      coalesce (``decider=True``) an exclusive one, both until commit. A decision waits for every
      writer in flight to commit, and a writer that starts meanwhile stamps after the decision.
    * SQLite: one writer at a time; every ordered write takes the write lock before its first
      statement (``BEGIN IMMEDIATE``), so stamps follow commit order.

    Read the clock (:func:`db_now`) only inside this block, after it is entered.
    """
    keys = sorted({chunk_lock_key(run_id, chunk) for chunk in chunks})
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            with immediate_transaction(conn):
                yield conn
            return
        lock = "pg_advisory_xact_lock" if decider else "pg_advisory_xact_lock_shared"
        with conn.begin():
            for key in keys:  # in one order everywhere: no deadlock between two lockers
                conn.execute(text(f"SELECT {lock}(:key)"), {"key": key})
            yield conn
