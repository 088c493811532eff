"""CoalesceTrigger: decide a deferred coalesce's rows in the triggerer; resume it once all are decided."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async
from sqlalchemy import Engine

from airflow_elspeth.audit.coalesce import WaitResult, coalesce_pass, waiting_poll
from airflow_elspeth.audit.dml import TRANSIENT_ERROR_GRACE
from airflow_elspeth.audit.model import CoalesceSpec
from airflow_elspeth.audit.read.runs import newest_completed_run
from airflow_elspeth.audit.store import AuditStore
from airflow_elspeth.core.vocabulary import ENDED_TASK_STATES, TASK_SUCCESS, NodeType

# A failed poll (audit DB or Task SDK unreachable) is "not yet": polls back off up to this long, and
# the task is told only once the failures outlast the deadline (or, before the deadline is known,
# the trigger's start) by TRANSIENT_ERROR_GRACE.
MAX_ERROR_BACKOFF_SECONDS = 60.0
MIN_SLEEP_SECONDS = 0.2
# The trigger never fires sooner than this after it started. Airflow 3.3 fails a deferred task whose
# trigger fired before the scheduler drained the executor's "success" event of the deferring exit,
# when the resumed try is already queued or running (apache/airflow#71580, #72716; 3.3.2 guards only
# the "scheduled" case). A few seconds of latency on a resume is cheap; a failed coalesce is not.
MIN_DEFERRAL_SECONDS = 10.0
DEADLINE_MARGIN_SECONDS = 0.05


@dataclass(frozen=True)
class PollResult:
    """What one poll found: why to resume (None: keep waiting) and how long to sleep at most."""

    reason: str | None
    sleep_at_most: float | None = None


class CoalesceTrigger(BaseTrigger):
    """Decide the deferred coalesce's rows in the triggerer, and resume the task once all are decided.

    Deferred before its fork has completed (``run_id`` None), it first watches the fork task: once
    it succeeded, the fork's newest audit run is the one to wait on (and the task is not woken for
    it); when the fork ends otherwise, the task resumes to fail.

    Then every poll looks read-only (:func:`~airflow_elspeth.audit.coalesce.waiting_poll`) for
    something to write: a chunk whose inputs (deliveries, recorded task losses, whether the
    deadline passed) changed since a pass last evaluated it and that has a row to decide now
    (replayed with the pass's own :func:`~airflow_elspeth.audit.coalesce.decide_chunk`; a chunk
    found undecidable is not replayed again until its inputs change), or a branch task that ended
    still owing tokens (its loss to record). Then it runs the coalesce's pass itself (:meth:`decide`),
    so decisions are written as soon as they can be made, while the task is deferred, and branches
    skip the decided rows. It sleeps no longer than until the deadline (it keeps its own clock),
    when the pass decides every row left.

    It fires when every row is decided (``execute_complete`` runs the same pass, which finds
    nothing left, and reports), or the audit run is gone; never within ``MIN_DEFERRAL_SECONDS`` of
    starting, which only delays the task's report, not a decision.

    It holds no connection between polls. Database work runs in worker threads
    (``sync_to_async(thread_sensitive=False)``), never on the triggerer's event loop; branch task
    states come from ``RuntimeTaskInstance.get_task_states``, one task id per call (mapped tasks
    come back as ``<task_id>_<map_index>``). The audit engine is the process-wide cached one (one
    pool per audit database for every trigger in the triggerer), resolved once per trigger.

    :param spec: the coalesce's :class:`~airflow_elspeth.audit.coalesce.CoalesceSpec` as a dict.
    :param run_id: the audit run; None while the fork has not completed.
    :param dag_id: the DAG of the branch tasks whose states are watched.
    :param airflow_run_id: the DAG run of those tasks.
    :param audit_conn_id: the audit store connection (default resolution when None).
    :param poll_interval: seconds between polls.
    :param fork_task_id: the fork task (needed when ``run_id`` is None).
    """

    def __init__(
        self,
        *,
        spec: dict[str, Any],
        run_id: str | None,
        dag_id: str,
        airflow_run_id: str,
        audit_conn_id: str | None = None,
        poll_interval: float = 10.0,
        fork_task_id: str | None = None,
    ) -> None:
        if run_id is None and fork_task_id is None:
            raise ValueError("CoalesceTrigger needs the audit run_id or the fork_task_id to find it")
        super().__init__()
        self.spec = spec
        self.run_id = run_id
        self.dag_id = dag_id
        self.airflow_run_id = airflow_run_id
        self.audit_conn_id = audit_conn_id
        self.poll_interval = float(poll_interval)
        self.fork_task_id = fork_task_id
        self._engine: Engine | None = None
        self._deadline: datetime | None = None
        # chunk -> signature at which a read-only replay found nothing to decide
        self._undecidable: dict[int, str] = {}
        self._registered: set[str] = set()  # audit runs whose coalesce node this trigger registered

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
                "fork_task_id": self.fork_task_id,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        spec = CoalesceSpec.from_dict(self.spec)
        started = time.monotonic()
        started_at = datetime.now(timezone.utc)
        errors = 0
        while True:
            try:
                if self.run_id is None:
                    result = await self.wait_for_fork()
                else:
                    states = await self.task_states(spec)
                    result = await sync_to_async(self.poll, thread_sensitive=False)(spec, states)
            except Exception as err:  # any failure to poll is transient until the grace runs out
                errors += 1
                give_up_at = (self._deadline or started_at) + TRANSIENT_ERROR_GRACE
                self.log.warning(
                    "coalesce %s: poll failed (%d in a row; the task is told after %s): %s: %s",
                    spec.node_id,
                    errors,
                    give_up_at.isoformat(),
                    type(err).__name__,
                    err,
                )
                if datetime.now(timezone.utc) >= give_up_at:
                    await asyncio.sleep(max(0.0, MIN_DEFERRAL_SECONDS - (time.monotonic() - started)))
                    yield TriggerEvent(
                        self._payload("error", message=f"{type(err).__name__}: {err}", errors=errors)
                    )
                    return
                await asyncio.sleep(min(self.poll_interval * 2 ** (errors - 1), MAX_ERROR_BACKOFF_SECONDS))
                continue
            errors = 0
            if result.reason is not None:
                quiet = MIN_DEFERRAL_SECONDS - (time.monotonic() - started)
                if quiet > 0:
                    await asyncio.sleep(quiet)  # what made it ready stays true: decisions only add up
                self.log.info("coalesce %s: resuming the task (%s)", spec.node_id, result.reason)
                yield TriggerEvent(self._payload("ready", reason=result.reason))
                return
            sleep = self.poll_interval
            if result.sleep_at_most is not None:
                sleep = min(sleep, result.sleep_at_most)
            await asyncio.sleep(sleep)

    def _payload(self, status: str, **extra: Any) -> dict[str, Any]:
        """Everything the resumed task needs (``dag.test()`` drops the defer kwargs)."""
        return {
            "status": status,
            "run_id": self.run_id,
            "coalesce": self.spec["node_id"],
            "dag_id": self.dag_id,
            "airflow_run_id": self.airflow_run_id,
            **extra,
        }

    async def wait_for_fork(self) -> PollResult:
        """Before the fork completed: resume if it ended otherwise, adopt its audit run if it succeeded."""
        if self.fork_task_id is None:
            raise ValueError("wait_for_fork needs the fork task id")
        state = (await self.states_of([self.fork_task_id])).get(self.fork_task_id)
        if state == TASK_SUCCESS:
            # The fork's XCom is this try's now; its newest audit run is the one it pushed.
            found = await sync_to_async(newest_completed_run, thread_sensitive=False)(
                self.engine(), self.dag_id, self.airflow_run_id, self.fork_task_id
            )
            if found is None:
                return PollResult("fork succeeded without an audit run")
            self.log.info("fork %s completed: waiting on audit run %s", self.fork_task_id, found)
            self.run_id = found
            return PollResult(None, sleep_at_most=0)
        if state in ENDED_TASK_STATES:
            return PollResult(f"fork {self.fork_task_id} ended {state}")
        return PollResult(None)

    async def task_states(self, spec: CoalesceSpec) -> dict[str, str]:
        """States of the branch steps that deliver arrivals."""
        return await self.states_of(dict.fromkeys(spec.delivering.values()))

    async def states_of(self, task_ids: Iterable[str]) -> dict[str, str]:
        """Task states of this DAG run through the Task SDK, one task id per call."""
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        get_states = sync_to_async(RuntimeTaskInstance.get_task_states, thread_sensitive=False)
        states: dict[str, str] = {}
        for task_id in task_ids:
            found = await get_states(dag_id=self.dag_id, task_ids=[task_id], run_ids=[self.airflow_run_id])
            run_states = (found or {}).get(self.airflow_run_id, {})
            states.update({key: str(state) for key, state in run_states.items() if state is not None})
        return states

    def engine(self) -> Engine:
        """The process-wide engine of the audit store, resolved once per trigger (no migration)."""
        if self._engine is None:
            from airflow_elspeth.audit.engine import engine_for_url
            from airflow_elspeth.hooks.audit import ElspethAuditHook

            url = ElspethAuditHook(audit_conn_id=self.audit_conn_id).get_url()
            self._engine = engine_for_url(url, upgrade=False)
        return self._engine

    def poll(self, spec: CoalesceSpec, task_states: Mapping[str, str]) -> PollResult:
        """One look at the audit store (runs in a worker thread): the coalesce's read-only
        :func:`~airflow_elspeth.audit.coalesce.waiting_poll`; when it finds something to write, the
        coalesce's own pass, here; then why to resume the task (None: not yet) and how long to sleep.
        """
        if self.run_id is None:
            raise ValueError("poll needs the audit run (wait_for_fork finds it first)")
        found = waiting_poll(self.engine(), spec, self.run_id, task_states, self._undecidable)
        if found.pass_writes:
            found = self.decide(spec, self.run_id, task_states)
        if found.deadline is not None:
            self._deadline = found.deadline
        if found.reason is not None or found.deadline is None or found.now is None:
            return PollResult(found.reason)
        # Wake up at the deadline (just after it, by the clock the pass decides by) at the latest.
        remaining = (found.deadline - found.now).total_seconds()
        if remaining <= 0:
            return PollResult(None)
        return PollResult(None, sleep_at_most=max(remaining + DEADLINE_MARGIN_SECONDS, MIN_SLEEP_SECONDS))

    def decide(self, spec: CoalesceSpec, run_id: str, task_states: Mapping[str, str]) -> WaitResult:
        """Run the coalesce's pass here, so that a decision is written when it can be made, not when
        the task resumes (a branch skips a decided row only once it is written).

        The pass is the sensor's (:func:`~airflow_elspeth.audit.coalesce.coalesce_pass`): each chunk
        in one transaction ordered against the branch writers, so a triggerer killed mid-pass
        leaves whole chunks decided or none, and a second trigger instance (triggerer failover)
        finds the rows already decided and writes nothing twice (primary keys, ``ON CONFLICT DO
        NOTHING``). Resumes the task only once every row is decided.
        """
        store = AuditStore(self.engine())
        if run_id not in self._registered:  # deferred before the fork completed: the sensor did not
            store.register_node(run_id, spec.node_id, NodeType.COALESCE, None, spec.as_dict())
            self._registered.add(run_id)
        result = coalesce_pass(store, spec, run_id, task_states)
        self.log.info(
            "coalesce %s: %d/%d rows decided in the triggerer (%d now)",
            spec.node_id,
            result.rows_decided,
            result.rows_total,
            result.newly_decided,
        )
        return WaitResult("every row decided" if result.done else None, result.deadline, result.now)
