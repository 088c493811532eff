"""Row errors grouped by fingerprint (``recorded_outcomes.error_hash``, :mod:`airflow_elspeth.core.errors`):
the same error across rows, branches and audit runs is one group. Nothing here writes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.ids import branch_of_token, row_numbers
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
    # (row number, audit run, row id, branch) of each loss: the examples are the first rows.
    losses: list[tuple[int, str, str, str]] = field(default_factory=list)


def error_groups(engine: Engine, run_ids: Sequence[str]) -> list[ErrorGroup]:
    """The terminal losses of ``run_ids`` that carry an error fingerprint, one group per
    fingerprint, the largest first: its loss reason, rows (branch tokens), audit runs, branches,
    the message's shape, one example message and up to five example row keys.

    Losses to a row error are recorded outcomes (``recorded_outcomes``), read by run; their rows'
    keys and errors are read by key for the examples only.
    """
    ro = t.recorded_outcomes.c
    counted: dict[str, _Counted] = {}
    with engine.connect() as conn:
        for start in range(0, len(run_ids), _BATCH):
            batch = list(run_ids[start : start + _BATCH])
            for error_hash, reason, run_id, row, token in conn.execute(
                select(ro.error_hash, ro.reason, ro.run_id, ro.row_id, ro.token_id).where(
                    ro.run_id.in_(batch), ro.is_terminal, ro.error_hash.is_not(None)
                )
            ):
                group = counted.setdefault(error_hash, _Counted(reason=reason))
                branch = branch_of_token(token)[1]
                group.rows += 1
                group.audit_runs.add(run_id)
                group.branches.add(branch)
                group.losses.append((row_numbers(row)[1], run_id, row, branch))
        groups = [_group(conn, error_hash, group) for error_hash, group in counted.items()]
    return sorted(groups, key=lambda g: (-g.rows, g.reason, g.error_hash))


def _group(conn: Connection, error_hash: str, group: _Counted) -> ErrorGroup:
    """The group's record, with the row keys of its first rows and the first one's message."""
    sr, st, n = t.source_rows.c, t.step_results.c, t.nodes.c
    keys: list[str] = []
    message = ""
    for row_no, run_id, row, branch in sorted(group.losses)[:EXAMPLE_ROWS]:
        run_no = row_numbers(row)[0]
        keys.append(
            conn.execute(select(sr.row_key).where(sr.run_no == run_no, sr.row_no == row_no)).scalar_one()
        )
        if len(keys) == 1:
            steps = select(n.node_id).where(n.run_id == run_id, n.branch_name == branch)
            error_json = conn.execute(
                select(st.error_json)
                .where(
                    st.run_no == run_no,
                    st.row_no == row_no,
                    st.node_id.in_(steps),
                    st.status == NodeStatus.FAILED.value,
                )
                .limit(1)
            ).scalar()
            message = json.loads(error_json).get("message", "") if error_json else ""
    return ErrorGroup(
        error_hash=error_hash,
        reason=group.reason,
        rows=group.rows,
        audit_runs=sorted(group.audit_runs),
        branches=sorted(group.branches),
        message=message,
        message_shape=message_shape(message),
        example_row_keys=list(dict.fromkeys(keys)),
    )
