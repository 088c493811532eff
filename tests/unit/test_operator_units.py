"""Operator unit tests in the style of apache-airflow-providers-standard's: each operator built in a
DAG, ``execute`` called directly with a minimal fake context (no scheduler, no metadata DB), and
what it raises or returns asserted - deferral (``TaskDeferred`` and the trigger it carries), the
reschedule under ``dag.test()``, failing or skipping on the tolerance, and the parse-time errors.
Where a test needs an audit store it is a fresh SQLite file, reached through the default audit
connection as in a task.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import (
    AirflowFailException,
    AirflowRescheduleException,
    AirflowSensorTimeout,
    AirflowSkipException,
    TaskDeferred,
)

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator
from airflow_elspeth.audit import ids
from airflow_elspeth.audit.model import run_number
from airflow_elspeth.audit.store import (
    COMPLETED,
    AuditStore,
    NodeResult,
)
from airflow_elspeth.core.canonical import hash_value
from airflow_elspeth.exceptions import AuditStoreUnreachable, ElspethConfigError
from airflow_elspeth.operators.fork import AUDIT_RUN_XCOM_KEY
from airflow_elspeth.sensors.coalesce import FRAMEWORK_TIMEOUT_MARGIN, SUMMARY_XCOM_KEY
from airflow_elspeth.triggers.coalesce import CoalesceTrigger

from .support import completed_fork as fork_written

DAG_ID, AIRFLOW_RUN = "unit_dag", "manual__unit"
BRANCHES = ["a", "b"]
ROWS = 3


def _identity(row: dict[str, Any]) -> dict[str, Any]:
    return row


class FakeTI:
    """The slice of ``RuntimeTaskInstance`` the operators use: XComs in a dict, task states given."""

    def __init__(self, states: dict[str, str] | None = None, xcoms: dict[tuple[str, str], Any] | None = None):
        self.dag_id = DAG_ID
        self.run_id = AIRFLOW_RUN
        self.try_number = 1
        self.start_date = datetime.now(timezone.utc)
        self.states = dict(states or {})
        self.xcoms: dict[tuple[str, str], Any] = dict(xcoms or {})
        self.state_calls: list[list[str]] = []

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        return self.xcoms.get((task_ids, key))

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[("coalesce", key)] = value

    def get_task_states(self, dag_id: str, task_ids: list[str], run_ids: list[str]) -> dict[str, Any]:
        assert dag_id == DAG_ID and run_ids == [AIRFLOW_RUN]
        self.state_calls.append(list(task_ids))
        return {AIRFLOW_RUN: {t: self.states[t] for t in task_ids if t in self.states}}

    def get_first_reschedule_date(self, context: Any) -> None:
        return None


class FakeDagRun:
    def __init__(self, triggering_user_name: str | None = None) -> None:
        self.triggering_user_name = triggering_user_name
        self.clear_number = 0
        self.run_type = "manual"


def context(ti: FakeTI, *, dag_test: bool = False) -> dict[str, Any]:
    return {"ti": ti, "dag_run": FakeDagRun("dag_test" if dag_test else None), "logical_date": None}


def build(**coalesce: Any) -> tuple[ForkOperator, CoalesceSensor]:
    params: dict[str, Any] = {"policy": "require_all", "timeout": 60, "poke_interval": 5}
    params.update(coalesce)
    with DAG(DAG_ID, schedule=None, start_date=datetime(2026, 1, 1)):
        fork = ForkOperator(task_id="fork", rows=[{"id": "r0"}], branches=BRANCHES, row_key="id")
        steps = [
            BranchOperator(task_id=f"ask_{b}", fork=fork, branch=b, python_callable=_identity)
            for b in BRANCHES
        ]
        sensor = CoalesceSensor(task_id="coalesce", fork=fork, **params)
        fork >> steps >> sensor
    return fork, sensor


# -- an audit store with a completed fork ------------------------------------------------------------


def completed_fork(store: AuditStore) -> str:
    return fork_written(store, dag_id=DAG_ID, airflow_run_id=AIRFLOW_RUN, branches=BRANCHES, rows=ROWS)


def deliver(store: AuditStore, run_id: str, branch: str) -> None:
    now = datetime.now(timezone.utc)
    with store.engine.connect() as conn:
        run_no = run_number(conn, run_id)
    results = []
    for index in range(ROWS):
        row_id = ids.row_id(run_no, index)  # row r<index> is the fork's input row <index>
        digest, body = hash_value({branch: index}, what="output")
        results.append(
            NodeResult(
                token_id=ids.branch_token_id(row_id, branch),
                row_id=row_id,
                chunk=0,
                status=COMPLETED,
                started_at=now,
                completed_at=now,
                output_hash=digest,
                output_body=body,
            )
        )
    store.write_branch_results(run_id, f"ask_{branch}", 1, results, chunk_tokens={0: ROWS})


def fork_xcom(run_id: str) -> dict[tuple[str, str], Any]:
    return {("fork", AUDIT_RUN_XCOM_KEY): {"audit_run_id": run_id, "fork": "fork", "branches": BRANCHES}}


# -- CoalesceSensor: deferrable ----------------------------------------------------------------------


def test_deferrable_before_the_fork_completed_defers_to_the_coalesce_trigger() -> None:
    _, sensor = build(deferrable=True)
    ti = FakeTI(states={"fork": "running"})

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context(ti))

    assert deferred.value.method_name == "execute_complete"
    trigger = deferred.value.trigger
    assert isinstance(trigger, CoalesceTrigger)
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_elspeth.triggers.coalesce.CoalesceTrigger"
    assert kwargs["run_id"] is None  # the trigger finds the fork's audit run itself
    assert kwargs["fork_task_id"] == "fork"
    assert (kwargs["dag_id"], kwargs["airflow_run_id"]) == (DAG_ID, AIRFLOW_RUN)
    assert kwargs["poll_interval"] == 5.0
    assert kwargs["spec"] == sensor.spec().as_dict()
    assert ti.state_calls == [["fork"]]
    assert ("coalesce", SUMMARY_XCOM_KEY) not in ti.xcoms


def test_the_trigger_of_a_deferred_coalesce_reads_its_forks_audit_store() -> None:
    """The coalesce names no store: its trigger gets the fork's (as its finalizer does)."""
    with DAG("unit_store_dag", schedule=None, start_date=datetime(2026, 1, 1)):
        fork = ForkOperator(
            task_id="fork", rows=[{"id": "r0"}], branches=BRANCHES, row_key="id", audit_conn_id="fork_store"
        )
        steps = [
            BranchOperator(task_id=f"ask_{b}", fork=fork, branch=b, python_callable=_identity)
            for b in BRANCHES
        ]
        sensor = CoalesceSensor(
            task_id="coalesce", fork=fork, policy="require_all", timeout=60, deferrable=True
        )
        fork >> steps >> sensor

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context(FakeTI(states={"fork": "running"})))

    assert deferred.value.trigger.serialize()[1]["audit_conn_id"] == "fork_store"


