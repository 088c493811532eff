"""Row errors grouped by fingerprint (``token_outcomes.error_hash``, :mod:`airflow_elspeth.core.errors`):
the same error across rows, branches and audit runs is one group. Nothing here writes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine, and_, func, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.read.records import ErrorGroup
from airflow_elspeth.core.errors import message_shape
from airflow_elspeth.core.vocabulary import NodeStatus

_BATCH = 500
EXAMPLE_ROWS = 5


@dataclass
class _Counted:
    """One fingerprint's losses, as the batches of runs are counted."""

    reason: str
    rows: int = 0
    audit_runs: set[str] = field(default_factory=set)
    branches: set[str] = field(default_factory=set)


def error_groups(engine: Engine, run_ids: Sequence[str]) -> list[ErrorGroup]:
    """The terminal losses of ``run_ids`` that carry an error fingerprint, one group per
    fingerprint, the largest first: its loss reason, rows (branch tokens), audit runs, branches,
    the message's shape, one example message and up to five example row keys."""
    o, tk, r, ns = t.token_outcomes.c, t.tokens.c, t.rows.c, t.node_states.c
    counted: dict[str, _Counted] = {}
    groups: list[ErrorGroup] = []
    with engine.connect() as conn:
        for start in range(0, len(run_ids), _BATCH):
            batch = list(run_ids[start : start + _BATCH])
            scope = and_(o.run_id.in_(batch), o.is_terminal, o.error_hash.is_not(None))
            found = conn.execute(
                select(o.error_hash, o.reason, o.run_id, tk.branch_name, func.count())
                .select_from(t.token_outcomes.join(t.tokens, tk.token_id == o.token_id))
                .where(scope)
                .group_by(o.error_hash, o.reason, o.run_id, tk.branch_name)
            )
            for error_hash, reason, run_id, branch, n in found:
                group = counted.setdefault(error_hash, _Counted(reason=reason))
                group.rows += n
                group.audit_runs.add(run_id)
                group.branches.add(branch)
        failed = NodeStatus.FAILED.value
        for error_hash, group in counted.items():
            examples = conn.execute(
                select(r.row_key, ns.error_json)
                .select_from(
                    t.token_outcomes.join(t.tokens, tk.token_id == o.token_id)
                    .join(t.rows, and_(r.run_id == tk.run_id, r.row_id == tk.row_id))
                    .join(t.node_states, and_(ns.token_id == o.token_id, ns.status == failed))
                )
                .where(o.error_hash == error_hash, o.is_terminal, o.run_id.in_(sorted(group.audit_runs)))
                .order_by(r.row_index)
                .limit(EXAMPLE_ROWS)
            ).all()
            keys = list(dict.fromkeys(key for key, _ in examples))
            message = json.loads(examples[0][1]).get("message", "") if examples and examples[0][1] else ""
            groups.append(
                ErrorGroup(
                    error_hash=error_hash,
                    reason=group.reason,
                    rows=group.rows,
                    audit_runs=sorted(group.audit_runs),
                    branches=sorted(group.branches),
                    message=message,
                    message_shape=message_shape(message),
                    example_row_keys=keys,
                )
            )
    return sorted(groups, key=lambda g: (-g.rows, g.reason, g.error_hash))
