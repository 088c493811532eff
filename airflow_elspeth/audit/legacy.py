"""Converting a store written by 0.1 into schema 0.2's events, in resumable batches.

Migration 0006 renames 0.1's tables to ``legacy_<name>``; :func:`convert_legacy` then moves their
rows into the events a batch at a time (whole chunks of one run, up to ``rows_per_batch`` rows), each
batch one transaction that inserts the events and deletes the legacy rows it converted. A
conversion interrupted (killed, database gone) leaves whole batches converted and the rest legacy,
and the next call resumes. When every run is converted the legacy tables are dropped; rows that
no run's conversion took (which a store written by 0.1 does not have) stop it with an error rather
than going with them. Names are spelled out as in the migrations: this reads 0.1's tables as they
were. SQL, no Airflow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, inspect, text

from airflow_elspeth.audit.dml import MIGRATION_LOCK_KEY, immediate_transaction
from airflow_elspeth.exceptions import AuditInvariantError

LEGACY_TABLES = (
    "legacy_token_outcomes",
    "legacy_node_states",
    "legacy_coalesce_decisions",
    "legacy_token_parents",
    "legacy_tokens",
    "legacy_rows",
    "legacy_payloads",
)
ROWS_PER_BATCH = 20_000

# A nested fork's source token names its upstream merged token by 0.1's id; that token's row may
# convert (and leave the legacy tables) before the nested row does, so the translation is made
# once, before the first batch.
_PARENT_IDS = "legacy_parent_ids"


def has_legacy(conn: Connection) -> bool:
    return inspect(conn).has_table("legacy_rows")


def convert_legacy(engine: Engine, *, rows_per_batch: int = ROWS_PER_BATCH) -> int:
    """Convert every legacy row, a batch per transaction; returns how many source rows it converted."""
    converted = 0
    while True:
        with _exclusive(engine) as conn:
            if not has_legacy(conn):
                return converted
            if not inspect(conn).has_table(_PARENT_IDS):
                _translate_parent_ids(conn)
            batch = _next_batch(conn, rows_per_batch)
            if batch is None:
                _drop_legacy(conn)
                return converted
            run_id, chunks = batch
            converted += _convert_batch(conn, run_id, chunks)


@contextmanager
def _exclusive(engine: Engine) -> Iterator[Connection]:
    """One transaction that excludes every other converter (and migration) of the store."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            with immediate_transaction(conn):
                yield conn
            return
        with conn.begin():
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            yield conn


def _legacy_id(*parts: str) -> str:
    # 0.1's identifier scheme (core/canonical.derive_id of string parts), frozen here as in 0005.
    data = b"".join(b"s%d:%s" % (len(p.encode()), p.encode()) for p in parts)
    return hashlib.sha256(data).hexdigest()[:32]


def _translate_parent_ids(conn: Connection) -> None:
    conn.execute(
        text(
            f"CREATE TABLE {_PARENT_IDS} AS SELECT tp.parent_token_id AS old_id,"
            " CAST(ru.run_no AS TEXT) || '.' || CAST(ur.row_index AS TEXT) || ':m:' || cd.node_id AS new_id"
            " FROM legacy_token_parents tp"
            " JOIN legacy_coalesce_decisions cd ON cd.merged_token_id = tp.parent_token_id"
            " JOIN legacy_rows ur ON ur.run_id = cd.run_id AND ur.row_id = cd.row_id"
            " JOIN runs ru ON ru.run_id = cd.run_id"
        )
    )


def _next_batch(conn: Connection, rows_per_batch: int) -> tuple[str, list[int]] | None:
    """Whole chunks of the first run with legacy rows, up to ``rows_per_batch`` rows (one chunk at least)."""
    first = conn.execute(text("SELECT MIN(run_id) FROM legacy_rows")).scalar()
    if first is None:
        return None
    chunks: list[int] = []
    total = 0
    for chunk, count in conn.execute(
        text("SELECT chunk, COUNT(*) FROM legacy_rows WHERE run_id = :run GROUP BY chunk ORDER BY chunk"),
        {"run": first},
    ):
        if chunks and total + count > rows_per_batch:
            break
        chunks.append(chunk)
        total += count
    return str(first), chunks


def _in_chunks(sql: str) -> Any:
    return text(sql).bindparams(bindparam("chunks", expanding=True))


