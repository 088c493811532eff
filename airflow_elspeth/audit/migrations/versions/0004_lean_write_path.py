"""The write path at the speed of the disk: drop the index nothing reads.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

``ix_token_parents_parent_token_id`` (token_parents by parent) is maintained on every fork and
every merged row (six entries per source row of a three-branch fork) but no query of the provider
looks tokens up by their parent: lineage walks from a token to its parents (the primary key), and
``verify``'s orphan check joins each parent to ``tokens`` by its primary key. Frozen history: names
are spelled out (see 0001).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_token_parents_parent_token_id", table_name="token_parents")


def downgrade() -> None:
    op.create_index("ix_token_parents_parent_token_id", "token_parents", ["parent_token_id"], unique=False)