def test_deferrable_with_a_stale_fork_xcom_defers_without_that_audit_run() -> None:
    """After a clear the fork's XCom names the previous try's audit run until the fork succeeded."""
    _, sensor = build(deferrable=True)
    ti = FakeTI(states={"fork": "up_for_retry"}, xcoms=fork_xcom("stale-run"))

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context(ti))

    assert deferred.value.trigger.serialize()[1]["run_id"] is None


def test_deferrable_under_dag_test_reschedules_instead_of_deferring() -> None:
    _, sensor = build(deferrable=True, poke_interval=7)
    ti = FakeTI(states={"fork": "queued"})
    before = datetime.now(timezone.utc)

    with pytest.raises(AirflowRescheduleException) as rescheduled:
        sensor.execute(context(ti, dag_test=True))

    after = datetime.now(timezone.utc)
    assert before + timedelta(seconds=7) <= rescheduled.value.reschedule_date <= after + timedelta(seconds=7)


def test_deferrable_with_rows_undecided_defers_on_the_forks_audit_run(store: AuditStore) -> None:
    _, sensor = build(deferrable=True)
    run_id = completed_fork(store)
    deliver(store, run_id, "a")
    ti = FakeTI(states={"fork": "success", "ask_a": "success", "ask_b": "running"}, xcoms=fork_xcom(run_id))

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context(ti))

    assert deferred.value.trigger.serialize()[1]["run_id"] == run_id
    # the pass before deferring read the delivering steps' states
    assert ["ask_a"] in ti.state_calls and ["ask_b"] in ti.state_calls


