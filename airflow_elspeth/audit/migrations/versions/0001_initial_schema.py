"""Initial audit schema.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Migrations are frozen history: spell out types and names here, never import them from
airflow_elspeth.audit.schema (which moves on). Every migration must run on SQLite and PostgreSQL;
tests/audit/test_migrations.py checks that head matches schema.metadata on both.

Names follow schema.metadata's naming convention (pk_<table>, uq_<table>_<columns>,
ix_<table>_<columns>, fk_<table>_<column>_<referred table>). Timestamps are stored as
TIMESTAMP WITH TIME ZONE (PostgreSQL) / DATETIME (SQLite); the UTCDateTime type decorator in
schema.py normalises them to aware UTC on the way in and out.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(length=32)
HASH = sa.String(length=64)
NAME = sa.String(length=250)


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("dag_id", NAME, nullable=False),
        sa.Column("airflow_run_id", NAME, nullable=False),
        sa.Column("fork_task_id", NAME, nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=False),
        sa.Column("clear_number", sa.Integer(), server_default="0", nullable=False),
        sa.Column("run_type", sa.String(length=50), nullable=True),
        sa.Column("logical_date", _utc(), nullable=True),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("completed_at", _utc(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("config_hash", HASH, nullable=False),
        sa.Column("previous_run_id", ID, nullable=True),
        sa.Column("rows_total", sa.Integer(), nullable=True),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("chunks_total", sa.Integer(), nullable=True),
        sa.Column("branches_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_runs"),
        sa.UniqueConstraint(
            "dag_id",
            "airflow_run_id",
            "fork_task_id",
            "try_number",
            name="uq_runs_dag_id_airflow_run_id_fork_task_id_try_number",
        ),
    )
    op.create_index("ix_runs_dag_id_airflow_run_id", "runs", ["dag_id", "airflow_run_id"], unique=False)

    op.create_table(
        "nodes",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("node_id", NAME, nullable=False),
        sa.Column("task_id", NAME, nullable=False),
        sa.Column("node_type", sa.String(length=20), nullable=False),
        sa.Column("branch_name", NAME, nullable=True),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("config_hash", HASH, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_nodes_run_id_runs"),
        sa.PrimaryKeyConstraint("run_id", "node_id", name="pk_nodes"),
    )

    op.create_table(
        "rows",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("row_id", ID, nullable=False),
        sa.Column("row_key", sa.Text(), nullable=False),
        sa.Column("row_index", sa.Integer(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("source_hash", HASH, nullable=False),
        sa.Column("payload_ref", HASH, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_rows_run_id_runs"),
        sa.PrimaryKeyConstraint("run_id", "row_id", name="pk_rows"),
        sa.UniqueConstraint("run_id", "row_key", name="uq_rows_run_id_row_key"),
    )
    op.create_index("ix_rows_run_id_chunk_row_index", "rows", ["run_id", "chunk", "row_index"], unique=False)

    op.create_table(
        "tokens",
        sa.Column("token_id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("row_id", ID, nullable=False),
        sa.Column("token_kind", sa.String(length=10), nullable=False),
        sa.Column("branch_name", NAME, nullable=True),
        sa.Column("fork_group_id", ID, nullable=True),
        sa.Column("join_group_id", ID, nullable=True),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("token_id", name="pk_tokens"),
    )
    op.create_index(
        "ix_tokens_run_id_chunk_branch_name", "tokens", ["run_id", "chunk", "branch_name"], unique=False
    )
    op.create_index("ix_tokens_run_id_row_id", "tokens", ["run_id", "row_id"], unique=False)

    op.create_table(
        "token_parents",
        sa.Column("token_id", ID, nullable=False),
        sa.Column("parent_token_id", ID, nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("token_id", "parent_token_id", name="pk_token_parents"),
    )
    op.create_index("ix_token_parents_parent_token_id", "token_parents", ["parent_token_id"], unique=False)

    op.create_table(
        "node_states",
        sa.Column("state_id", ID, nullable=False),
        sa.Column("token_id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("node_id", NAME, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("input_hash", HASH, nullable=True),
        sa.Column("output_hash", HASH, nullable=True),
        sa.Column("output_ref", HASH, nullable=True),
        sa.Column("error_json", sa.Text(), nullable=True),
        sa.Column("context_json", sa.Text(), nullable=True),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("completed_at", _utc(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.Column("row_id", ID, nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("state_id", name="pk_node_states"),
        sa.UniqueConstraint("token_id", "node_id", "attempt", name="uq_node_states_token_id_node_id_attempt"),
    )
    op.create_index(
        "ix_node_states_run_id_node_id_chunk", "node_states", ["run_id", "node_id", "chunk"], unique=False
    )

    op.create_table(
        "token_outcomes",
        # INTEGER on SQLite so the column is the rowid alias (autoincrementing), BIGSERIAL elsewhere.
        sa.Column(
            "outcome_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("token_id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("outcome", sa.String(length=30), nullable=False),
        sa.Column("is_terminal", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("error_hash", HASH, nullable=True),
        sa.Column("join_group_id", ID, nullable=True),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("outcome_id", name="pk_token_outcomes"),
    )
    # At most one terminal outcome per token, enforced by the database.
    op.create_index(
        "uq_token_outcomes_terminal",
        "token_outcomes",
        ["token_id"],
        unique=True,
        sqlite_where=sa.text("is_terminal"),
        postgresql_where=sa.text("is_terminal"),
    )
    op.create_index("ix_token_outcomes_run_id_outcome", "token_outcomes", ["run_id", "outcome"], unique=False)

    op.create_table(
        "coalesce_decisions",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("node_id", NAME, nullable=False),
        sa.Column("row_id", ID, nullable=False),
        sa.Column("row_key", sa.Text(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=False),
        sa.Column("failure_reason", sa.String(length=60), nullable=True),
        sa.Column("details_json", sa.Text(), nullable=False),
        sa.Column("policy", sa.String(length=20), nullable=False),
        sa.Column("merge_strategy", sa.String(length=10), nullable=False),
        sa.Column("consumed", sa.Text(), nullable=False),
        sa.Column("missing_json", sa.Text(), nullable=False),
        sa.Column("late_json", sa.Text(), nullable=False),
        sa.Column("collisions_json", sa.Text(), nullable=True),
        sa.Column("merged_token_id", ID, nullable=True),
        sa.Column("decided_at", _utc(), nullable=False),
        sa.Column("wait_ms", sa.BigInteger(), nullable=True),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "node_id", "row_id", name="pk_coalesce_decisions"),
    )
    op.create_index(
        "ix_coalesce_decisions_run_id_node_id_decision_failure_reason",
        "coalesce_decisions",
        ["run_id", "node_id", "decision", "failure_reason"],
        unique=False,
    )
    op.create_index(
        "ix_coalesce_decisions_run_id_node_id_chunk",
        "coalesce_decisions",
        ["run_id", "node_id", "chunk"],
        unique=False,
    )

    op.create_table(
        "payloads",
        sa.Column("hash", HASH, nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("hash", name="pk_payloads"),
    )

    op.create_table(
        "chunk_progress",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("node_id", NAME, nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("rows_done", sa.Integer(), nullable=False),
        sa.Column("rows_total", sa.Integer(), nullable=False),
        sa.Column("seen_signature", sa.Text(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "node_id", "chunk", name="pk_chunk_progress"),
    )

    op.create_table(
        "branch_task_losses",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("node_id", NAME, nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("branch_name", NAME, nullable=False),
        sa.Column("task_state", sa.String(length=30), nullable=False),
        sa.Column("observed_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "node_id", "chunk", name="pk_branch_task_losses"),
    )


def downgrade() -> None:
    op.drop_table("branch_task_losses")
    op.drop_table("chunk_progress")
    op.drop_table("payloads")
    op.drop_index("ix_coalesce_decisions_run_id_node_id_chunk", table_name="coalesce_decisions")
    op.drop_index(
        "ix_coalesce_decisions_run_id_node_id_decision_failure_reason", table_name="coalesce_decisions"
    )
    op.drop_table("coalesce_decisions")
    op.drop_index("ix_token_outcomes_run_id_outcome", table_name="token_outcomes")
    op.drop_index("uq_token_outcomes_terminal", table_name="token_outcomes")
    op.drop_table("token_outcomes")
    op.drop_index("ix_node_states_run_id_node_id_chunk", table_name="node_states")
    op.drop_table("node_states")
    op.drop_index("ix_token_parents_parent_token_id", table_name="token_parents")
    op.drop_table("token_parents")
    op.drop_index("ix_tokens_run_id_row_id", table_name="tokens")
    op.drop_index("ix_tokens_run_id_chunk_branch_name", table_name="tokens")
    op.drop_table("tokens")
    op.drop_index("ix_rows_run_id_chunk_row_index", table_name="rows")
    op.drop_table("rows")
    op.drop_table("nodes")
    op.drop_index("ix_runs_dag_id_airflow_run_id", table_name="runs")
    op.drop_table("runs")
