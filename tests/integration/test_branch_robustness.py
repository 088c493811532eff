"""Branch tasks that end abnormally, and a branch that no coalesce joins, under ``dag.test()`` on
both audit backends (DAGs: tests/integration/dags/elspeth_branch_faults_dags.py).

After each run every token has exactly one terminal outcome and the coalesce's decisions are the
replay of their event logs (checks.py); what the faulty branch wrote is checked row by row.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from datetime import datetime
from types import ModuleType
from typing import Any

import pytest

from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.exceptions import ElspethConfigError

from .checks import (
    as_utc,
    check_coalesce,
    check_run_integrity,
    check_summary,
    only_run,
    q,
    ti_states,
    xcom,
)
from .support import DAGS_DIR, patched_env

pytestmark = pytest.mark.integration

MODULE_NAME = "elspeth_branch_faults_dags"
ROWS = [f"r{n}" for n in range(6)]


def faults_module() -> ModuleType:
    """The DAG module, imported once (as support.dag_module does for elspeth_it_dags)."""
    module = sys.modules.get(MODULE_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(MODULE_NAME, DAGS_DIR / f"{MODULE_NAME}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module
        spec.loader.exec_module(module)
    return module


M = faults_module()


@pytest.fixture
def hang_guard() -> Any:
    """No hang left over from another test; the hung callable of this one released afterwards."""
    M.reset()
    yield M
    assert M.release(), "the hung callable did not return once released"


def node_states(engine: Any, run_id: str, node_id: str) -> dict[str, dict[str, Any]]:
    """row key -> the node state of ``node_id`` (error decoded)."""
    rows = q(
        engine,
        "SELECT r.row_key, s.status, s.attempt, s.error_json, s.recorded_at FROM node_states s"
        " JOIN rows r ON r.run_id = s.run_id AND r.row_id = s.row_id"
        " WHERE s.run_id = :r AND s.node_id = :n",
        r=run_id,
        n=node_id,
    )
    out = {}
    for row in rows:
        assert row["row_key"] not in out, f"{node_id}: two states for {row['row_key']}"
        out[row["row_key"]] = {**row, "error": json.loads(row["error_json"] or "null")}
    return out


def calls(dag_id: str, task_id: str) -> list[str]:
    return [row for d, t, row in M.CALLS if (d, t) == (dag_id, task_id)]


def verify(engine: Any, dag_run: Any) -> tuple[Any, dict[str, str]]:
    """Run-wide checks; returns the coalesce view and the task states."""
    states = ti_states(dag_run)
    run = only_run(engine, dag_run)
    assert run["status"] == "completed", run
    check_run_integrity(engine, run["run_id"])
    view = check_coalesce(engine, run)
    summary = xcom(dag_run, "coalesce", "coalesce_summary")
    assert summary is not None, f"no coalesce_summary; task states {states}"
    check_summary(summary, view)
    assert states["coalesce"] == "success", (states, summary["failure_reasons"])
    return view, states


def finished_before_the_fault(engine: Any, run_id: str) -> dict[str, dict[str, Any]]:
    """ask_b's states: r0..r2 finished before the fault on r3 (written only by the task's final
    flush: flush_seconds is 60 s and the batch is never full)."""
    written = node_states(engine, run_id, "ask_b")
    for key in ("r0", "r1", "r2"):
        assert (written[key]["status"], written[key]["attempt"]) == ("completed", 1), written
    return written


# ------------------------------------------------------------------------------------------------
# A branch no coalesce joins


@pytest.mark.timeout(180)
def test_a_branch_no_coalesce_joins_ends_every_token_at_its_last_step(audit_url: str, run_dag: Any) -> None:
    dag_run = run_dag(M.build(M.UNJOINED), audit_url)
    engine = engine_for_url(audit_url)
    view, states = verify(engine, dag_run)
    assert states["prep_c"] == states["ask_c[0]"] == states["ask_c[1]"] == "success", states
    assert view.per_row() == dict.fromkeys(ROWS, "merged")
    assert view.spec["config"]["branches"] == ["a", "b"]

    outcomes = q(
        engine,
        "SELECT r.row_key, o.outcome, o.reason, o.is_terminal, o.recorded_at FROM tokens t"
        " JOIN rows r ON r.run_id = t.run_id AND r.row_id = t.row_id"
        " JOIN token_outcomes o ON o.token_id = t.token_id"
        " WHERE t.run_id = :r AND t.branch_name = 'c'",
        r=view.run_id,
    )
    terminal = [o for o in outcomes if o["is_terminal"]]
    assert sorted(o["row_key"] for o in terminal) == ROWS, outcomes  # exactly one per c token
    got = {o["row_key"]: (o["outcome"], o["reason"]) for o in terminal}
    assert got == {
        "r0": ("completed", "not_joined"),
        "r1": ("lost", "dropped"),  # dropped by ask_c
        "r2": ("lost", "error:ValueError"),
        "r3": ("completed", "not_joined"),
        "r4": ("lost", "dropped"),  # dropped by prep_c: lost at the previous step, same reason
        "r5": ("completed", "not_joined"),
    }
    # Written by the last step (not prep_c), in the transaction of its node state.
    last = node_states(engine, view.run_id, "ask_c")
    for o in terminal:
        assert as_utc(o["recorded_at"]) == as_utc(last[o["row_key"]]["recorded_at"]), o
    assert len(node_states(engine, view.run_id, "prep_c")) == len(ROWS)


# ------------------------------------------------------------------------------------------------
# Abnormal ends of a branch task


@pytest.mark.timeout(180, method="thread")  # execution_timeout uses SIGALRM, as the signal method does
def test_execution_timeout_ends_a_hung_callable_and_records_it(
    audit_url: str, run_dag: Any, hang_guard: Any
) -> None:
    dag_run = run_dag(M.build(M.TIMEOUT), audit_url)
    # The whole DAG run ended while the callable of r3 still hung: the task did not wait for it.
    assert M.HUNG.is_set() and not M.RETURNED.is_set()
    engine = engine_for_url(audit_url)
    view, states = verify(engine, dag_run)
    assert states["ask_b"] == "failed", states

    written = finished_before_the_fault(engine, view.run_id)
    hung = written["r3"]
    assert hung["status"] == "failed" and hung["attempt"] == 1, hung
    assert hung["error"]["type"] == "AirflowTaskTimeout", hung
    assert "execution_timeout" in hung["error"]["message"], hung
    assert set(written) == {"r0", "r1", "r2", "r3"}  # r4, r5 never started
    assert calls(M.TIMEOUT, "ask_b") == ["r0", "r1", "r2", "r3"]
    assert view.missing("r3") == {"b": "error:AirflowTaskTimeout"}
    assert view.missing("r4") == view.missing("r5") == {"b": "branch_task_failed"}
    assert view.per_row() == dict.fromkeys(ROWS, "merged")  # best_effort: a's output


@pytest.mark.timeout(180)
def test_sys_exit_in_the_callable_writes_the_rows_finished_before(audit_url: str, run_dag: Any) -> None:
    M.reset()
    dag_run = run_dag(M.build(M.SYS_EXIT), audit_url)
    engine = engine_for_url(audit_url)
    view, states = verify(engine, dag_run)
    assert states["ask_b"] == "failed", states

    written = finished_before_the_fault(engine, view.run_id)
    assert set(written) == {"r0", "r1", "r2"}  # r3 exited: left to the coalesce, as r4 and r5
    assert calls(M.SYS_EXIT, "ask_b") == ["r0", "r1", "r2", "r3"]  # no row started after the exit
    for key in ("r3", "r4", "r5"):
        assert view.missing(key) == {"b": "branch_task_failed"}


@pytest.mark.timeout(180)
def test_sigterm_writes_the_rows_finished_before(audit_url: str, run_dag: Any, hang_guard: Any) -> None:
    """The task runner's SIGTERM handler calls on_kill(), which ends execute() (dag.test() runs the
    task in this process, with that handler installed)."""
    dag_run = run_dag(M.build(M.SIGTERM), audit_url)
    assert M.HUNG.is_set() and not M.RETURNED.is_set()
    engine = engine_for_url(audit_url)
    view, states = verify(engine, dag_run)
    assert states["ask_b"] == "failed", states

    written = finished_before_the_fault(engine, view.run_id)
    assert set(written) == {"r0", "r1", "r2"}  # r3 was still running: not written
    assert calls(M.SIGTERM, "ask_b") == ["r0", "r1", "r2", "r3"]
    for key in ("r3", "r4", "r5"):
        assert view.missing(key) == {"b": "branch_task_failed"}


@pytest.mark.timeout(180)
def test_an_exception_that_cannot_be_printed_loses_its_row_only(audit_url: str, run_dag: Any) -> None:
    M.reset()
    dag_run = run_dag(M.build(M.UNPRINTABLE), audit_url)
    engine = engine_for_url(audit_url)
    view, states = verify(engine, dag_run)
    assert states["ask_b"] == "success", states

    written = node_states(engine, view.run_id, "ask_b")
    assert {k: s["status"] for k, s in written.items()} == {
        **dict.fromkeys(ROWS, "completed"),
        "r1": "failed",
        "r4": "failed",
    }
    assert written["r1"]["error"] == {
        "type": "UnprintableError",
        "message": "UnprintableError('cannot answer r1')",  # str() raised: repr()
        "attempts": 1,
    }
    assert written["r4"]["error"] == {
        "type": "UnrenderableError",
        "message": "<UnrenderableError: str() and repr() raised>",
        "attempts": 1,
    }
    assert view.missing("r1") == {"b": "error:UnprintableError"}
    assert view.missing("r4") == {"b": "error:UnrenderableError"}
    assert view.per_row() == dict.fromkeys(ROWS, "merged")


@pytest.mark.timeout(240)  # the backstop: unbounded, the 2**50-leaf output never finishes
def test_an_output_over_max_row_bytes_loses_its_row_only_naming_the_key_and_the_limit(
    audit_url: str, run_dag: Any
) -> None:
    """Like an output that is not JSON: the row's loss ``error:PayloadLimitExceeded`` (after its
    row retry), the task goes on. The shared-reference output is read up to the limit, never
    serialised."""
    M.reset()
    with patched_env(AIRFLOW__ELSPETH__MAX_ROW_BYTES=str(M.OVERSIZE_LIMIT)):
        dag_run = run_dag(M.build(M.OVERSIZE), audit_url)
    engine = engine_for_url(audit_url)
    view, states = verify(engine, dag_run)
    assert states["ask_b"] == "success", states

    written = node_states(engine, view.run_id, "ask_b")
    assert {k: s["status"] for k, s in written.items()} == {
        **dict.fromkeys(ROWS, "completed"),
        "r1": "failed",
        "r4": "failed",
    }
    for key in ("r1", "r4"):
        assert written[key]["error"] == {
            "type": "PayloadLimitExceeded",
            "message": f"output for row '{key}' is larger than {M.OVERSIZE_LIMIT} bytes as canonical JSON "
            "([elspeth] max_row_bytes)",
            "attempts": 2,
        }
        assert view.missing(key) == {"b": "error:PayloadLimitExceeded"}
    assert calls(M.OVERSIZE, "ask_b").count("r1") == 2  # retried like any output error
    assert view.per_row() == dict.fromkeys(ROWS, "merged")  # best_effort: a's output alone


# ------------------------------------------------------------------------------------------------
# Parse time


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("row_retry_delay", -1),
        ("row_retry_delay", -0.5),
        ("row_retry_delay", math.nan),
        ("row_retry_delay", math.inf),
        ("row_retry_delay", "1"),
        ("row_retry_delay", True),
        ("flush_seconds", 0),
        ("flush_seconds", math.nan),
        ("flush_seconds", math.inf),
    ],
)
def test_invalid_delays_fail_at_construction_naming_the_parameter(name: str, value: Any) -> None:
    from airflow.sdk import DAG

    from airflow_elspeth import BranchOperator, ForkOperator

    with DAG(dag_id="elspeth_bf_invalid", schedule=None, start_date=datetime(2026, 1, 1)):
        fork = ForkOperator(task_id="fork", rows=[], row_key="id", branches=["a", "b"])
        with pytest.raises(ElspethConfigError) as raised:
            BranchOperator(task_id="ask_a", fork=fork, branch="a", python_callable=dict, **{name: value})
    assert name in str(raised.value) and repr(value) in str(raised.value), raised.value


def test_valid_delays_are_accepted() -> None:
    from airflow.sdk import DAG

    from airflow_elspeth import BranchOperator, ForkOperator

    with DAG(dag_id="elspeth_bf_valid", schedule=None, start_date=datetime(2026, 1, 1)):
        fork = ForkOperator(task_id="fork", rows=[], row_key="id", branches=["a", "b"])
        step = BranchOperator(
            task_id="ask_a", fork=fork, branch="a", python_callable=dict, row_retry_delay=0, flush_seconds=0.5
        )
    assert (step.row_retry_delay, step.flush_seconds) == (0, 0.5)