def _convert_batch(conn: Connection, run_id: str, chunks: Sequence[int]) -> int:
    run_no = conn.execute(text("SELECT run_no FROM runs WHERE run_id = :run"), {"run": run_id}).scalar_one()
    where = {"run": run_id, "run_no": run_no, "chunks": list(chunks)}
    new_row = "CAST(:run_no AS TEXT) || '.' || CAST(lr.row_index AS TEXT)"
    inserted = conn.execute(
        _in_chunks(
            "INSERT INTO source_rows (run_no, chunk, row_no, row_key, source_hash, body, parent_token_id,"
            " recorded_at) SELECT :run_no, lr.chunk, lr.row_index, lr.row_key, lr.source_hash, p.body,"
            " CASE WHEN tp.parent_token_id IS NULL THEN NULL ELSE COALESCE(pm.new_id, tp.parent_token_id)"
            " END,"
            " tk.created_at FROM legacy_rows lr"
            " JOIN legacy_payloads p ON p.hash = lr.payload_ref"
            " JOIN legacy_tokens tk ON tk.run_id = lr.run_id AND tk.row_id = lr.row_id AND tk.token_kind ="
            " 'source'"
            " LEFT JOIN legacy_token_parents tp ON tp.token_id = tk.token_id"
            f" LEFT JOIN {_PARENT_IDS} pm ON pm.old_id = tp.parent_token_id"
            " WHERE lr.run_id = :run AND lr.chunk IN :chunks"
        ),
        where,
    ).rowcount
    conn.execute(
        _in_chunks(
            "INSERT INTO step_results (run_no, node_id, chunk, row_no, attempt, status, input_hash,"
            " output_hash,"
            " output_body, error_json, context_json, started_at, completed_at, duration_ms, recorded_at)"
            " SELECT :run_no, ns.node_id, ns.chunk, lr.row_index, ns.attempt, ns.status, ns.input_hash,"
            " ns.output_hash, p.body, ns.error_json, ns.context_json, ns.started_at, ns.completed_at,"
            " ns.duration_ms, ns.recorded_at FROM legacy_node_states ns"
            " JOIN legacy_tokens tk ON tk.token_id = ns.token_id AND tk.token_kind = 'branch'"
            " JOIN legacy_rows lr ON lr.run_id = ns.run_id AND lr.row_id = ns.row_id"
            " LEFT JOIN legacy_payloads p ON p.hash = ns.output_ref"
            " WHERE ns.run_id = :run AND ns.chunk IN :chunks"
        ),
        where,
    )
    conn.execute(
        _in_chunks(
            "INSERT INTO decisions (run_no, node_id, chunk, row_no, decision, failure_reason, details_json,"
            " consumed, missing_json, late_json, collisions_json, merged_hash, merged_body, decided_at,"
            " wait_ms,"
            " wait_from_first_arrival_ms, recorded_at)"
            " SELECT :run_no, cd.node_id, cd.chunk, lr.row_index, cd.decision, cd.failure_reason,"
            " cd.details_json,"
            " cd.consumed, cd.missing_json, cd.late_json, cd.collisions_json, ms.output_hash, p.body,"
            " cd.decided_at, cd.wait_ms, cd.wait_from_first_arrival_ms, cd.recorded_at"
            " FROM legacy_coalesce_decisions cd"
            " JOIN legacy_rows lr ON lr.run_id = cd.run_id AND lr.row_id = cd.row_id"
            " LEFT JOIN legacy_node_states ms ON ms.token_id = cd.merged_token_id AND ms.node_id = cd.node_id"
            " LEFT JOIN legacy_payloads p ON p.hash = ms.output_ref"
            " WHERE cd.run_id = :run AND cd.chunk IN :chunks"
        ),
        where,
    )
    _convert_outcomes(conn, where, new_row)
    _convert_superseded(conn, where)
    batch_tokens = "SELECT token_id FROM legacy_tokens WHERE run_id = :run AND chunk IN :chunks"
    for sql in (
        f"DELETE FROM legacy_token_outcomes WHERE token_id IN ({batch_tokens})",
        f"DELETE FROM legacy_token_parents WHERE token_id IN ({batch_tokens})",
        "DELETE FROM legacy_node_states WHERE run_id = :run AND chunk IN :chunks",
        "DELETE FROM legacy_coalesce_decisions WHERE run_id = :run AND chunk IN :chunks",
        "DELETE FROM legacy_tokens WHERE run_id = :run AND chunk IN :chunks",
        "DELETE FROM legacy_rows WHERE run_id = :run AND chunk IN :chunks",
    ):
        conn.execute(_in_chunks(sql), {k: v for k, v in where.items() if k != "run_no"})
    return int(inserted)


