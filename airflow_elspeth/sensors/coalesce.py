"""CoalesceSensor: join a fork's branches per row under a policy, with a deadline, and report."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import Asset, BaseOperator, BaseOperatorLink, BaseSensorOperator, Context, conf
from airflow.sdk.exceptions import (
    AirflowFailException,
    AirflowRescheduleException,
    AirflowSensorTimeout,
    AirflowSkipException,
    AirflowTaskTimeout,
)

from airflow_elspeth import metrics
from airflow_elspeth.audit.service import (
    TRANSIENT_ERROR_GRACE,
    TRANSIENT_ERRORS,
    CoalesceService,
    CoalesceSpec,
    failure_message,
)
from airflow_elspeth.coalesce_task import SUMMARY_XCOM_KEY, coalesce_spec, read_task_states
from airflow_elspeth.coalesce_task import output_contract as coalesce_output_contract
from airflow_elspeth.config_errors import in_task, names_task
from airflow_elspeth.core.config import ON_COLLISION_RECORD, MergeStrategy, Policy, coalesce_config
from airflow_elspeth.core.vocabulary import ENDED_TASK_STATES, TASK_SUCCESS
from airflow_elspeth.exceptions import (
    AuditStoreUnreachable,
    ElspethConfigError,
    ForkRunMissing,
)
from airflow_elspeth.hooks.audit import ElspethAuditHook
from airflow_elspeth.operators.finalize import CoalesceFinalizer
from airflow_elspeth.operators.fork import ForkOperator, fork_ref

# Re-exported: the shortest reschedule poke interval without a parse-time warning (dag_warnings).
from airflow_elspeth.topology import RESCHEDULE_RACE_POKE_SECONDS as RESCHEDULE_RACE_POKE_SECONDS
from airflow_elspeth.topology import fork_store

# The key of the summary in the extra of the Asset events of the coalesce's outlets.
ASSET_EXTRA_KEY = "elspeth_coalesce"
# Parameters of earlier releases: passing one is an error that says what replaced it.
REMOVED_PARAMETERS = {
    "on_failure": (
        "use soft_fail=True (Airflow's sensor parameter) to end the coalesce skipped instead of failed "
        "when more rows fail than tolerated; soft_fail=False, the default, fails it"
    ),
}
# Margin between our own deadline and Airflow's sensor timeout, so the framework never ends the task
# before it has written its decisions (a framework timeout writes nothing).
FRAMEWORK_TIMEOUT_MARGIN = timedelta(minutes=10)
# An audit store that cannot be reached is "not yet" until the deadline plus TRANSIENT_ERROR_GRACE;
# then the try fails and Airflow retries it (a coalesce retries by default: its passes are idempotent).
DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY = timedelta(seconds=15)
FINALIZER_SUFFIX = "_finalize"


class CoalesceAuditLink(BaseOperatorLink):
    """Extra link from a coalesce task to its decisions, inside the Airflow UI: the task instance's
    "Fork/join audit" tab (not the bare plugin page)."""

    name = "Fork/join audit"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from airflow_elspeth.plugins.elspeth import task_tab_url

        return task_tab_url(
            ti_key.dag_id, ti_key.run_id, operator.task_id, getattr(ti_key, "map_index", None)
        )


class CoalesceSensor(BaseSensorOperator):
    """Join a fork's branches per row under a policy with a deadline, and record every decision.

    Starts with the branches (``trigger_rule="always"``) and decides each row as soon as its policy
    resolves: ``require_all`` (every branch), ``quorum`` (the first ``quorum`` arrivals), ``best_effort``
    (all that arrive before every branch has arrived or been lost, or the deadline), ``first`` (the
    first arrival). The deadline is the fork's completion time plus ``timeout``; at the deadline every
    undecided row is decided. Every decision, every missing branch and why it is missing is written
    to the audit store before the task ends, and summarised in XCom ``coalesce_summary`` (also the
    return value on success).

    :param fork: the ForkOperator whose tokens are joined.
    :param policy: ``require_all``, ``quorum``, ``best_effort`` or ``first``.
    :param quorum: arrivals needed with ``policy="quorum"`` (1..number of branches).
    :param merge: ``union`` (fields overlaid in branch order, later wins, collisions recorded),
        ``nested`` (``{branch: output}``) or ``select`` (the output of ``select_branch`` only).
    :param select_branch: the branch whose output ``merge="select"`` keeps (never substituted).
    :param on_collision: what ``merge="union"`` does with a field several consumed branches supplied
        (possible where contracts do not rule it out: branches without ``output_fields``):
        ``"record"`` (default: the later-configured branch wins, the collision is recorded),
        ``"fail_row"`` (the row fails ``field_collision``, its arrivals end ``row_failed``) or
        ``"prefer:<branch>"`` (that branch, one of the coalesce's, wins; recorded too).
    :param timeout: the per-row deadline: how long after the fork completed a row may stay undecided;
        at ``fork completion + timeout`` every undecided row is decided by its policy (finite).
        Not ``BaseSensorOperator.timeout``: that one counts from the sensor's first poke and ends the
        task without writing anything, so the sensor sets it itself to ``fork_wait_timeout + timeout``
        plus a 10-minute margin (it never fires before our deadline has decided every row).
    :param branches: the branches to join; default all of the fork's.
    :param tolerated_failures: failed rows allowed before the task fails (default 0).
    :param tolerated_failure_rate: fraction of failed rows allowed before the task fails.
    :param soft_fail: Airflow's meaning: end skipped instead of failed. When failed rows exceed the
        tolerance the task fails (``AirflowFailException``, no retry: the decisions are final) or,
        with ``soft_fail=True``, is skipped; either way every decision is recorded first and the
        summary pushed. The sensor's own failures that Airflow's sensors soft-fail (the fork ended
        without an audit run, an invalid structure, Airflow's sensor timeout) skip it too, in every
        mode; its finalizer then closes the rows left open as ``coalesce_task_skipped``. An
        unreachable audit store still fails the try, so that Airflow retries it.
    :param fork_wait_timeout: how long the sensor may wait for the fork to complete, counted as
        Airflow's sensor timeout is (from the first poke of the try, across its reschedules and
        deferrals): a fork not complete by then ends the coalesce with ``AirflowSensorTimeout`` (no
        retry; skipped with ``soft_fail``), in every mode; its finalizer closes what the fork writes
        later. Airflow's own sensor timeout is ``fork_wait_timeout + timeout`` plus a margin, so it
        never fires first.
    :param deferrable: wait in the triggerer instead of a worker slot; default
        ``[operators] default_deferrable``. The deferral carries what is left of Airflow's sensor
        timeout, so a triggerer that never runs the trigger cannot leave it deferred for ever.
    :param audit_conn_id: leave unset: the coalesce, its trigger and its finalizer use the fork's
        audit store (the fork's ``audit_conn_id``, or the default store when the fork names none).
        Naming another one is an error at DAG parse time (``TopologyError``, naming both tasks and
        both connection ids).
    """

    ui_color = "#f7e8d4"
    _elspeth_role = "coalesce"
    operator_extra_links = (CoalesceAuditLink(),)

    @names_task
    def __init__(
        self,
        *,
        fork: ForkOperator,
        policy: Policy | str,
        quorum: int | None = None,
        merge: MergeStrategy | str = MergeStrategy.UNION,
        select_branch: str | None = None,
        on_collision: str = ON_COLLISION_RECORD,
        timeout: timedelta | float = timedelta(hours=1),
        branches: Sequence[str] | None = None,
        tolerated_failures: int = 0,
        tolerated_failure_rate: float | None = None,
        soft_fail: bool = False,
        fork_wait_timeout: timedelta = timedelta(hours=6),
        deferrable: bool | None = None,
        audit_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(fork, ForkOperator):
            raise ElspethConfigError(f"fork must be a ForkOperator, got {type(fork).__name__}")
        for name, instead in REMOVED_PARAMETERS.items():
            if name in kwargs:
                raise ElspethConfigError(f"{name} was removed (got {name}={kwargs[name]!r}): {instead}")
        config = coalesce_config(
            branches=list(branches) if branches is not None else fork.branches,
            fork_branches=fork.branches,
            policy=policy,
            quorum=quorum,
            merge=merge,
            select_branch=select_branch,
            on_collision=on_collision,
            timeout=timeout,
        )
        if (
            isinstance(tolerated_failures, bool)
            or not isinstance(tolerated_failures, int)
            or tolerated_failures < 0
        ):
            raise ElspethConfigError(
                f"tolerated_failures must be an integer >= 0, got {tolerated_failures!r}"
            )
        if tolerated_failure_rate is not None and not (
            isinstance(tolerated_failure_rate, (int, float)) and 0 <= tolerated_failure_rate <= 1
        ):
            raise ElspethConfigError(
                f"tolerated_failure_rate must be in [0, 1], got {tolerated_failure_rate!r}"
            )
        if not isinstance(fork_wait_timeout, timedelta) or fork_wait_timeout < timedelta(0):
            raise ElspethConfigError(f"fork_wait_timeout must be a timedelta >= 0, got {fork_wait_timeout!r}")
        try:
            framework_timeout = fork_wait_timeout + config.timeout + FRAMEWORK_TIMEOUT_MARGIN
            datetime.now(timezone.utc) + framework_timeout  # a deadline must be a date
        except OverflowError as err:
            raise ElspethConfigError(
                f"timeout + fork_wait_timeout overflow a date, got timeout={timeout!r}, "
                f"fork_wait_timeout={fork_wait_timeout!r}"
            ) from err
        kwargs.setdefault("trigger_rule", "always")
        kwargs.setdefault("mode", "reschedule")
        kwargs.setdefault("poke_interval", 10)
        kwargs.setdefault("retries", DEFAULT_RETRIES)
        kwargs.setdefault("retry_delay", DEFAULT_RETRY_DELAY)
        task_id = kwargs.get("task_id")
        super().__init__(timeout=framework_timeout, soft_fail=soft_fail, **kwargs)
        self.fork_task_id = fork.task_id
        self.fork_wait_timeout = fork_wait_timeout
        self.coalesce = config
        self.tolerated_failures = tolerated_failures
        self.tolerated_failure_rate = tolerated_failure_rate
        # This try's summary (for OpenLineage, read in the same process after the task ended).
        self._reported_summary: dict[str, Any] | None = None
        self.deferrable = (
            deferrable
            if deferrable is not None
            else conf.getboolean("operators", "default_deferrable", fallback=False)
        )
        self.audit_conn_id = fork_store(self, audit_conn_id, fork)  # its trigger and finalizer's too
        self.finalizer = self._add_finalizer(str(task_id), fork) if self.has_dag() else None

    def _add_finalizer(self, task_id: str, fork: ForkOperator) -> BaseOperator:
        """The teardown that closes what this coalesce leaves open once it has ended, whatever the way.

        Downstream of the fork too: it runs once both ended, so it never closes a fork still working.
        """
        finalizer = CoalesceFinalizer(
            task_id=task_id + FINALIZER_SUFFIX,
            coalesce_task_id=self.task_id,
            fork_task_id=self.fork_task_id,
            tolerated_failures=self.tolerated_failures,
            tolerated_failure_rate=self.tolerated_failure_rate,
            audit_conn_id=self.audit_conn_id,
            dag=self.dag,
            task_group=self.task_group,
        )
        self >> finalizer
        if fork.has_dag() and fork.dag is self.dag:  # else the structure check names the stray fork
            fork >> finalizer
        finalizer.as_teardown()
        return finalizer

    # -- what the coalesce joins ----------------------------------------------------------------

    def spec(self) -> CoalesceSpec:
        """Each branch's delivering step: the BranchOperator of this fork directly upstream
        (:func:`airflow_elspeth.coalesce_task.coalesce_spec`).

        The DAG's structure is checked at parse time (:func:`airflow_elspeth.topology.check_dag`);
        a DAG that bypassed that check still fails here, naming the problem.
        """
        try:
            with in_task(self):
                return coalesce_spec(self)
        except ElspethConfigError as err:  # TopologyError, or a mapped step's invalid output_fields
            raise AirflowFailException(str(err)) from err

    def output_contract(self) -> dict[str, Any] | None:
        """The contract of the rows this coalesce merges, for downstream tasks (also in the summary):
        see :func:`airflow_elspeth.coalesce_task.output_contract`. A field is certain to be in a
        merged row only when every branch was consumed and none is untyped (an untyped branch may
        supply any field).

        :raises TopologyError: the branches declare one field with different types (the cluster
            policy refuses such a DAG at parse time; this is for a DAG that bypassed it).
        """
        return coalesce_output_contract(self)

    def service(self) -> CoalesceService:
        """This coalesce's way into its fork's audit store."""
        spec = self.spec()
        with in_task(self):  # the audit connection's configuration names DAG and task
            return ElspethAuditHook(audit_conn_id=self.audit_conn_id).get_coalesce_service(spec)

    def _fork_ref(self, context: Context) -> dict[str, Any] | None:
        """The fork's audit run, or None while the fork has not completed (fails if it never will)."""
        ref = fork_ref(context["ti"], self.fork_task_id)
        if ref:
            return ref
        state = self._task_states(context, [self.fork_task_id]).get(self.fork_task_id)
        if state in ENDED_TASK_STATES:
            raise AirflowFailException(
                f"{self.task_id}: fork {self.fork_task_id!r} ended {state} without an audit run; "
                "nothing to coalesce"
            )
        return None

    @staticmethod
    def _task_states(context: Context, task_ids: Sequence[str]) -> dict[str, str]:
        """Task states of this DAG run through the Task SDK (mapped keys are ``task_id_<i>``)."""
        ti = context["ti"]
        return read_task_states(ti.get_task_states, ti.dag_id, ti.run_id, task_ids)

    # -- deciding ---------------------------------------------------------------------------------

    def decide(self, context: Context, run_id: str) -> bool:
        """One coalesce pass: decide what can be decided now; True when every row is decided.

        A try that starts after the coalesce had ended (a person cleared it) first reopens the rows
        that end resolved, so they are decided afresh.
        """
        service = self.service()
        states = self._task_states(context, list(service.spec.delivering.values()))
        decided = service.decide(run_id, states, reopen_before=_try_start(context))
        metrics.coalesce_pass(
            decided.result,
            metrics.coalesce_tags(context["ti"].dag_id, self.task_id, self.coalesce.policy.value),
            reopened=decided.reopened,
        )
        if decided.reopened:
            self.log.info(
                "%s: reopened %d rows resolved when an earlier try ended", self.task_id, decided.reopened
            )
        result = decided.result
        self.log.info(
            "%s: %d/%d rows decided (deadline %s)",
            self.task_id,
            result.rows_decided,
            result.rows_total,
            result.deadline.isoformat(),
        )
        return result.done

    def _decide_or_wait(self, context: Context, ref: dict[str, Any]) -> bool:
        """:meth:`decide`, with an unreachable audit store read as "not yet" until the deadline."""
        try:
            return self.decide(context, ref["audit_run_id"])
        except TRANSIENT_ERRORS as err:
            give_up_at = _transient_horizon(self.coalesce.timeout, context)
            if datetime.now(timezone.utc) >= give_up_at:
                raise AuditStoreUnreachable(
                    f"{self.task_id}: the audit store is still unreachable "
                    f"({type(err).__name__}: {err}); failing this try so that Airflow retries it"
                ) from err
            self.log.warning(
                "%s: the audit store is unreachable (%s: %s); not deciding yet, trying again "
                "(this try fails after %s)",
                self.task_id,
                type(err).__name__,
                err,
                give_up_at.isoformat(),
            )
            return False

    def poke(self, context: Context) -> bool:
        # The current try's audit run only: after a clear, the fork's XCom names the old one until
        # the fork has run again.
        ref = self._current_fork_ref(context)
        if ref is None:
            self._end_if_fork_wait_over(_waiting_since(context))
            return False
        return self._decide_or_wait(context, ref)

    def _end_if_fork_wait_over(self, since: datetime) -> None:
        """Raise ``AirflowSensorTimeout`` once ``fork_wait_timeout`` has passed since ``since`` (the fork
        has not completed: the caller found no audit run of its current try)."""
        if datetime.now(timezone.utc) < since + self.fork_wait_timeout:
            return
        raise AirflowSensorTimeout(
            f"{self.task_id}: fork {self.fork_task_id!r} did not complete within fork_wait_timeout "
            f"({self.fork_wait_timeout}) of the coalesce's first poke at {since.isoformat()}; "
            "nothing to coalesce"
        )

    def _sensor_timeout_left(self, since: datetime) -> timedelta:
        """What is left of Airflow's sensor timeout (``self.timeout``) since ``since``; past it, the
        ``AirflowSensorTimeout`` Airflow's own sensor loop raises in the other modes."""
        waited = datetime.now(timezone.utc) - since
        left = timedelta(seconds=self.timeout) - waited
        if left <= timedelta(0):
            raise AirflowSensorTimeout(
                f"Sensor has timed out; run duration of {waited.total_seconds()} seconds exceeds "
                f"the specified timeout of {self.timeout}."
            )
        return left

    def execute(self, context: Context) -> Any:
        if self.deferrable:
            # BaseSensorOperator soft-fails these when poke raises them, and when a resumed deferral
            # raises any AirflowException (resume_execution); this first pass runs outside both.
            try:
                return self._defer_or_finish(context)
            except (AirflowSensorTimeout, AirflowTaskTimeout, AirflowFailException) as err:
                if self._skips_on_failure():
                    raise AirflowSkipException(f"{err} {self._skip_note()}") from err
                raise
        super().execute(context)
        return self.report(context)

    # -- deferrable ---------------------------------------------------------------------------------

    def _defer_or_finish(self, context: Context) -> Any:
        """Decide what can be decided now; finish, or wait for more without holding a worker slot.

        Waits in the triggerer (:class:`~airflow_elspeth.triggers.coalesce.CoalesceTrigger`), which
        runs this same pass whenever it has something to decide (so rows are decided, and branches
        skip them, while the task is deferred) and wakes the task once every row is decided;
        deferred before the fork completed, the trigger finds the fork's audit run itself, and
        resumes the task at ``fork_wait_timeout`` if the fork has not completed by then (this pass
        then ends the task as a poke would). The deferral's timeout is what is left of Airflow's
        sensor timeout: the backstop if the trigger never runs (no triggerer), ended by Airflow as
        a sensor timeout. Under ``dag.test()`` a trigger runs inline and would block the very
        branches it waits for, so the task reschedules itself instead (freeing its slot too).
        """
        since = _waiting_since(context)
        ref = self._current_fork_ref(context)
        if ref is None:
            self._end_if_fork_wait_over(since)
        elif self._decide_or_wait(context, ref):
            return self.report(context)
        if _triggers_run_inline(context):
            raise AirflowRescheduleException(_reschedule_date(self.poke_interval))
        from airflow_elspeth.triggers.coalesce import CoalesceTrigger

        ti = context["ti"]
        self.defer(
            trigger=CoalesceTrigger(
                spec=self.spec().as_dict(),
                run_id=ref["audit_run_id"] if ref is not None else None,
                dag_id=ti.dag_id,
                airflow_run_id=ti.run_id,
                audit_conn_id=self.audit_conn_id,
                poll_interval=float(self.poke_interval),
                fork_task_id=self.fork_task_id,
                fork_wait_until=since + self.fork_wait_timeout,
            ),
            method_name="execute_complete",
            timeout=self._sensor_timeout_left(since),
        )
        return None

    def _current_fork_ref(self, context: Context) -> dict[str, Any] | None:
        """The fork's audit run, if it is this fork try's.

        Airflow deletes a task's XComs only when the task starts again, so after a DAG run is
        cleared (a backfill reprocessing a failed date, a manual clear) the fork's XCom still names
        the previous try's audit run until the fork has run again: trusted only once the fork's
        current try succeeded.
        """
        ref = self._fork_ref(context)
        if ref is None:
            return None
        state = self._task_states(context, [self.fork_task_id]).get(self.fork_task_id)
        if state != TASK_SUCCESS:
            self.log.info(
                "%s: fork %r is %s; its XCom (audit run %s) is from an earlier try, waiting for it",
                self.task_id,
                self.fork_task_id,
                state,
                ref.get("audit_run_id"),
            )
            return None
        return ref

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        """Resume from the trigger: run the same pass as the other modes; maybe defer again.

        The trigger has written the decisions already; this pass finds them (and decides what the
        trigger could not have seen, e.g. after the fork's audit run changed), then reports. The
        event carries the audit run and the reason it fired. When the trigger gave up polling
        (the audit store or the Task SDK unreachable from the triggerer), one pass runs here: it
        finishes when it can; otherwise the task fails with the trigger's error (a retry resumes
        from what is recorded: the decisions made so far stay).
        """
        event = event or {}
        self.log.info(
            "%s: resumed by the trigger (%s) for audit run %s",
            self.task_id,
            event.get("reason") or event.get("status"),
            event.get("run_id"),
        )
        if event.get("status") == "error":
            ref = self._current_fork_ref(context)
            if ref is not None and self.decide(context, ref["audit_run_id"]):
                return self.report(context)
            raise AuditStoreUnreachable(
                f"{self.task_id}: the coalesce trigger could not poll the audit store "
                f"({event.get('message')}); check that the triggerer reaches the audit connection"
            )
        return self._defer_or_finish(context)

    # -- reporting ----------------------------------------------------------------------------------

    def report(self, context: Context) -> dict[str, Any]:
        """Push ``coalesce_summary``; fail (skip with ``soft_fail``) when failed rows exceed the tolerance."""
        ti = context["ti"]
        ref = self._fork_ref(context)
        if ref is None:
            raise ForkRunMissing(f"{self.task_id}: report needs the fork's audit run")
        summary = self.service().summary(ref["audit_run_id"])
        summary["tolerated_failures"] = self.tolerated_failures
        summary["tolerated_failure_rate"] = self.tolerated_failure_rate
        ti.xcom_push(key=SUMMARY_XCOM_KEY, value=summary)
        self._reported_summary = summary
        self._attach_to_asset_events(context, summary)
        if not self.within_tolerance(summary):
            message = failure_message(summary)
            if self._skips_on_failure():
                raise AirflowSkipException(f"{message} {self._skip_note()}")
            raise AirflowFailException(message)
        return summary

    def _attach_to_asset_events(self, context: Context, summary: dict[str, Any]) -> None:
        """Every Asset event of this task's ``outlets`` carries the summary (extra key
        ``elspeth_coalesce``), so an asset-scheduled DAG downstream reads what merged and what failed
        (``read_merged_rows(event.extra["elspeth_coalesce"])``). Airflow emits them on success only."""
        outlet_events = context.get("outlet_events")
        if outlet_events is None:
            return
        for outlet in self.outlets:
            if isinstance(outlet, Asset):
                outlet_events[outlet].extra[ASSET_EXTRA_KEY] = summary

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage run facet ``elspeth_coalesce``: the decision counts, failure reasons and missing
        branches of this try's summary (airflow_elspeth/openlineage_facets.py)."""
        from airflow_elspeth.openlineage_facets import coalesce_lineage

        return coalesce_lineage(self._reported_summary)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """The same facet when the task failed on its tolerance (the summary is pushed first)."""
        return self.get_openlineage_facets_on_complete(task_instance)

    def _skips_on_failure(self) -> bool:
        """Airflow's soft_fail (or never_fail): end skipped where the sensor would fail."""
        return bool(self.soft_fail or self.never_fail)

    def _skip_note(self) -> str:
        return f"Skipped instead of failed ({'soft_fail' if self.soft_fail else 'never_fail'}=True)."

    def within_tolerance(self, summary: dict[str, Any]) -> bool:
        failed, total = summary["rows_failed"], summary["rows_total"]
        if failed <= self.tolerated_failures:
            return True
        return (
            self.tolerated_failure_rate is not None
            and total > 0
            and failed / total <= self.tolerated_failure_rate
        )


def _try_start(context: Context) -> datetime:
    """When this run of the task started (Airflow's record of it, else now)."""
    started: datetime | None = context["ti"].start_date
    return started or datetime.now(timezone.utc)


def _waiting_since(context: Context) -> datetime:
    """Since when this coalesce waits, as Airflow's sensor timeout counts it: its first reschedule
    (reschedule mode, and deferrable under ``dag.test()``), else this try's start (which Airflow
    keeps across deferrals)."""
    first_reschedule: datetime | None = context["ti"].get_first_reschedule_date(context)
    return first_reschedule or _try_start(context)


def _transient_horizon(timeout: timedelta, context: Context) -> datetime:
    """Until when an unreachable audit store is "not yet": about the deadline, plus a grace.

    Counted from this try's start: a coalesce starts with its branches, after the fork completed.
    """
    return _try_start(context) + timeout + TRANSIENT_ERROR_GRACE


def _triggers_run_inline(context: Context) -> bool:
    """``dag.test()`` runs triggers inline, blocking every other task until they fire."""
    return getattr(context["dag_run"], "triggering_user_name", None) == "dag_test"


def _reschedule_date(poke_interval: float) -> Any:
    from airflow.sdk import timezone

    return timezone.utcnow() + timedelta(seconds=float(poke_interval))
