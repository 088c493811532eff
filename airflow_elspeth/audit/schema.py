"""The audit schema. Table and column names are a public contract (docs/ARCHITECTURE.md, "The audit schema").

Identifiers are deterministic 32-hex-digit strings derived from (run, row key, branch, node), so a
retried task derives the same ids and its idempotent inserts store nothing twice. The database
enforces the invariants that matter: one terminal outcome per token (a partial unique index), one
decision per (run, coalesce node, row), one node state per (token, node, attempt).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

ID = String(32)
HASH = String(64)
NAME = String(250)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the audit store only takes aware UTC times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        stored: datetime = value
        if stored.tzinfo is None:
            return stored.replace(tzinfo=timezone.utc)
        return stored.astimezone(timezone.utc)


def utc_sqlite_text(value: datetime | None) -> str | None:
    """What ``UTCDateTime``'s bind processor stores on SQLite, in one step: the hot write paths
    convert one or two timestamps a row (tests/audit/test_schema_types.py proves them equal)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: the audit store only takes aware UTC times")
    v = value.astimezone(timezone.utc)
    # Not strftime: its %Y does not pad years before 1000 on every platform.
    day = f"{v.year:04d}-{v.month:02d}-{v.day:02d}"
    return f"{day} {v.hour:02d}:{v.minute:02d}:{v.second:02d}.{v.microsecond:06d}"