def _convert_outcomes(conn: Connection, where: dict[str, Any], new_row: str) -> None:
    """The outcomes no 0.2 event implies (not forked, merged or coalesced), with 0.2's ids.

    A branch token's join group in 0.1 is a hash of (run, row, "join", coalesce): the coalesce is
    found among the nodes that decided (or once decided, superseded) the row.
    """
    found = conn.execute(
        _in_chunks(
            "SELECT o.run_id, o.outcome, o.is_terminal, o.reason, o.error_hash, o.join_group_id,"
            " o.recorded_at,"
            f" o.superseded_at, lr.row_id, {new_row} AS new_row, tk.branch_name FROM legacy_token_outcomes o"
            " JOIN legacy_tokens tk ON tk.token_id = o.token_id AND tk.token_kind = 'branch'"
            " JOIN legacy_rows lr ON lr.run_id = tk.run_id AND lr.row_id = tk.row_id"
            " WHERE o.run_id = :run AND tk.chunk IN :chunks AND o.outcome <> 'coalesced'"
            " ORDER BY o.outcome_id"
        ),
        where,
    ).all()
    if not found:
        return
    nodes = (
        conn.execute(
            text(
                "SELECT node_id FROM legacy_coalesce_decisions WHERE run_id = :run"
                " UNION SELECT node_id FROM superseded_decisions WHERE run_id = :run"
            ),
            {"run": where["run"]},
        )
        .scalars()
        .all()
    )
    values = []
    for o in found:
        groups = {_legacy_id(o.run_id, o.row_id, "join", node): node for node in nodes}
        node = groups.get(o.join_group_id) if o.join_group_id else None
        values.append(
            {
                "token_id": f"{o.new_row}:b:{o.branch_name}",
                "run_id": o.run_id,
                "row_id": o.new_row,
                "outcome": o.outcome,
                "is_terminal": o.is_terminal,
                "reason": o.reason,
                "error_hash": o.error_hash,
                "join_group_id": f"{o.new_row}:j:{node}" if node else None,
                "recorded_at": o.recorded_at,
                "superseded_at": o.superseded_at,
            }
        )
    conn.execute(
        text(
            "INSERT INTO recorded_outcomes (token_id, run_id, row_id, outcome, is_terminal, reason,"
            " error_hash,"
            " join_group_id, recorded_at, superseded_at) VALUES (:token_id, :run_id, :row_id, :outcome,"
            " :is_terminal, :reason, :error_hash, :join_group_id, :recorded_at, :superseded_at)"
        ),
        values,
    )


def _convert_superseded(conn: Connection, where: dict[str, Any]) -> None:
    conn.execute(
        _in_chunks(
            "UPDATE superseded_decisions SET row_id = (SELECT CAST(:run_no AS TEXT) || '.' ||"
            " CAST(lr.row_index AS TEXT) FROM legacy_rows lr WHERE lr.run_id = superseded_decisions.run_id"
            " AND lr.row_id = superseded_decisions.row_id)"
            " WHERE run_id = :run AND chunk IN :chunks AND row_id IN (SELECT row_id FROM legacy_rows"
            " WHERE run_id = :run AND chunk IN :chunks)"
        ),
        where,
    )


def _drop_legacy(conn: Connection) -> None:
    """Drop the legacy tables once nothing in them is left unconverted (payloads are shared bodies,
    each copied into the events that hold it)."""
    left = {
        table: conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
        for table in LEGACY_TABLES
        if table != "legacy_payloads"
    }
    if any(left.values()):
        raise AuditInvariantError(
            "converting the 0.1 store: rows that belong to no converted row are left in "
            + ", ".join(f"{table} ({n})" for table, n in left.items() if n)
            + "; the legacy tables are kept for inspection"
        )
    for table in (*LEGACY_TABLES, _PARENT_IDS):
        conn.execute(text(f"DROP TABLE {table}"))
