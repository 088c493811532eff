"""CoalesceTrigger: wait in the triggerer until a coalesce has something to decide."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async
from sqlalchemy import select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.coalesce import CoalesceSpec, load_run, pending_work, task_loss_rows


class CoalesceTrigger(BaseTrigger):
    """Poll the audit store, read-only, until the deferred coalesce should resume.

    Fires when a pass would decide something (new arrivals or losses on an undecided chunk, the
    deadline reached), when a branch task ended that the coalesce has not recorded yet, or when
    every row is decided. It writes nothing: the sensor's ``execute_complete`` decides with the same
    pass as the other modes. Each poll reads a few rows per chunk (``chunk_progress``), not the rows.

    :param spec: the coalesce's :class:`~airflow_elspeth.audit.coalesce.CoalesceSpec` as a dict.
    :param run_id: the audit run.
    :param dag_id: the DAG of the branch tasks whose states are watched.
    :param airflow_run_id: the DAG run of those tasks.
    :param audit_conn_id: the audit store connection (default resolution when None).
    :param poll_interval: seconds between polls.
    """

    def __init__(
        self,
        *,
        spec: dict[str, Any],
        run_id: str,
        dag_id: str,
        airflow_run_id: str,
        audit_conn_id: str | None = None,
        poll_interval: float = 10.0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.run_id = run_id
        self.dag_id = dag_id
        self.airflow_run_id = airflow_run_id
        self.audit_conn_id = audit_conn_id
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "spec": self.spec,
                "run_id": self.run_id,
                "dag_id": self.dag_id,
                "airflow_run_id": self.airflow_run_id,
                "audit_conn_id": self.audit_conn_id,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        spec = CoalesceSpec.from_dict(self.spec)
        while True:
            try:
                states = await self._task_states(spec)
                reason = await sync_to_async(self._why_resume)(spec, states)
            except Exception as err:  # reported to the task, which fails with this message
                self.log.exception("coalesce trigger for audit run %s failed", self.run_id)
                yield TriggerEvent({"status": "error", "message": f"{type(err).__name__}: {err}"})
                return
            if reason is not None:
                self.log.info("coalesce %s: resuming (%s)", spec.node_id, reason)
                yield TriggerEvent({"status": "ready", "reason": reason, "run_id": self.run_id})
                return
            await asyncio.sleep(self.poll_interval)

    async def _task_states(self, spec: CoalesceSpec) -> dict[str, str]:
        """Branch task states through the Task SDK, one task id per call."""
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        states: dict[str, str] = {}
        for task_id in spec.delivering.values():
            found = await sync_to_async(RuntimeTaskInstance.get_task_states)(
                dag_id=self.dag_id, task_ids=[task_id], run_ids=[self.airflow_run_id]
            )
            states.update({k: str(v) for k, v in found.get(self.airflow_run_id, {}).items() if v is not None})
        return states

    def _why_resume(self, spec: CoalesceSpec, states: dict[str, str]) -> str | None:
        from airflow_elspeth.hooks.audit import ElspethAuditHook

        engine = ElspethAuditHook(audit_conn_id=self.audit_conn_id).get_engine()
        ready, all_decided = pending_work(engine, spec, self.run_id)
        if all_decided:
            return "every row decided"
        if ready:
            return "rows to decide"
        with engine.connect() as conn:
            run = load_run(conn, self.run_id)
            if run is None:
                return "audit run missing"
            tl = t.branch_task_losses.c
            recorded = {
                (node, chunk)
                for node, chunk in conn.execute(select(tl.node_id, tl.chunk).where(tl.run_id == self.run_id))
            }
        ended = task_loss_rows(spec, run.chunks_total, states)
        if any((row["node_id"], row["chunk"]) not in recorded for row in ended):
            return "a branch task ended"
        return None
