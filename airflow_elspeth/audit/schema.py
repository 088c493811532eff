"""The audit schema 0.2: one row per event. Table and column names are a public contract
(docs/ARCHITECTURE.md, "The audit schema").

The tables (``metadata``) hold events keyed by integers: a run's number (``runs.run_no``), a
row's number in its run (its index in the fork's input), the chunk (a function of the row number,
kept in the key so a per-chunk read is a key-prefix seek), the node and the attempt. A retried
writer writes the same keys and its idempotent inserts store nothing twice; the keys make one
result per (row, step, attempt) and one decision per (coalesce, row) the only possible state.

Tokens, their parents, node states, terminal outcomes and payloads are functions of the events:
0.1's tables of those names are views over the events (``compat_views``, created by migration 0006,
documented as the compatibility surface), and the read models that are not on a hot path read
them. Their ids are computable in SQL from the keys (``audit.ids``).
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
    # The run's number in this store: the compact key of every event of the run.
    Column("run_no", Integer, nullable=False, unique=True),
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

source_rows = Table(
    "source_rows",
    metadata,
    Column("run_no", Integer, primary_key=True),
    Column("chunk", Integer, primary_key=True),
    Column("row_no", Integer, primary_key=True),  # the row's index in the fork's input
    Column("row_key", Text, nullable=False),
    Column("source_hash", HASH, nullable=False),
    Column("body", Text, nullable=False),  # canonical JSON of the row
    # A nested fork's row: the merged token of the upstream coalesce it came from (the one lineage
    # link no event records otherwise).
    Column("parent_token_id", Text),
    Column("recorded_at", UTCDateTime, nullable=False),
    UniqueConstraint("run_no", "row_key"),
    sqlite_with_rowid=False,
)

# A branch step's result for one row and attempt: arrival (completed), loss (dropped, failed),
# discarded (arrived after its row was decided) or aborted (a try that hit its failure threshold).
step_results = Table(
    "step_results",
    metadata,
    Column("run_no", Integer, primary_key=True),
    Column("node_id", NAME, primary_key=True),
    Column("chunk", Integer, primary_key=True),
    Column("row_no", Integer, primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("status", String(20), nullable=False),
    Column("input_hash", HASH),
    Column("output_hash", HASH),
    Column("output_body", Text),  # canonical JSON of the output row
    Column("error_json", Text),
    Column("context_json", Text),
    Column("started_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime),
    Column("duration_ms", Integer),
    # The event time: the audit clock inside the transaction that made this result visible. Rows
    # are processed long before their batch commits; ordering by visibility keeps replays exact.
    Column("recorded_at", UTCDateTime, nullable=False),
    sqlite_with_rowid=False,
)

# A coalesce's decision of one row, with the merged row inline. Its policy and merge strategy are
# its node's (``nodes.config_json``); the consumed branch tokens' outcome (coalesced) and the merged
# token's (merged) are implied by a merged decision, the other branch outcomes are
# ``recorded_outcomes``.
decisions = Table(
    "decisions",
    metadata,
    Column("run_no", Integer, primary_key=True),
    Column("node_id", NAME, primary_key=True),
    Column("chunk", Integer, primary_key=True),
    Column("row_no", Integer, primary_key=True),
    # merged | failed
    Column("decision", String(10), nullable=False),
    Column("failure_reason", String(60)),
    Column("details_json", Text, nullable=False),
    Column("consumed", Text, nullable=False),
    Column("missing_json", Text, nullable=False),
    Column("late_json", Text, nullable=False),
    Column("collisions_json", Text),
    Column("merged_hash", HASH),
    Column("merged_body", Text),
    Column("decided_at", UTCDateTime, nullable=False),
    # From the fork's completion, and from the row's first arrival (null: nothing arrived); the
    # arrival order with each branch's offset from the first is in details_json.
    Column("wait_ms", BigInteger),
    Column("wait_from_first_arrival_ms", BigInteger),
    Column("recorded_at", UTCDateTime, nullable=False),
    Index(None, "run_no", "node_id", "decision", "failure_reason"),
    sqlite_with_rowid=False,
)

# The token outcomes no event implies: a branch token's outcome in a row that did not merge it
# (row_failed, lost, not_arrived, late), at the last step of a branch no coalesce joins, and what
# replaced one (late, skipped; the replaced one kept, superseded). A source token is forked, a
# merged decision's branch tokens coalesced and its merged token merged, without a row here. The
# partial unique index lets a token have at most one terminal outcome recorded.
recorded_outcomes = Table(
    "recorded_outcomes",
    metadata,
    Column("outcome_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("token_id", Text, nullable=False),
    Column("run_id", ID, nullable=False),
    Column("row_id", Text, nullable=False),
    Column("outcome", String(30), nullable=False),
    Column("is_terminal", Boolean, nullable=False),
    Column("reason", Text),
    Column("error_hash", HASH),
    Column("join_group_id", Text),
    Column("recorded_at", UTCDateTime, nullable=False),
    # Set when a later event replaced it: the outcome stays, no longer terminal.
    Column("superseded_at", UTCDateTime),
    Index(
        "uq_recorded_outcomes_terminal",
        "token_id",
        unique=True,
        sqlite_where=text("is_terminal"),
        postgresql_where=text("is_terminal"),
    ),
    Index(None, "run_id", "outcome"),
)

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


# -- 0.1's tables, now views over the events (migration 0006): the compatibility surface -----------
# Same names and columns as 0.1; created by the migration, never by ``metadata.create_all``. The
# read models that are not on a hot path read these.
compat_views = MetaData()

rows = Table(
    "rows",
    compat_views,
    Column("run_id", ID),
    Column("row_id", Text),
    Column("row_key", Text),
    Column("row_index", Integer),
    Column("chunk", Integer),
    Column("source_hash", HASH),
    Column("payload_ref", HASH),
)

tokens = Table(
    "tokens",
    compat_views,
    Column("token_id", Text),
    Column("run_id", ID),
    Column("row_id", Text),
    # source | branch | merged
    Column("token_kind", String(10)),
    Column("branch_name", NAME),
    Column("fork_group_id", Text),
    Column("join_group_id", Text),
    Column("chunk", Integer),
    Column("created_at", UTCDateTime),
)

# Only the links no other event records: a nested fork's source token -> the upstream merged token.
# A branch token's parent is its row's source token, a merged token's parents are the branch tokens
# its decision consumed (``coalesce_decisions.consumed``, in order).
token_parents = Table(
    "token_parents",
    compat_views,
    Column("token_id", Text),
    Column("parent_token_id", Text),
    Column("ordinal", Integer),
)

node_states = Table(
    "node_states",
    compat_views,
    Column("state_id", Text),
    Column("token_id", Text),
    Column("run_id", ID),
    Column("node_id", NAME),
    Column("attempt", Integer),
    # completed | dropped | failed | discarded | aborted
    Column("status", String(20)),
    Column("input_hash", HASH),
    Column("output_hash", HASH),
    Column("output_ref", HASH),
    Column("error_json", Text),
    Column("context_json", Text),
    Column("started_at", UTCDateTime),
    Column("completed_at", UTCDateTime),
    Column("duration_ms", Integer),
    Column("recorded_at", UTCDateTime),
    Column("row_id", Text),
    Column("chunk", Integer),
)

token_outcomes = Table(
    "token_outcomes",
    compat_views,
    Column("outcome_id", BigInteger),  # null for an outcome an event implies
    Column("token_id", Text),
    Column("run_id", ID),
    Column("outcome", String(30)),
    Column("is_terminal", Boolean),
    Column("reason", Text),
    Column("error_hash", HASH),
    Column("join_group_id", Text),
    Column("recorded_at", UTCDateTime),
    Column("superseded_at", UTCDateTime),
)

coalesce_decisions = Table(
    "coalesce_decisions",
    compat_views,
    Column("run_id", ID),
    Column("node_id", NAME),
    Column("row_id", Text),
    Column("row_key", Text),
    Column("chunk", Integer),
    Column("decision", String(10)),
    Column("failure_reason", String(60)),
    Column("details_json", Text),
    Column("policy", String(20)),
    Column("merge_strategy", String(10)),
    Column("consumed", Text),
    Column("missing_json", Text),
    Column("late_json", Text),
    Column("collisions_json", Text),
    Column("merged_token_id", Text),
    Column("decided_at", UTCDateTime),
    Column("wait_ms", BigInteger),
    Column("wait_from_first_arrival_ms", BigInteger),
    Column("recorded_at", UTCDateTime),
)

# Every body the events hold, by hash: for users' queries, slow by design (no index on the hashes;
# the read models read bodies with their events).
payloads = Table(
    "payloads",
    compat_views,
    Column("hash", HASH),
    Column("body", Text),
)