def test_deferrable_with_every_row_decided_returns_the_summary_without_deferring(store: AuditStore) -> None:
    _, sensor = build(deferrable=True)
    run_id = completed_fork(store)
    for branch in BRANCHES:
        deliver(store, run_id, branch)
    ti = FakeTI(states={"fork": "success", "ask_a": "success", "ask_b": "success"}, xcoms=fork_xcom(run_id))

    summary = sensor.execute(context(ti))

    assert summary["audit_run_id"] == run_id
    assert (summary["rows_total"], summary["rows_merged"], summary["rows_failed"]) == (ROWS, ROWS, 0)
    assert ti.xcoms[("coalesce", SUMMARY_XCOM_KEY)] == summary


def test_resumed_with_a_trigger_error_and_no_current_fork_fails_naming_the_trigger() -> None:
    _, sensor = build(deferrable=True)
    ti = FakeTI(states={"fork": "running"})

    with pytest.raises(AuditStoreUnreachable, match=r"could not poll the audit store \(connection refused\)"):
        sensor.execute_complete(context(ti), {"status": "error", "message": "connection refused"})


def test_resumed_by_an_ordinary_event_defers_again_while_rows_are_open() -> None:
    _, sensor = build(deferrable=True)
    ti = FakeTI(states={"fork": "running"})

    with pytest.raises(TaskDeferred):
        sensor.execute_complete(context(ti), {"status": "progress", "reason": "quorum_reached"})


def test_the_deferral_carries_the_fork_wait_and_what_is_left_of_airflows_sensor_timeout() -> None:
    _, sensor = build(deferrable=True, timeout=60, fork_wait_timeout=timedelta(hours=2))
    ti = FakeTI(states={"fork": "running"})
    ti.start_date = datetime.now(timezone.utc) - timedelta(hours=1)  # deferred an hour ago, resumed

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute_complete(context(ti), {"status": "ready", "reason": "fork fork ended success"})

    # the trigger ends the wait for the fork itself, at the sensor's fork_wait_timeout
    assert deferred.value.trigger.serialize()[1]["fork_wait_until"] == ti.start_date + timedelta(hours=2)
    # Airflow's deferral timeout is the backstop: the sensor timeout, counted from the same start
    left = timedelta(hours=2, seconds=60) + FRAMEWORK_TIMEOUT_MARGIN - timedelta(hours=1)
    assert deferred.value.timeout is not None
    assert left - timedelta(seconds=30) < deferred.value.timeout <= left


MODES = ["reschedule", "deferrable", "resumed"]


def _wait_in(mode: str, sensor: CoalesceSensor, ti: FakeTI) -> Any:
    """One look of the coalesce in ``mode``: a reschedule-mode poke, the deferrable first pass, or the
    deferrable task resumed by its trigger (through Airflow's ``resume_execution``)."""
    if mode == "resumed":
        event = {"status": "ready", "reason": "fork fork has not completed by ... (fork_wait_timeout)"}
        return sensor.resume_execution("execute_complete", {"event": event}, context(ti))
    return sensor.execute(context(ti))


@pytest.mark.parametrize("mode", MODES)
def test_a_fork_not_complete_within_fork_wait_timeout_ends_the_coalesce_in_every_mode(mode: str) -> None:
    _, sensor = build(deferrable=mode != "reschedule", fork_wait_timeout=timedelta(minutes=5))
    ti = FakeTI(states={"fork": "running"})
    ti.start_date = datetime.now(timezone.utc) - timedelta(minutes=5, seconds=1)

    with pytest.raises(AirflowSensorTimeout) as timed_out:
        _wait_in(mode, sensor, ti)

    assert "fork 'fork' did not complete within fork_wait_timeout (0:05:00)" in str(timed_out.value)
    assert ("coalesce", SUMMARY_XCOM_KEY) not in ti.xcoms


@pytest.mark.parametrize("mode", MODES)
def test_with_soft_fail_a_fork_not_complete_within_fork_wait_timeout_skips_the_coalesce(mode: str) -> None:
    _, sensor = build(deferrable=mode != "reschedule", soft_fail=True, fork_wait_timeout=timedelta(0))
    ti = FakeTI(states={"fork": "queued"})

    with pytest.raises(AirflowSkipException) as skipped:
        _wait_in(mode, sensor, ti)

    said = f"{skipped.value} {skipped.value.__cause__}"
    assert "did not complete within fork_wait_timeout" in said, said