runs = Table(
    "runs",
    metadata,
    Column("run_id", ID, primary_key=True),
    Column("dag_id", NAME, nullable=False),
    Column("airflow_run_id", NAME, nullable=False),
    Column("fork_task_id", NAME, nullable=False),
    Column("try_number", Integer, nullable=False),
    Column("clear_number", Integer, nullable=False, server_default="0"),
    Column("run_type", String(50)),
    Column("logical_date", UTCDateTime),
    Column("started_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime),
    # running | completed | failed
    Column("status", String(20), nullable=False),
    # Why a run failed (the fork's error, the fork task's end, a later try): never silent.
    Column("status_reason", Text),
    Column("config_hash", HASH, nullable=False),
    # The audit run this one re-does (same DAG run and fork), row and chunk counts known once the
    # fork completes, and the fork's branch list.
    Column("previous_run_id", ID),
    Column("rows_total", Integer),
    Column("chunk_size", Integer, nullable=False),
    Column("chunks_total", Integer),
    Column("branches_json", Text, nullable=False),
    UniqueConstraint("dag_id", "airflow_run_id", "fork_task_id", "try_number"),
    Index(None, "dag_id", "airflow_run_id"),
)

nodes = Table(
    "nodes",
    metadata,
    Column("run_id", ID, ForeignKey("runs.run_id"), primary_key=True),
    Column("node_id", NAME, primary_key=True),
    Column("task_id", NAME, nullable=False),
    Column("node_type", String(20), nullable=False),
    Column("branch_name", NAME),
    Column("config_json", Text, nullable=False),
    Column("config_hash", HASH, nullable=False),
)

rows = Table(
    "rows",
    metadata,
    Column("run_id", ID, ForeignKey("runs.run_id"), primary_key=True),
    Column("row_id", ID, primary_key=True),
    Column("row_key", Text, nullable=False),
    Column("row_index", Integer, nullable=False),
    Column("chunk", Integer, nullable=False),
    Column("source_hash", HASH, nullable=False),
    Column("payload_ref", HASH, nullable=False),
    UniqueConstraint("run_id", "row_key"),
    Index(None, "run_id", "chunk", "row_index"),
)

tokens = Table(
    "tokens",
    metadata,
    Column("token_id", ID, primary_key=True),
    Column("run_id", ID, nullable=False),
    Column("row_id", ID, nullable=False),
    # source | branch | merged
    Column("token_kind", String(10), nullable=False),
    Column("branch_name", NAME),
    Column("fork_group_id", ID),
    Column("join_group_id", ID),
    Column("chunk", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "run_id", "chunk", "branch_name"),
    Index(None, "run_id", "row_id"),
)

# Only the links that cannot be derived: a nested fork's source token -> the upstream merged token.
# A branch token's parent is its row's source token, and a merged token's parents are the branch
# tokens its decision consumed (``coalesce_decisions.consumed``): both derived, never stored
# (migration 0005), which saves six rows per source row of a three-branch fork.
token_parents = Table(
    "token_parents",
    metadata,
    Column("token_id", ID, primary_key=True),
    Column("parent_token_id", ID, primary_key=True),
    Column("ordinal", Integer, nullable=False),
    # No index on parent_token_id: nothing looks tokens up by their parent (migration 0004).
)

node_states = Table(
    "node_states",
    metadata,
    Column("state_id", ID, primary_key=True),
    Column("token_id", ID, nullable=False),
    Column("run_id", ID, nullable=False),
    Column("node_id", NAME, nullable=False),
    Column("attempt", Integer, nullable=False),
    # completed | dropped | failed | discarded
    Column("status", String(20), nullable=False),
    Column("input_hash", HASH),
    Column("output_hash", HASH),
    Column("output_ref", HASH),
    Column("error_json", Text),
    Column("context_json", Text),
    Column("started_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime),
    Column("duration_ms", Integer),
    # The event time: the audit clock inside the transaction that made this state visible. Rows are
    # processed long before their batch commits; ordering by visibility keeps replays exact.
    Column("recorded_at", UTCDateTime, nullable=False),
    # Denormalised from tokens so the coalesce reads one chunk of one node through one index.
    Column("row_id", ID, nullable=False),
    Column("chunk", Integer, nullable=False),
    UniqueConstraint("token_id", "node_id", "attempt"),
    Index(None, "run_id", "node_id", "chunk"),
)

token_outcomes = Table(
    "token_outcomes",
    metadata,
    Column("outcome_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("token_id", ID, nullable=False),
    Column("run_id", ID, nullable=False),
    Column("outcome", String(30), nullable=False),
    Column("is_terminal", Boolean, nullable=False),
    Column("reason", Text),
    Column("error_hash", HASH),
    Column("join_group_id", ID),
    Column("recorded_at", UTCDateTime, nullable=False),
    # Set when a later coalesce try decided the row afresh: the outcome stays, no longer terminal.
    Column("superseded_at", UTCDateTime),
    Index(
        "uq_token_outcomes_terminal",
        "token_id",
        unique=True,
        sqlite_where=text("is_terminal"),
        postgresql_where=text("is_terminal"),
    ),
    Index(None, "run_id", "outcome"),
)

coalesce_decisions = Table(
    "coalesce_decisions",
    metadata,
    Column("run_id", ID, primary_key=True),
    Column("node_id", NAME, primary_key=True),
    Column("row_id", ID, primary_key=True),
    Column("row_key", Text, nullable=False),
    Column("chunk", Integer, nullable=False),
    # merged | failed
    Column("decision", String(10), nullable=False),
    Column("failure_reason", String(60)),
    Column("details_json", Text, nullable=False),
    Column("policy", String(20), nullable=False),
    Column("merge_strategy", String(10), nullable=False),
    Column("consumed", Text, nullable=False),
    Column("missing_json", Text, nullable=False),
    Column("late_json", Text, nullable=False),
    Column("collisions_json", Text),
    Column("merged_token_id", ID),
    Column("decided_at", UTCDateTime, nullable=False),
    # From the fork's completion, and from the row's first arrival (null: nothing arrived); the
    # arrival order with each branch's offset from the first is in details_json.
    Column("wait_ms", BigInteger),
    Column("wait_from_first_arrival_ms", BigInteger),
    Column("recorded_at", UTCDateTime, nullable=False),
    Index(None, "run_id", "node_id", "decision", "failure_reason"),
    Index(None, "run_id", "node_id", "chunk"),
)

# A decision that a later try of its coalesce replaced: the resolution written when the coalesce
# task ended without deciding (failure reason coalesce_task_<state>), kept when a person cleared the
# coalesce and its new try decided the row afresh. A row may be superseded more than once.
superseded_decisions = Table(
    "superseded_decisions",
    metadata,
    Column("run_id", ID, primary_key=True),
    Column("node_id", NAME, primary_key=True),
    Column("row_id", ID, primary_key=True),
    Column("superseded_at", UTCDateTime, primary_key=True),
    Column("row_key", Text, nullable=False),
    Column("chunk", Integer, nullable=False),
    Column("decision", String(10), nullable=False),
    Column("failure_reason", String(60)),
    Column("details_json", Text, nullable=False),
    Column("missing_json", Text, nullable=False),
    Column("decided_at", UTCDateTime, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
)

payloads = Table(
    "payloads",
    metadata,
    Column("hash", HASH, primary_key=True),
    Column("body", Text, nullable=False),
)

# One row per (run, node, chunk) kept current by its single writer, so the coalesce's waiting
# query reads a few hundred rows instead of scanning millions of node states.
chunk_progress = Table(
    "chunk_progress",
    metadata,
    Column("run_id", ID, primary_key=True),
    Column("node_id", NAME, primary_key=True),
    Column("chunk", Integer, primary_key=True),
    Column("rows_done", Integer, nullable=False),
    Column("rows_total", Integer, nullable=False),
    # For a coalesce node: the branch progress it last evaluated this chunk against.
    Column("seen_signature", Text),
    Column("updated_at", UTCDateTime, nullable=False),
)

# A branch task seen in a final state (failed, skipped, upstream_failed, and also success)
# through the Task SDK. Whatever it had not delivered by then never will be: those
# tokens are lost with reason branch_task_<state>. Chunk -1 means the whole (unmapped) task.
branch_task_losses = Table(
    "branch_task_losses",
    metadata,
    Column("run_id", ID, primary_key=True),
    Column("node_id", NAME, primary_key=True),
    Column("chunk", Integer, primary_key=True),
    Column("branch_name", NAME, nullable=False),
    Column("task_state", String(30), nullable=False),
    Column("observed_at", UTCDateTime, nullable=False),
)
