"""Never silent: why a run failed, superseded outcomes and decisions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

``runs.status_reason`` says why an audit run failed; ``token_outcomes.superseded_at`` marks an
outcome a later coalesce try replaced (no longer terminal); ``superseded_decisions`` keeps the
decisions so replaced. Frozen history: types are spelled out (see 0001).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(length=32)
NAME = sa.String(length=250)


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("status_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("token_outcomes") as batch:
        batch.add_column(sa.Column("superseded_at", _utc(), nullable=True))
    op.create_table(
        "superseded_decisions",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("node_id", NAME, nullable=False),
        sa.Column("row_id", ID, nullable=False),
        sa.Column("superseded_at", _utc(), nullable=False),
        sa.Column("row_key", sa.Text(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=False),
        sa.Column("failure_reason", sa.String(length=60), nullable=True),
        sa.Column("details_json", sa.Text(), nullable=False),
        sa.Column("missing_json", sa.Text(), nullable=False),
        sa.Column("decided_at", _utc(), nullable=False),
        sa.Column("recorded_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint(
            "run_id", "node_id", "row_id", "superseded_at", name="pk_superseded_decisions"
        ),
    )


def downgrade() -> None:
    op.drop_table("superseded_decisions")
    with op.batch_alter_table("token_outcomes") as batch:
        batch.drop_column("superseded_at")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("status_reason")