@pytest.mark.parametrize("mode", MODES)
def test_before_fork_wait_timeout_the_coalesce_keeps_waiting(mode: str) -> None:
    _, sensor = build(deferrable=mode != "reschedule", fork_wait_timeout=timedelta(minutes=5))
    ti = FakeTI(states={"fork": "running"})
    ti.start_date = datetime.now(timezone.utc) - timedelta(minutes=4)

    with pytest.raises(TaskDeferred if mode != "reschedule" else AirflowRescheduleException):
        _wait_in(mode, sensor, ti)


@pytest.mark.parametrize(
    ("soft_fail", "raised"), [(False, AirflowSensorTimeout), (True, AirflowSkipException)]
)
def test_a_deferral_airflow_timed_out_ends_as_a_sensor_timeout(
    soft_fail: bool, raised: type[BaseException]
) -> None:
    """The backstop (the trigger never ran, e.g. no triggerer): Airflow resumes the task with
    ``__fail__`` and the trigger timeout; it ends as a reschedule-mode sensor's timeout does."""
    from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR, TriggerFailureReason

    _, sensor = build(deferrable=True, soft_fail=soft_fail)

    with pytest.raises(raised):
        sensor.resume_execution(
            TRIGGER_FAIL_REPR, {"error": TriggerFailureReason.TRIGGER_TIMEOUT}, context(FakeTI())
        )


def test_a_deferral_past_airflows_sensor_timeout_ends_as_the_sensor_loop_would(store: AuditStore) -> None:
    """Rows still open once Airflow's own sensor timeout has passed (the fork completed late): the
    task is not deferred again, it times out as a reschedule-mode sensor does."""
    _, sensor = build(deferrable=True, timeout=60, fork_wait_timeout=timedelta(minutes=5))
    run_id = completed_fork(store)
    ti = FakeTI(states={"fork": "success", "ask_a": "running", "ask_b": "running"}, xcoms=fork_xcom(run_id))
    ti.start_date = datetime.now(timezone.utc) - timedelta(minutes=16)

    with pytest.raises(AirflowSensorTimeout, match="Sensor has timed out; run duration of"):
        sensor.execute_complete(context(ti), {"status": "ready", "reason": "every row decided"})


def test_deferrable_defaults_to_operators_default_deferrable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "True")
    assert build()[1].deferrable is True
    assert build(deferrable=False)[1].deferrable is False
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "False")
    assert build()[1].deferrable is False


# -- CoalesceSensor: reschedule mode -----------------------------------------------------------------


def test_reschedule_mode_before_the_fork_completed_reschedules_after_poke_interval() -> None:
    _, sensor = build(poke_interval=30)
    assert (sensor.mode, sensor.deferrable) == ("reschedule", False)
    ti = FakeTI(states={"fork": "running"})
    before = datetime.now(timezone.utc)

    with pytest.raises(AirflowRescheduleException) as rescheduled:
        sensor.execute(context(ti))

    assert rescheduled.value.reschedule_date >= before + timedelta(seconds=30)


@pytest.mark.parametrize("deferrable", [False, True])
@pytest.mark.parametrize("state", ["failed", "upstream_failed", "skipped"])
def test_a_fork_that_ended_without_an_audit_run_fails_the_coalesce(deferrable: bool, state: str) -> None:
    _, sensor = build(deferrable=deferrable)
    ti = FakeTI(states={"fork": state})

    with pytest.raises(AirflowFailException, match=f"fork 'fork' ended {state} without an audit run"):
        sensor.execute(context(ti))


@pytest.mark.parametrize("deferrable", [False, True])
def test_with_soft_fail_a_fork_that_ended_without_an_audit_run_skips_the_coalesce(deferrable: bool) -> None:
    _, sensor = build(deferrable=deferrable, soft_fail=True)
    ti = FakeTI(states={"fork": "failed"})

    with pytest.raises(AirflowSkipException) as skipped:
        sensor.execute(context(ti))

    # reschedule mode: Airflow's sensor loop skips, chaining our failure; deferrable: we skip with it
    said = f"{skipped.value} {skipped.value.__cause__}"
    assert "fork 'fork' ended failed without an audit run" in said, said


# -- CoalesceSensor: the tolerance -------------------------------------------------------------------


def _summary(failed: int, total: int) -> dict[str, Any]:
    return {
        "coalesce": "coalesce",
        "policy": "require_all",
        "merge": "union",
        "rows_failed": failed,
        "rows_total": total,
        "failure_reasons": {"incomplete_branches": failed} if failed else {},
        "missing_branches": {"b": {"reasons": {"not_arrived": failed}}} if failed else {},
        "audit_run_id": "run-1",
    }


