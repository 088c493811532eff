"""CoalesceTrigger: decide a deferred coalesce's rows in the triggerer; resume it once all are decided.

The triggerer imports this module on its event loop, so it imports nothing heavy: the audit layer
(SQLAlchemy, the store) is imported in the trigger's worker threads, where its blocking work runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_elspeth.core.vocabulary import ENDED_TASK_STATES, TASK_SUCCESS

if TYPE_CHECKING:
    from airflow_elspeth.audit.service import CoalesceService, CoalesceSpec

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

T = TypeVar("T")


async def off_loop(call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` in a worker thread. Everything that may block (a connection lookup through the
    Task SDK, engine creation, SQL, task states, imports) goes through here: a blocked event loop
    stalls every trigger of the triggerer, and a long one makes Airflow declare it deadlocked."""
    return await asyncio.to_thread(call, *args)


def load_spec(spec: dict[str, Any]) -> tuple[CoalesceSpec, timedelta]:
    """The coalesce's spec and the audit layer's transient-error grace (blocks: the first call imports
    the audit layer)."""
    from airflow_elspeth.audit.service import TRANSIENT_ERROR_GRACE, CoalesceSpec

    return CoalesceSpec.from_dict(spec), TRANSIENT_ERROR_GRACE


@dataclass(frozen=True)
class PollResult:
    """What one poll found: why to resume (None: keep waiting) and how long to sleep at most."""

    reason: str | None
    sleep_at_most: float | None = None


