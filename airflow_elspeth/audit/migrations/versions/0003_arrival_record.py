"""The arrival record of a decision: the wait from the row's first arrival.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

``coalesce_decisions.wait_from_first_arrival_ms``: from the first branch arrival of the row to its
decision (null when nothing arrived, and for decisions written before this revision); ``wait_ms``
keeps the wait from the fork's completion. The arrival order with each branch's offset is in
``details_json``. Frozen history: types are spelled out (see 0001).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("coalesce_decisions") as batch:
        batch.add_column(sa.Column("wait_from_first_arrival_ms", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("coalesce_decisions") as batch:
        batch.drop_column("wait_from_first_arrival_ms")