@pytest.mark.parametrize(
    ("tolerated", "rate", "failed", "total", "within"),
    [
        (0, None, 0, 10, True),
        (0, None, 1, 10, False),
        (2, None, 2, 10, True),
        (2, None, 3, 10, False),
        (0, 0.2, 2, 10, True),
        (0, 0.2, 3, 10, False),
        (0, 1.0, 0, 0, True),
        (0, 0.5, 1, 0, False),  # a rate of no rows is no excuse
    ],
)
def test_within_tolerance(tolerated: int, rate: float | None, failed: int, total: int, within: bool) -> None:
    _, sensor = build(tolerated_failures=tolerated, tolerated_failure_rate=rate)
    assert sensor.within_tolerance(_summary(failed, total)) is within


@pytest.mark.parametrize(
    ("soft_fail", "raised"), [(False, AirflowFailException), (True, AirflowSkipException)]
)
def test_rows_failed_beyond_the_tolerance_fail_or_skip_after_pushing_the_summary(
    store: AuditStore, soft_fail: bool, raised: type[BaseException]
) -> None:
    _, sensor = build(timeout=0.001, soft_fail=soft_fail)
    run_id = completed_fork(store)
    deliver(store, run_id, "a")  # "b" never arrives; the deadline has passed
    ti = FakeTI(states={"fork": "success", "ask_a": "success", "ask_b": "success"}, xcoms=fork_xcom(run_id))
    assert sensor.poke(context(ti)) is True  # every row decided (failed) at the deadline

    with pytest.raises(raised, match=f"{ROWS} of {ROWS} rows failed") as ended:
        sensor.report(context(ti))

    assert "require_all" in str(ended.value) and run_id in str(ended.value)
    pushed = ti.xcoms[("coalesce", SUMMARY_XCOM_KEY)]
    assert (pushed["rows_failed"], pushed["rows_merged"]) == (ROWS, 0)


# -- parse-time configuration errors -----------------------------------------------------------------


def test_the_framework_timeout_exceeds_our_deadline_by_the_margin() -> None:
    _, sensor = build(timeout=60, fork_wait_timeout=timedelta(minutes=5))
    assert (
        sensor.timeout
        == (timedelta(minutes=5) + timedelta(seconds=60) + FRAMEWORK_TIMEOUT_MARGIN).total_seconds()
    )
    assert sensor.trigger_rule == "always"
    assert sensor.finalizer is not None and sensor.finalizer.task_id == "coalesce_finalize"
    assert sensor.finalizer.is_teardown


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tolerated_failures": -1}, "tolerated_failures must be an integer >= 0, got -1"),
        ({"tolerated_failures": True}, "tolerated_failures must be an integer >= 0, got True"),
        ({"tolerated_failures": 1.5}, "tolerated_failures must be an integer >= 0, got 1.5"),
        ({"tolerated_failure_rate": 1.5}, "tolerated_failure_rate must be in [0, 1], got 1.5"),
        ({"tolerated_failure_rate": "0.1"}, "tolerated_failure_rate must be in [0, 1], got '0.1'"),
        ({"on_failure": "skip"}, "on_failure was removed (got on_failure='skip'): use soft_fail=True"),
        ({"fork_wait_timeout": 60}, "fork_wait_timeout must be a timedelta >= 0, got 60"),
        ({"fork_wait_timeout": timedelta(seconds=-1)}, "fork_wait_timeout must be a timedelta >= 0"),
        ({"fork_wait_timeout": timedelta.max}, "timeout + fork_wait_timeout overflow a date"),
        ({"policy": "most"}, "policy"),
        ({"policy": "quorum"}, "quorum"),
        ({"branches": ["a", "z"]}, "z"),
    ],
)
def test_coalesce_configuration_errors_at_parse_time(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(**overrides)
    assert message in str(err.value)


def test_coalesce_needs_a_fork_operator() -> None:
    with pytest.raises(ElspethConfigError, match="fork must be a ForkOperator, got str"):
        CoalesceSensor(task_id="coalesce", fork="fork", policy="require_all")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
        ({"chunk_size": True}, "chunk_size must be a positive integer, got True"),
        ({"row_key": ""}, "row_key must be a column name, got ''"),
        ({"rows": 42}, "rows must be a list of dicts, an XComArg or a callable returning rows, got int"),
        ({"branches": ["only"]}, "branches"),
        ({"branches": ["a", "a"]}, "a"),
        # Literal rows are checked as the fork's run would check them, naming the first bad index.
        ({"rows": ["doc-1", "doc-2"]}, "rows: row at index 0 is not a JSON object (got str)"),
        (
            {"rows": ({"id": "r0"}, {"key": "r1"}), "row_key": "id"},
            "rows: row at index 1 has no row_key column 'id' (missing or null)",
        ),
        (
            {"rows": [{"id": "r0"}, {"id": None}], "row_key": "id"},
            "rows: row at index 1 has no row_key column 'id' (missing or null)",
        ),
        (
            {"rows": [{"id": "r\x00"}], "row_key": "id"},
            "rows: row at index 0: row key 'r\\x00' contains a NUL",
        ),
        (
            {"rows": [{"id": "r0"}, {"id": "r1"}, {"id": "r0"}], "row_key": "id"},
            "rows: duplicate row key 'r0' (row at index 2)",
        ),
    ],
)
def test_fork_configuration_errors_at_parse_time(overrides: dict[str, Any], message: str) -> None:
    params: dict[str, Any] = {"task_id": "fork", "rows": [], "branches": BRANCHES}
    params.update(overrides)
    with pytest.raises(ElspethConfigError) as err:
        ForkOperator(**params)
    assert str(err.value).startswith("task 'fork': "), err.value  # built outside a DAG: no DAG to name
    assert message in str(err.value)