class CoalesceTrigger(BaseTrigger):
    """Decide the deferred coalesce's rows in the triggerer, and resume the task once all are decided.

    Deferred before its fork has completed (``run_id`` None), it first watches the fork task: once
    it succeeded, the fork's newest audit run is the one to wait on (and the task is not woken for
    it); when the fork ends otherwise, or has not completed by ``fork_wait_until`` (the sensor's
    ``fork_wait_timeout``, which it keeps by itself), the task resumes to fail as it would in
    reschedule mode.

    Then every poll looks read-only (:func:`~airflow_elspeth.audit.coalesce.waiting_poll`) for
    something to write: a chunk whose inputs (deliveries, recorded task losses, whether the
    deadline passed) changed since a pass last evaluated it and that has a row to decide now
    (replayed with the pass's own :func:`~airflow_elspeth.audit.coalesce.decide_chunk`; a chunk
    found undecidable is not replayed again until its inputs change), or a branch task that ended
    still owing tokens (its loss to record). Then it runs the coalesce's pass itself (both through
    :meth:`~airflow_elspeth.audit.service.CoalesceService.poll`), so decisions are written as soon
    as they can be made, while the task is deferred, and branches skip the decided rows. It sleeps
    no longer than until the deadline (it keeps its own clock), when the pass decides every row left.

    It fires when every row is decided (``execute_complete`` runs the same pass, which finds
    nothing left, and reports), or the audit run is gone; never within ``MIN_DEFERRAL_SECONDS`` of
    starting, which only delays the task's report, not a decision.

    It holds no connection between polls. Everything that may block (the audit layer's import, the
    connection lookup, the engine, task states, SQL) runs in worker threads (:func:`off_loop`),
    never on the triggerer's event loop, which every trigger of the triggerer shares; branch task
    states come from ``RuntimeTaskInstance.get_task_states``, one task id per call (mapped tasks
    come back as ``<task_id>_<map_index>``). Its way into the audit store, a
    :class:`~airflow_elspeth.audit.service.CoalesceService` on the process-wide cached engine (one
    pool per audit database for every trigger in the triggerer), is resolved once per trigger.

    :param spec: the coalesce's :class:`~airflow_elspeth.audit.model.CoalesceSpec` as a dict.
    :param run_id: the audit run; None while the fork has not completed.
    :param dag_id: the DAG of the branch tasks whose states are watched.
    :param airflow_run_id: the DAG run of those tasks.
    :param audit_conn_id: the audit store connection (default resolution when None).
    :param poll_interval: seconds between polls.
    :param fork_task_id: the fork task (needed when ``run_id`` is None).
    :param fork_wait_until: when to stop waiting for the fork to complete; None (a trigger deferred
        by a release without it): no limit of its own.
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
        fork_wait_until: datetime | None = None,
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
        self.fork_wait_until = fork_wait_until
        self._service: CoalesceService | None = None
        self._deadline: datetime | None = None
        # chunk -> signature at which a read-only replay found nothing to decide
        self._undecidable: dict[int, str] = {}

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
                "fork_wait_until": self.fork_wait_until,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        spec, error_grace = await off_loop(load_spec, self.spec)
        started = time.monotonic()
        started_at = datetime.now(timezone.utc)
        errors = 0
        while True:
            try:
                if self.run_id is None:
                    result = await self.wait_for_fork(spec)
                else:
                    states = await self.task_states(spec)
                    result = await off_loop(self.poll, spec, states)
            except Exception as err:  # any failure to poll is transient until the grace runs out
                errors += 1
                give_up_at = (self._deadline or started_at) + error_grace
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

    async def wait_for_fork(self, spec: CoalesceSpec) -> PollResult:
        """Before the fork completed: adopt its audit run if it succeeded; resume the task if it ended
        otherwise or ``fork_wait_until`` passed (sleeping no longer than until then)."""
        if self.fork_task_id is None:
            raise ValueError("wait_for_fork needs the fork task id")
        state = (await self.states_of([self.fork_task_id])).get(self.fork_task_id)
        if state == TASK_SUCCESS:
            # The fork's XCom is this try's now; its newest audit run is the one it pushed.
            found = await off_loop(self.newest_fork_run, spec)
            if found is None:
                return PollResult("fork succeeded without an audit run")
            self.log.info("fork %s completed: waiting on audit run %s", self.fork_task_id, found)
            self.run_id = found
            return PollResult(None, sleep_at_most=0)
        if state in ENDED_TASK_STATES:
            return PollResult(f"fork {self.fork_task_id} ended {state}")
        if self.fork_wait_until is None:
            return PollResult(None)
        left = (self.fork_wait_until - datetime.now(timezone.utc)).total_seconds()
        if left <= 0:
            return PollResult(
                f"fork {self.fork_task_id} has not completed by {self.fork_wait_until.isoformat()} "
                "(fork_wait_timeout)"
            )
        return PollResult(None, sleep_at_most=max(left + DEADLINE_MARGIN_SECONDS, MIN_SLEEP_SECONDS))

    async def task_states(self, spec: CoalesceSpec) -> dict[str, str]:
        """States of the branch steps that deliver arrivals."""
        return await self.states_of(dict.fromkeys(spec.delivering.values()))

    async def states_of(self, task_ids: Iterable[str]) -> dict[str, str]:
        """Task states of this DAG run through the Task SDK (in a worker thread)."""
        return await off_loop(self.task_states_now, list(task_ids))

    def task_states_now(self, task_ids: Iterable[str]) -> dict[str, str]:
        """Task states of this DAG run through the Task SDK, one task id per call (blocks: each is a
        round trip to the triggerer's supervisor)."""
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        from airflow_elspeth.coalesce_task import read_task_states

        return read_task_states(
            RuntimeTaskInstance.get_task_states, self.dag_id, self.airflow_run_id, task_ids
        )

    def newest_fork_run(self, spec: CoalesceSpec) -> str | None:
        """The newest completed audit run of the fork in this DAG run (blocks: SQL)."""
        if self.fork_task_id is None:
            raise ValueError("newest_fork_run needs the fork task id")
        return self.service(spec).newest_fork_run(self.dag_id, self.airflow_run_id, self.fork_task_id)

    def service(self, spec: CoalesceSpec) -> CoalesceService:
        """The coalesce's way into the audit store, resolved once per trigger (no migration).

        Blocks (a connection lookup through the Task SDK, perhaps the engine's creation): called
        only from the worker threads of :meth:`poll` and :meth:`newest_fork_run`.
        """
        if self._service is None:
            from airflow_elspeth.hooks.audit import ElspethAuditHook

            hook = ElspethAuditHook(audit_conn_id=self.audit_conn_id)
            self._service = hook.get_coalesce_service(spec, upgrade=False)
        return self._service

    def poll(self, spec: CoalesceSpec, task_states: Mapping[str, str]) -> PollResult:
        """One look at the audit store (runs in a worker thread): the coalesce's waiting poll, which
        runs the coalesce's pass here when it finds something to write (so a decision is written
        when it can be made, not when the task resumes: a branch skips a decided row only once it is
        written); then why to resume the task (None: not yet) and how long to sleep.

        The pass is the sensor's: each chunk in one transaction ordered against the branch writers,
        so a triggerer killed mid-pass leaves whole chunks decided or none, and a second trigger
        instance (triggerer failover) finds the rows already decided and writes nothing twice
        (primary keys, ``ON CONFLICT DO NOTHING``). Resumes the task only once every row is decided.
        """
        if self.run_id is None:
            raise ValueError("poll needs the audit run (wait_for_fork finds it first)")
        found = self.service(spec).poll(self.run_id, task_states, self._undecidable)
        if found.passed is not None:
            from airflow_elspeth import metrics

            metrics.coalesce_pass(
                found.passed, metrics.coalesce_tags(self.dag_id, spec.node_id, spec.config.policy.value)
            )
            self.log.info(
                "coalesce %s: %d/%d rows decided in the triggerer (%d now)",
                spec.node_id,
                found.passed.rows_decided,
                found.passed.rows_total,
                found.passed.newly_decided,
            )
        if found.deadline is not None:
            self._deadline = found.deadline
        if found.reason is not None or found.deadline is None or found.now is None:
            return PollResult(found.reason)
        # Wake up at the deadline (just after it, by the clock the pass decides by) at the latest.
        remaining = (found.deadline - found.now).total_seconds()
        if remaining <= 0:
            return PollResult(None)
        return PollResult(None, sleep_at_most=max(remaining + DEADLINE_MARGIN_SECONDS, MIN_SLEEP_SECONDS))
