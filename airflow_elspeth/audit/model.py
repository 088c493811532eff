"""The audit store's plain read-side model: what both the coalesce pass and the read models know.

A coalesce's stored configuration (:class:`CoalesceSpec`), an audit run's shape (:class:`RunInfo`,
:func:`load_run`, :func:`run_number`, :func:`deadline_of`). The pass
(``audit/coalesce.py``) and the writers (``audit/store.py``) import this module; the read models
(``audit/read/``) import it and never the pass. SQL and the core, no Airflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.core.config import CoalesceConfig
from airflow_elspeth.exceptions import AuditInvariantError

# The chunk of a ``branch_task_losses`` row (and of a ``get_task_states`` key) that stands for a
# whole unmapped task rather than one mapped instance.
WHOLE_TASK = -1


@dataclass(frozen=True)
class CoalesceSpec:
    """What a coalesce pass needs to know about its coalesce, as plain data (serialisable)."""

    node_id: str
    config: CoalesceConfig
    delivering: Mapping[str, str]  # branch -> task id of the branch step that delivers arrivals
    mapped: Mapping[str, bool]  # branch -> whether that task is mapped over the fork's chunks
    # The merged rows' contract (``MergedContract.as_dict``: fields, untyped branches), None when no
    # contract applies (``nested``, or a coalesce registered before contracts existed).
    output_contract: Mapping[str, Any] | None = None
    # Whether a branch task's recorded loss fences what it writes afterwards (:func:`row_events`).
    # False only for a coalesce registered by 0.1, whose decisions are replayed as 0.1 made them.
    fenced: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "config": self.config.as_dict(),
            "delivering": dict(self.delivering),
            "mapped": dict(self.mapped),
            "output_contract": dict(self.output_contract) if self.output_contract is not None else None,
            "fenced": self.fenced,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CoalesceSpec:
        from airflow_elspeth.core.config import ON_COLLISION_RECORD, coalesce_config

        config = data["config"]
        return cls(
            node_id=data["node_id"],
            config=coalesce_config(
                branches=config["branches"],
                policy=config["policy"],
                merge=config["merge"],
                timeout=timedelta(seconds=config["timeout_seconds"]),
                quorum=config["quorum"],
                select_branch=config["select_branch"],
                on_collision=config.get("on_collision", ON_COLLISION_RECORD),
            ),
            delivering=dict(data["delivering"]),
            mapped=dict(data["mapped"]),
            output_contract=data.get("output_contract"),
            fenced=data.get("fenced", False),  # absent: registered by 0.1, before fencing
        )

    def task_keys(self, branch: str, chunks_total: int) -> dict[str, int]:
        """Keys of ``get_task_states`` for a branch's delivering task -> the chunk each covers."""
        task_id = self.delivering[branch]
        if self.mapped[branch]:
            return {f"{task_id}_{chunk}": chunk for chunk in range(chunks_total)}
        return {task_id: WHOLE_TASK}


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    run_no: int
    status: str
    completed_at: datetime | None
    rows_total: int
    chunk_size: int
    chunks_total: int

    def chunk_rows(self, chunk: int) -> int:
        return max(0, min(self.chunk_size, self.rows_total - chunk * self.chunk_size))


def load_run(conn: Connection, run_id: str) -> RunInfo | None:
    row = conn.execute(select(t.runs).where(t.runs.c.run_id == run_id)).mappings().first()
    if row is None:
        return None
    return RunInfo(
        run_id=run_id,
        run_no=row["run_no"],
        status=row["status"],
        completed_at=row["completed_at"],
        rows_total=row["rows_total"] or 0,
        chunk_size=row["chunk_size"],
        chunks_total=row["chunks_total"] or 0,
    )


def run_number(conn: Connection, run_id: str) -> int:
    """The number of an audit run in this store: the key of its events.

    :raises AuditInvariantError: no such run (its events cannot be written or read).
    """
    run_no = conn.execute(select(t.runs.c.run_no).where(t.runs.c.run_id == run_id)).scalar()
    if run_no is None:
        raise AuditInvariantError(f"audit run {run_id} is not in the audit store")
    return int(run_no)


def deadline_of(run: RunInfo, config: CoalesceConfig) -> datetime:
    if run.completed_at is None:
        raise ValueError(f"audit run {run.run_id} has not completed its fork")
    return run.completed_at + config.timeout
