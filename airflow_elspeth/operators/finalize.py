"""CoalesceFinalizer: the teardown that closes what a coalesce leaves open when it ends abnormally."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator, Context

from airflow_elspeth import metrics
from airflow_elspeth.coalesce_task import SUMMARY_XCOM_KEY, coalesce_spec, read_task_states
from airflow_elspeth.config_errors import in_task
from airflow_elspeth.core.vocabulary import TASK_SUCCESS, fork_task_run_reason
from airflow_elspeth.hooks.audit import ElspethAuditHook
from airflow_elspeth.operators.fork import fork_ref


class CoalesceFinalizer(BaseOperator):
    """Close every row and audit run a coalesce left open, once the coalesce has ended for good.

    Every :class:`~airflow_elspeth.sensors.coalesce.CoalesceSensor` in a DAG adds one, named
    ``<coalesce task id>_finalize``, as its teardown: Airflow runs a teardown once its upstream
    ended, whatever the way (success, failure with no retries left, killed by the scheduler or the
    OOM killer, marked failed or skipped by a person, upstream failed), and ignores it for the DAG
    run's state. It is the one mechanism that answers "the coalesce will not run again":

    * the fork ended without completing: its audit runs still ``running`` are failed with the
      fork task's state as reason (nothing half-open stays);
    * otherwise every row of the coalesce still undecided is decided by its policy if it can be,
      else failed with reason ``coalesce_task_<state>``; its tokens get their outcomes, and the
      summary is pushed to XCom ``coalesce_summary`` of this task.

    Clearing the coalesce clears its teardown too: the new try reopens the rows so resolved
    (kept in ``superseded_decisions``) and decides them afresh.

    :param coalesce_task_id: the coalesce this finalizer closes.
    :param fork_task_id: that coalesce's fork.
    :param tolerated_failures: the coalesce's (copied into the summary, as the coalesce does).
    :param tolerated_failure_rate: the coalesce's (likewise).
    :param audit_conn_id: the fork's audit store, as its coalesce resolved it (a different one is
        a structure problem: :func:`airflow_elspeth.topology.check_dag`).
    """

    ui_color = "#eeeeee"
    _elspeth_role = "finalizer"

    def __init__(
        self,
        *,
        coalesce_task_id: str,
        fork_task_id: str,
        tolerated_failures: int = 0,
        tolerated_failure_rate: float | None = None,
        audit_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("retries", 2)
        super().__init__(**kwargs)
        self.coalesce_task_id = coalesce_task_id
        self.fork_task_id = fork_task_id
        self.tolerated_failures = tolerated_failures
        self.tolerated_failure_rate = tolerated_failure_rate
        self.audit_conn_id = audit_conn_id

    def execute(self, context: Context) -> dict[str, Any] | None:
        with in_task(self):  # the audit connection's configuration names DAG and task
            return self._close(context)

    def _close(self, context: Context) -> dict[str, Any] | None:
        ti = context["ti"]
        states = read_task_states(
            ti.get_task_states, ti.dag_id, ti.run_id, [self.fork_task_id, self.coalesce_task_id]
        )
        fork_state = states.get(self.fork_task_id, "none")
        coalesce_state = states.get(self.coalesce_task_id, "none")
        hook = ElspethAuditHook(audit_conn_id=self.audit_conn_id)
        if fork_state != TASK_SUCCESS:
            closed = hook.get_store().close_stale_runs(
                ti.dag_id, ti.run_id, self.fork_task_id, reason=fork_task_run_reason(fork_state)
            )
            self.log.info(
                "fork %s ended %s: closed audit runs left running: %s",
                self.fork_task_id,
                fork_state,
                closed or "none",
            )
            return None
        # The fork's current try succeeded, so its XCom names this try's audit run.
        ref = fork_ref(ti, self.fork_task_id)
        if not ref:
            self.log.info("coalesce %s has no audit run of this fork try to close", self.coalesce_task_id)
            return None
        # The coalesce as its DAG defines it now (its task's attributes, not a call into it).
        spec = coalesce_spec(self.dag.get_task(self.coalesce_task_id))
        service = hook.get_coalesce_service(spec)
        branch_states = read_task_states(ti.get_task_states, ti.dag_id, ti.run_id, spec.delivering.values())
        finalized = service.finalize(ref["audit_run_id"], branch_states, coalesce_state)
        tags = metrics.coalesce_tags(ti.dag_id, self.coalesce_task_id, spec.config.policy.value)
        metrics.coalesce_pass(finalized.result, tags)
        summary = finalized.summary
        summary["tolerated_failures"] = self.tolerated_failures
        summary["tolerated_failure_rate"] = self.tolerated_failure_rate
        resolved = summary["rows_resolved_by_finalizer"]
        if resolved:
            self.log.warning(
                "coalesce %s ended %s with rows undecided: %d rows decided or closed now; "
                "%d merged, %d failed of %d",
                self.coalesce_task_id,
                coalesce_state,
                resolved,
                summary["rows_merged"],
                summary["rows_failed"],
                summary["rows_total"],
            )
        else:
            self.log.info(
                "coalesce %s ended %s with every row decided", self.coalesce_task_id, coalesce_state
            )
        ti.xcom_push(key=SUMMARY_XCOM_KEY, value=summary)
        return None
