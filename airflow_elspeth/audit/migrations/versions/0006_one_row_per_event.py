"""Schema 0.2: one row per event; 0.1's tables become views over the events.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08

The events: ``source_rows`` (a row and its body), ``step_results`` (a branch step's result per row
and attempt, its output inline), ``decisions`` (a coalesce's decision per row, the merged row
inline) and ``recorded_outcomes`` (the token outcomes no event implies), keyed by a run's number
(``runs.run_no``, added here) and a row's number (its index in the fork's input). The views
``rows``, ``tokens``, ``token_parents``, ``node_states``, ``token_outcomes``,
``coalesce_decisions`` and ``payloads`` keep 0.1's names and columns; their ids are the readable
ids of ``airflow_elspeth/audit/ids.py``, computed in SQL here.

This revision only changes the schema, in one transaction: it numbers the runs, renames 0.1's
tables to ``legacy_<name>`` and creates the new tables and the views. The rows of those legacy
tables are converted afterwards, in batches of whole chunks, each batch its own transaction
(``airflow_elspeth.audit.migrate.convert_legacy``, which ``migrate.upgrade`` runs), so a store
too large for one transaction converts, and a conversion interrupted resumes where it stopped. The
downgrade is not supported: 0.1's hex ids cannot be recomputed from the views without the legacy
rows. Frozen history: names are spelled out (see 0001).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HASH = sa.String(length=64)
NAME = sa.String(length=250)
ID = sa.String(length=32)

LEGACY_TABLES = (
    "rows",
    "tokens",
    "token_parents",
    "node_states",
    "token_outcomes",
    "coalesce_decisions",
    "payloads",
)


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _number_runs() -> None:
    conn = op.get_bind()
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("run_no", sa.Integer(), nullable=True))
    run_ids = conn.execute(sa.text("SELECT run_id FROM runs ORDER BY started_at, run_id")).scalars().all()
    if run_ids:
        conn.execute(
            sa.text("UPDATE runs SET run_no = :no WHERE run_id = :run_id"),
            [{"no": no, "run_id": run_id} for no, run_id in enumerate(run_ids, start=1)],
        )
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("run_no", existing_type=sa.Integer(), nullable=False)
        batch.create_unique_constraint("uq_runs_run_no", ["run_no"])


def _create_event_tables() -> None:
    without_rowid = {"sqlite_with_rowid": False}
    op.create_table(
        "source_rows",
        sa.Column("run_no", sa.Integer(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("row_no", sa.Integer(), nullable=False),
        sa.Column("row_key", sa.Text(), nullable=False),
        sa.Column("source_hash", HASH, nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("parent_token_id", sa.Text(), nullable=True),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("run_no", "chunk", "row_no", name="pk_source_rows"),
        sa.UniqueConstraint("run_no", "row_key", name="uq_source_rows_run_no_row_key"),
        **without_rowid,
    )
    op.create_table(
        "step_results",
        sa.Column("run_no", sa.Integer(), nullable=False),
        sa.Column("node_id", NAME, nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("row_no", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("input_hash", HASH, nullable=True),
        sa.Column("output_hash", HASH, nullable=True),
        sa.Column("output_body", sa.Text(), nullable=True),
        sa.Column("error_json", sa.Text(), nullable=True),
        sa.Column("context_json", sa.Text(), nullable=True),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("completed_at", _utc(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("run_no", "node_id", "chunk", "row_no", "attempt", name="pk_step_results"),
        **without_rowid,
    )
    op.create_table(
        "decisions",
        sa.Column("run_no", sa.Integer(), nullable=False),
        sa.Column("node_id", NAME, nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("row_no", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=False),
        sa.Column("failure_reason", sa.String(length=60), nullable=True),
        sa.Column("details_json", sa.Text(), nullable=False),
        sa.Column("consumed", sa.Text(), nullable=False),
        sa.Column("missing_json", sa.Text(), nullable=False),
        sa.Column("late_json", sa.Text(), nullable=False),
        sa.Column("collisions_json", sa.Text(), nullable=True),
        sa.Column("merged_hash", HASH, nullable=True),
        sa.Column("merged_body", sa.Text(), nullable=True),
        sa.Column("decided_at", _utc(), nullable=False),
        sa.Column("wait_ms", sa.BigInteger(), nullable=True),
        sa.Column("wait_from_first_arrival_ms", sa.BigInteger(), nullable=True),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("run_no", "node_id", "chunk", "row_no", name="pk_decisions"),
        **without_rowid,
    )
    op.create_index(
        "ix_decisions_run_no_node_id_decision_failure_reason",
        "decisions",
        ["run_no", "node_id", "decision", "failure_reason"],
        unique=False,
    )
    op.create_table(
        "recorded_outcomes",
        sa.Column(
            "outcome_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("token_id", sa.Text(), nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("row_id", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(length=30), nullable=False),
        sa.Column("is_terminal", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("error_hash", HASH, nullable=True),
        sa.Column("join_group_id", sa.Text(), nullable=True),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.Column("superseded_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("outcome_id", name="pk_recorded_outcomes"),
    )
    op.create_index(
        "uq_recorded_outcomes_terminal",
        "recorded_outcomes",
        ["token_id"],
        unique=True,
        sqlite_where=sa.text("is_terminal"),
        postgresql_where=sa.text("is_terminal"),
    )
    op.create_index(
        "ix_recorded_outcomes_run_id_outcome", "recorded_outcomes", ["run_id", "outcome"], unique=False
    )


def _view_sql(dialect: str) -> dict[str, str]:
    """The compatibility views. ``R(x)`` is a row id, ``<run_no>.<row_no>``; tokens extend it."""
    postgres = dialect == "postgresql"

    def row(alias: str) -> str:
        return f"(CAST({alias}.run_no AS TEXT) || '.' || CAST({alias}.row_no AS TEXT))"

    def unnest(json_column: str, alias: str) -> str:
        # One row per element of a JSON list of strings, as ``alias.value`` (text).
        if postgres:
            return (
                f"CROSS JOIN LATERAL json_array_elements_text(CAST({json_column} AS json)) AS {alias}(value)"
            )
        return f"JOIN json_each({json_column}) AS {alias}"

    def contains(json_column: str, value: str) -> str:
        # Whether a JSON list of strings holds ``value``.
        if postgres:
            return (
                f"EXISTS (SELECT 1 FROM json_array_elements_text(CAST({json_column} AS json)) AS e(value)"
                f" WHERE e.value = {value})"
            )
        return f"EXISTS (SELECT 1 FROM json_each({json_column}) AS e WHERE e.value = {value})"

    def config(field: str) -> str:
        if postgres:
            return f"(CAST(n.config_json AS json) -> 'config' ->> '{field}')"
        return f"json_extract(n.config_json, '$.config.{field}')"

    true = "TRUE" if postgres else "1"
    null_text = "CAST(NULL AS TEXT)"
    null_int = "CAST(NULL AS BIGINT)" if postgres else "NULL"
    s, st, d = row("s"), row("st"), row("d")
    merged = "d.decision = 'merged'"
    return {
        "rows": (
            f"SELECT r.run_id, {s} AS row_id, s.row_key, s.row_no AS row_index, s.chunk, s.source_hash,"
            " s.source_hash AS payload_ref FROM source_rows s JOIN runs r ON r.run_no = s.run_no"
        ),
        "tokens": (
            f"SELECT {s} || ':s' AS token_id, r.run_id, {s} AS row_id, 'source' AS token_kind,"
            f" {null_text} AS branch_name, {s} || ':f' AS fork_group_id, {null_text} AS join_group_id,"
            " s.chunk, s.recorded_at AS created_at FROM source_rows s JOIN runs r ON r.run_no = s.run_no"
            f" UNION ALL SELECT {s} || ':b:' || b.value, r.run_id, {s}, 'branch', b.value, {s} || ':f',"
            f" {null_text}, s.chunk, s.recorded_at FROM source_rows s JOIN runs r ON r.run_no = s.run_no"
            f" {unnest('r.branches_json', 'b')}"
            f" UNION ALL SELECT {d} || ':m:' || d.node_id, r.run_id, {d}, 'merged', {null_text}, {null_text},"
            f" {d} || ':j:' || d.node_id, d.chunk, d.recorded_at FROM decisions d"
            f" JOIN runs r ON r.run_no = d.run_no WHERE {merged}"
        ),
        "token_parents": (
            f"SELECT {s} || ':s' AS token_id, s.parent_token_id, 0 AS ordinal FROM source_rows s"
            " WHERE s.parent_token_id IS NOT NULL"
        ),
        "node_states": (
            f"SELECT {st} || ':b:' || n.branch_name || '@' || st.node_id || '#' || CAST(st.attempt AS TEXT)"
            f" AS state_id, {st} || ':b:' || n.branch_name AS token_id, r.run_id, st.node_id, st.attempt,"
            " st.status, st.input_hash, st.output_hash, st.output_hash AS output_ref, st.error_json,"
            " st.context_json, st.started_at, st.completed_at, st.duration_ms, st.recorded_at,"
            f" {st} AS row_id, st.chunk FROM step_results st JOIN runs r ON r.run_no = st.run_no"
            " JOIN nodes n ON n.run_id = r.run_id AND n.node_id = st.node_id"
            f" UNION ALL SELECT {d} || ':m:' || d.node_id, {d} || ':m:' || d.node_id, r.run_id, d.node_id,"
            f" 1, 'completed', {null_text}, d.merged_hash, d.merged_hash, {null_text},"
            " '{\"collisions\":' || COALESCE(d.collisions_json, 'null')"
            " || ',\"consumed\":' || d.consumed || '}',"
            f" d.decided_at, d.recorded_at, 0, d.recorded_at, {d}, d.chunk FROM decisions d"
            f" JOIN runs r ON r.run_no = d.run_no WHERE {merged}"
        ),
        "token_outcomes": (
            "SELECT o.outcome_id, o.token_id, o.run_id, o.outcome, o.is_terminal, o.reason, o.error_hash,"
            " o.join_group_id, o.recorded_at, o.superseded_at FROM recorded_outcomes o"
            f" UNION ALL SELECT {null_int}, {s} || ':s', r.run_id, 'forked', {true}, {null_text},"
            f" {null_text},"
            f" {null_text}, s.recorded_at, NULL FROM source_rows s JOIN runs r ON r.run_no = s.run_no"
            f" UNION ALL SELECT {null_int}, {d} || ':m:' || d.node_id, r.run_id, 'merged', {true},"
            f" {null_text},"
            f" {null_text}, {d} || ':j:' || d.node_id, d.recorded_at, NULL FROM decisions d"
            f" JOIN runs r ON r.run_no = d.run_no WHERE {merged}"
            f" UNION ALL SELECT {null_int}, {d} || ':b:' || c.value, r.run_id, 'coalesced', {true},"
            f" {null_text},"
            f" {null_text}, {d} || ':j:' || d.node_id, d.recorded_at, NULL FROM decisions d"
            f" JOIN runs r ON r.run_no = d.run_no {unnest('d.consumed', 'c')}"
            # One terminal outcome per token, as 0.1 kept the first (its partial unique index): a
            # branch two coalesces consume is coalesced by the first merged decision only, and not
            # at all if an outcome was recorded for it (e.g. late to the other coalesce). Anti-joins,
            # not NOT EXISTS: a reader's filter on the token id is then applied before them.
            f" LEFT JOIN recorded_outcomes o ON o.token_id = {d} || ':b:' || c.value AND o.is_terminal"
            " LEFT JOIN decisions d2 ON d2.run_no = d.run_no"
            " AND d2.node_id IN (SELECT n2.node_id FROM nodes n2"
            " WHERE n2.run_id = r.run_id AND n2.node_type = 'coalesce') AND d2.chunk = d.chunk"
            " AND d2.row_no = d.row_no AND d2.decision = 'merged' AND (d2.recorded_at < d.recorded_at"
            " OR (d2.recorded_at = d.recorded_at AND d2.node_id < d.node_id))"
            f" AND {contains('d2.consumed', 'c.value')}"
            f" WHERE {merged} AND o.outcome_id IS NULL AND d2.run_no IS NULL"
        ),
        "coalesce_decisions": (
            f"SELECT r.run_id, d.node_id, {d} AS row_id, s.row_key, d.chunk, d.decision, d.failure_reason,"
            f" d.details_json, {config('policy')} AS policy, {config('merge')} AS merge_strategy, d.consumed,"
            " d.missing_json, d.late_json, d.collisions_json,"
            f" CASE WHEN {merged} THEN {d} || ':m:' || d.node_id END AS merged_token_id, d.decided_at,"
            " d.wait_ms, d.wait_from_first_arrival_ms, d.recorded_at FROM decisions d"
            " JOIN runs r ON r.run_no = d.run_no"
            " JOIN source_rows s ON s.run_no = d.run_no AND s.chunk = d.chunk AND s.row_no = d.row_no"
            " JOIN nodes n ON n.run_id = r.run_id AND n.node_id = d.node_id"
        ),
        "payloads": (
            "SELECT source_hash AS hash, body FROM source_rows"
            " UNION SELECT output_hash, output_body FROM step_results WHERE output_hash IS NOT NULL"
            " AND output_body IS NOT NULL"
            " UNION SELECT merged_hash, merged_body FROM decisions WHERE merged_hash IS NOT NULL"
        ),
    }


def upgrade() -> None:
    _number_runs()
    for name in LEGACY_TABLES:
        op.rename_table(name, f"legacy_{name}")
    _create_event_tables()
    for name, sql in _view_sql(op.get_bind().dialect.name).items():
        op.get_bind().exec_driver_sql(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    raise NotImplementedError("schema 0.2 cannot be downgraded: 0.1's ids are not kept (see the docstring)")