def test_literal_rows_that_the_fork_takes_pass_at_parse_time() -> None:
    """Keyed by position without ``row_key``; any JSON scalar key with it, null excluded."""
    ForkOperator(task_id="fork", rows=[{"id": 1}, {"id": "1b"}, {"x": None}], branches=BRANCHES)
    ForkOperator(task_id="fork", rows=[{"id": 1}, {"id": "2"}, {"id": True}], row_key="id", branches=BRANCHES)


def test_a_configuration_error_names_the_dag_and_the_task() -> None:
    """A task built in a DAG (and a TaskGroup) names both, the task by its group-prefixed id."""
    from airflow.sdk import DAG, TaskGroup

    with DAG("configured", schedule=None), TaskGroup("group"):
        fork = ForkOperator(task_id="fork", rows=[], branches=BRANCHES)
        with pytest.raises(ElspethConfigError) as err:
            CoalesceSensor(task_id="join", fork=fork, policy="quorum", quorum=3, branches=["a", "b"])
    assert str(err.value) == "DAG 'configured', task 'group.join': quorum must be an integer in 1..2, got 3"
    assert (err.value.dag_id, err.value.task_id) == ("configured", "group.join")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"branch": "z"}, "z"),
        ({"python_callable": "not callable"}, "python_callable must be callable, got 'not callable'"),
        ({"max_failed_rate": 1.0}, "max_failed_rate must be in [0, 1), got 1.0"),
    ],
)
def test_branch_configuration_errors_at_parse_time(overrides: dict[str, Any], message: str) -> None:
    fork = ForkOperator(task_id="fork", rows=[], branches=BRANCHES)
    params: dict[str, Any] = {"task_id": "ask", "fork": fork, "branch": "a", "python_callable": _identity}
    params.update(overrides)
    with pytest.raises(ElspethConfigError) as err:
        BranchOperator(**params)
    assert message in str(err.value)


def test_max_row_bytes_is_read_from_the_airflow_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowConfigException

    from airflow_elspeth.operators.fork import DEFAULT_MAX_ROW_BYTES, row_limit

    monkeypatch.delenv("AIRFLOW__ELSPETH__MAX_ROW_BYTES", raising=False)
    assert row_limit().max_bytes == DEFAULT_MAX_ROW_BYTES == 1024 * 1024
    monkeypatch.setenv("AIRFLOW__ELSPETH__MAX_ROW_BYTES", "4096")
    assert row_limit().max_bytes == 4096
    monkeypatch.setenv("AIRFLOW__ELSPETH__MAX_ROW_BYTES", "0")
    with pytest.raises(
        ElspethConfigError, match=r"\[elspeth\] max_row_bytes must be a positive number of bytes, got 0"
    ):
        row_limit()
    monkeypatch.setenv("AIRFLOW__ELSPETH__MAX_ROW_BYTES", "1MB")
    with pytest.raises(AirflowConfigException, match='"max_row_bytes" key in "elspeth" section'):
        row_limit()


