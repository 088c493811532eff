"""Token parents that can be derived are no longer stored.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

A branch token's parent is its row's source token, and a merged token's parents are the branch
tokens its decision consumed (``coalesce_decisions.consumed``, in order): the fork and the coalesce
stop writing those links (six rows per source row of a three-branch fork), and this removes the
ones earlier versions wrote, so every run reads the same way. ``token_parents`` keeps the one link
nothing else records: a nested fork's source token -> the upstream merged token. The downgrade
writes the derived links back. Frozen history: names are spelled out (see 0001).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "DELETE FROM token_parents WHERE token_id IN"
        " (SELECT token_id FROM tokens WHERE token_kind IN ('branch', 'merged'))"
    )


def _token_id(*parts: str) -> str:
    # The identifier scheme of 0.1 (core/canonical.derive_id, string parts), frozen here.
    data = b"".join(b"s%d:%s" % (len(p.encode()), p.encode()) for p in parts)
    return hashlib.sha256(data).hexdigest()[:32]


def downgrade() -> None:
    conn = op.get_bind()
    links: list[dict[str, object]] = []
    branch_rows = conn.execute(
        sa.text(
            "SELECT b.token_id, b.run_id, b.row_id, r.branches_json, b.branch_name FROM tokens b"
            " JOIN runs r ON r.run_id = b.run_id WHERE b.token_kind = 'branch'"
        )
    )
    for token_id, run_id, row_id, branches_json, branch in branch_rows:
        source = _token_id(run_id, row_id, "source")
        links.append({"t": token_id, "p": source, "o": json.loads(branches_json).index(branch)})
    merged_rows = conn.execute(
        sa.text(
            "SELECT run_id, row_id, merged_token_id, consumed FROM coalesce_decisions"
            " WHERE merged_token_id IS NOT NULL"
        )
    )
    for run_id, row_id, merged_id, consumed in merged_rows:
        for ordinal, branch in enumerate(json.loads(consumed)):
            links.append({"t": merged_id, "p": _token_id(run_id, row_id, "branch", branch), "o": ordinal})
    if links:
        conn.execute(
            sa.text("INSERT INTO token_parents (token_id, parent_token_id, ordinal) VALUES (:t, :p, :o)"),
            links,
        )