def test_branch_needs_a_fork_operator() -> None:
    with pytest.raises(ElspethConfigError, match="fork must be a ForkOperator, got str"):
        BranchOperator(task_id="ask", fork="fork", branch="a", python_callable=_identity)


# -- output contracts of a branch step


def _contract_result(output: dict[str, Any], retries: int = 0) -> Any:
    """The node result of one row whose callable answers ``output`` (counting the calls)."""
    from airflow_elspeth.audit.read.work import WorkItem

    calls: list[int] = []

    def answer(row: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        return output

    fork = ForkOperator(task_id="fork_c", rows=[{"id": 1}], row_key="id", branches=["a", "b"])
    step = BranchOperator(
        task_id="ask_a",
        fork=fork,
        branch="a",
        python_callable=answer,
        output_fields={"when": str, "n": int},
        row_retries=retries,
    )
    item = WorkItem(token_id="t", row_id="r", row_key="1", input_hash="h", input_row={"id": 1})
    result = step._process_one(item, 0, lambda: datetime(2026, 1, 1, tzinfo=timezone.utc))
    return result, len(calls)


def test_an_output_breaking_the_contract_is_failed_with_its_value_and_not_retried() -> None:
    result, calls = _contract_result({"when": "today", "n": True}, retries=3)
    assert calls == 1 and result.status == "failed" and result.output_hash is None
    assert result.error == {
        "type": "ContractViolation",
        "message": "field 'n' is bool, the contract says int",
        "contract": {"field": "n", "value": True, "expected": ["int"], "missing": False},
    }


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (datetime(2026, 1, 1), "datetime.datetime(2026, 1, 1, 0, 0)"),  # not JSON: its repr
        ("x" * 5000, repr("x" * 5000)[:2000]),  # too long to keep whole: cut
    ],
    ids=["not-json", "too-long"],
)
def test_an_offending_value_that_cannot_be_kept_whole_is_kept_as_its_repr(value: Any, shown: str) -> None:
    result, _ = _contract_result({"when": "today", "n": value})
    assert result.error["contract"]["value"] == shown
    json.dumps(result.error)  # storable


def test_an_offending_value_of_shared_references_is_shown_cut_without_expanding_it() -> None:
    """``[x, x]`` 50 times over (2**50 leaves): neither kept whole nor repr'd whole."""
    tree: Any = [1]
    for _ in range(50):
        tree = [tree, tree]
    result, _ = _contract_result({"when": "today", "n": tree})
    assert (
        result.error["contract"]["value"]
        == "[[[[...], [...]], [[...], [...]]], [[[...], [...]], [[...], [...]]]]"
    )
    json.dumps(result.error)  # storable


def test_an_output_keeping_the_contract_is_completed() -> None:
    result, _ = _contract_result({"when": "today", "n": 2, "extra": None})
    assert result.status == "completed" and result.output_hash


def test_a_bad_setting_or_audit_connection_at_run_time_names_the_dag_and_the_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fork, sensor = build()
    monkeypatch.setenv("AIRFLOW__ELSPETH__MAX_ROW_BYTES", "0")
    with pytest.raises(ElspethConfigError) as err:
        fork.execute(context(FakeTI()))
    assert str(err.value).startswith(f"DAG {DAG_ID!r}, task 'fork': [elspeth] max_row_bytes must be"), (
        err.value
    )
    monkeypatch.delenv("AIRFLOW__ELSPETH__MAX_ROW_BYTES")
    monkeypatch.setenv("AIRFLOW_CONN_NO_URL", json.dumps({"conn_type": "mysql", "host": "db"}))
    monkeypatch.setenv("AIRFLOW__ELSPETH__AUDIT_CONN_ID", "no_url")
    expected = "connection 'no_url' of type 'mysql': give the extra 'sqlalchemy_url' or 'drivername'"
    with pytest.raises(ElspethConfigError) as err:
        fork.execute(context(FakeTI()))
    assert str(err.value).startswith(f"DAG {DAG_ID!r}, task 'fork': {expected}"), err.value
    with pytest.raises(ElspethConfigError) as err:
        sensor.service()
    assert str(err.value).startswith(f"DAG {DAG_ID!r}, task 'coalesce': {expected}"), err.value
