"""Every policy x {all arrive, per-row errors, a branch task fails wholesale, a branch hangs past the
deadline, an arrival after the decision}, and select with the selected branch missing, under
``dag.test()``: all on SQLite, a scenario of every case on PostgreSQL too (``POSTGRES_SCENARIOS``).

After each run: every token has exactly one terminal outcome; every decision equals the pure replay
of its event log (rebuilt from node_states / branch_task_losses); the XCom summary agrees with the
audit rows; the coalesce's end state follows the tolerance; and the per-row results are the ones the
scenario was written to produce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from airflow_elspeth.audit.engine import engine_for_url

from .checks import (
    CoalesceView,
    check_coalesce,
    check_run_integrity,
    check_sensor_state,
    check_summary,
    only_run,
    q,
    reschedules,
    ti_start,
    ti_states,
    xcom,
)
from .support import dag_module

pytestmark = pytest.mark.integration

M = dag_module()
ROWS = [M.row_key(n) for n in range(M.ROW_COUNT)]
LOST_A = {"a": "error:ValueError"}
# A branch that delivers after its row was decided: late when the decision's pass already saw the
# arrival (it reads the log as of the audit clock less the settle window), else not_arrived at the
# decision and counted late once it arrives. Either way the summary counts it in late_arrivals.
LATE_AFTER_FAILURE = ("late_arrival_after_failure", "not_arrived")
LATE_AFTER_MERGE = ("late_arrival_after_merge", "not_arrived")


@dataclass(frozen=True)
class Expect:
    """What a scenario must produce. ``rows``: the rows that do not merge -> failure reason."""

    sensor: str
    rows: dict[str, str] = field(default_factory=dict)
    missing: dict[str, dict[str, Any]] = field(default_factory=dict)  # row -> {branch: reason(s)}
    consumed: dict[str, set[str] | Callable[[set[str]], bool]] = field(default_factory=dict)
    late_arrivals: int | None = None
    late_at_least: int = 0
    tasks: dict[str, str] = field(default_factory=dict)  # task -> end state
    extra: Callable[[CoalesceView, dict[str, Any]], None] | None = None

    def per_row(self) -> dict[str, str]:
        return {key: self.rows.get(key, "merged") for key in ROWS}


def _all(reason: Any, branch: str = "a") -> dict[str, dict[str, Any]]:
    return {key: {branch: reason} for key in ROWS}


def _consumed_everywhere(branches: set[str]) -> dict[str, set[str]]:
    return {key: branches for key in ROWS}


def _one_of(options: set[str]) -> Callable[[set[str]], bool]:
    return lambda consumed: len(consumed) == 1 and consumed <= options


def _quorum_all_arrive(view: CoalesceView, summary: dict[str, Any]) -> None:
    for d in view.decisions.values():
        assert len(d["consumed"]) == 2 and len(d["missing"]) == 1
        (reason,) = d["missing"].values()
        # The third branch is late (it arrived before this coalesce looked) or was never run on
        # the row (the row was decided first, and the branch skipped it).
        assert reason in ("late_arrival_after_merge", "not_arrived")


def _select_rows_are_selected_output(branch: str) -> Callable[[CoalesceView, dict[str, Any]], None]:
    def check(view: CoalesceView, summary: dict[str, Any]) -> None:
        for d in view.decisions.values():
            if d["decision"] == "merged":
                assert branch in d["consumed"]
                assert d["missing"].get(branch) is None
            else:
                assert d["failure_reason"] == "select_branch_not_arrived"
                assert branch not in d["consumed"]
                details = json_details(d)
                assert details["select_branch"] == branch
                # the branches that did arrive stay on record (they were merged in its place)
                assert details["arrived"] and branch not in details["arrived"], details
        for failed in summary["failed_rows"]:
            assert failed["arrived"], f"failed_rows[].arrived is empty: {failed}"

    return check


def json_details(decision: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(decision["details_json"])


EXPECTED: dict[str, Expect] = {
    # -- require_all ------------------------------------------------------------------------------
    "elspeth_it_require_all_all_arrive": Expect(
        sensor="success", consumed=_consumed_everywhere({"a", "b", "c"}), late_arrivals=0
    ),
    "elspeth_it_require_all_row_errors": Expect(
        sensor="success",  # 2 failures, tolerated_failures=2
        rows={"r1": "branch_lost", "r4": "branch_lost"},
        missing={"r1": LOST_A, "r4": LOST_A},
    ),
    "elspeth_it_require_all_task_fails": Expect(
        sensor="skipped",  # soft_fail=True
        rows={key: "branch_lost" for key in ROWS},
        missing=_all("branch_task_failed"),
        tasks={"ask_a": "failed", "publish": "skipped"},
    ),
    "elspeth_it_require_all_hang": Expect(
        sensor="failed",
        rows={"r5": "incomplete_branches"},
        missing={"r5": {"c": LATE_AFTER_FAILURE}},
        consumed={"r0": {"a", "b", "c"}, "r4": {"a", "b", "c"}},
        late_arrivals=1,
        tasks={"publish": "upstream_failed"},
    ),
    "elspeth_it_require_all_late": Expect(
        sensor="success",  # 1/6 <= tolerated_failure_rate 0.2
        rows={"r1": "branch_lost"},
        missing={"r1": {"a": "error:ValueError", "c": LATE_AFTER_FAILURE}},
    ),
    # -- quorum (2 of 3) --------------------------------------------------------------------------
    "elspeth_it_quorum_all_arrive": Expect(sensor="success", extra=_quorum_all_arrive),
    "elspeth_it_quorum_row_errors": Expect(
        sensor="success",  # 1 failure, tolerated_failures=1
        rows={"r4": "quorum_impossible"},
        missing={"r1": LOST_A, "r4": {"a": "error:ValueError", "b": "dropped"}},
        consumed={"r1": {"b", "c"}},
    ),
    "elspeth_it_quorum_task_fails": Expect(
        sensor="success",
        missing=_all("branch_task_failed"),
        consumed=_consumed_everywhere({"b", "c"}),
        tasks={"ask_a": "failed"},
    ),
    "elspeth_it_quorum_hang": Expect(
        sensor="failed",  # 1/6 > tolerated_failure_rate 0.1
        rows={"r5": "quorum_not_met_at_timeout"},
        missing={"r5": {"a": "error:ValueError", "c": LATE_AFTER_FAILURE}},
    ),
    "elspeth_it_quorum_late": Expect(
        sensor="success",
        consumed=_consumed_everywhere({"a", "b"}),
        missing=_all(LATE_AFTER_MERGE, "c"),
        late_arrivals=6,
    ),
    # -- best_effort ------------------------------------------------------------------------------
    "elspeth_it_best_effort_all_arrive": Expect(
        sensor="success", consumed=_consumed_everywhere({"a", "b", "c"}), late_arrivals=0
    ),
    "elspeth_it_best_effort_row_errors": Expect(
        sensor="success",  # 1 failure, tolerated_failures=1
        rows={"r2": "all_branches_lost"},
        missing={
            "r1": LOST_A,
            "r4": LOST_A,
            "r2": {"a": "error:ValueError", "b": "error:ValueError", "c": "dropped"},
        },
        consumed={"r1": {"b", "c"}, "r4": {"b", "c"}, "r0": {"a", "b", "c"}},
    ),
    "elspeth_it_best_effort_task_fails": Expect(
        sensor="success",
        missing=_all("branch_task_failed"),
        consumed=_consumed_everywhere({"b", "c"}),
        tasks={"ask_a": "failed"},
    ),
    "elspeth_it_best_effort_hang": Expect(
        sensor="skipped",  # soft_fail=True
        rows={"r4": "best_effort_timeout_no_arrivals"},
        missing={
            "r4": {"a": "error:ValueError", "b": "error:ValueError", "c": LATE_AFTER_FAILURE},
            "r5": {"a": "error:ValueError", "c": LATE_AFTER_MERGE},
        },
        consumed={"r5": {"b"}, "r0": {"a", "b", "c"}},
        late_arrivals=2,
        tasks={"publish": "skipped"},
    ),
    "elspeth_it_best_effort_late": Expect(
        sensor="success",
        missing={"r5": {"c": LATE_AFTER_MERGE}},
        consumed={"r5": {"a", "b"}, "r0": {"a", "b", "c"}, "r3": {"a", "b", "c"}},
        late_arrivals=1,
    ),
    # -- first ------------------------------------------------------------------------------------
    "elspeth_it_first_all_arrive": Expect(
        sensor="success", consumed={k: _one_of({"a", "b", "c"}) for k in ROWS}
    ),
    "elspeth_it_first_row_errors": Expect(
        sensor="failed",  # 1 failure, tolerated_failures=0
        rows={"r2": "all_branches_lost"},
        missing={"r2": {"a": "error:ValueError", "b": "error:ValueError", "c": "error:ValueError"}},
        consumed={"r1": _one_of({"b", "c"})},
        tasks={"publish": "upstream_failed"},
    ),
    "elspeth_it_first_task_fails": Expect(
        sensor="success",
        missing=_all("branch_task_failed"),
        consumed={k: _one_of({"b", "c"}) for k in ROWS},
        tasks={"ask_a": "failed"},
    ),
    "elspeth_it_first_hang": Expect(
        sensor="success",  # 1 failure, tolerated_failures=1
        rows={"r5": "first_timeout_no_arrivals"},
        missing={"r5": {"a": "error:ValueError", "b": "dropped", "c": LATE_AFTER_FAILURE}},
        late_at_least=1,  # and the rows r0..r4 the other branches answered after the first
    ),
    "elspeth_it_first_late": Expect(
        sensor="success",
        consumed={k: _one_of({"a", "b"}) for k in ROWS},
        missing=_all(LATE_AFTER_MERGE, "c"),
        late_arrivals=12,
    ),
    # -- select: the selected branch missing is a failure, never a substitution --------------------
    "elspeth_it_quorum_select_missing": Expect(
        sensor="success",  # 2 failures, tolerated_failures=2
        rows={"r1": "select_branch_not_arrived", "r4": "select_branch_not_arrived"},
        missing={"r1": LOST_A, "r4": LOST_A},
        consumed={"r0": {"a", "c"}, "r5": {"a", "c"}},
        extra=_select_rows_are_selected_output("a"),
    ),
    "elspeth_it_best_effort_select_missing": Expect(
        sensor="failed",
        rows={"r1": "select_branch_not_arrived", "r4": "select_branch_not_arrived"},
        missing={"r1": {"c": "error:ValueError"}, "r4": {"c": "dropped"}},
        extra=_select_rows_are_selected_output("c"),
        tasks={"publish": "upstream_failed"},
    ),
    "elspeth_it_first_select_missing": Expect(
        sensor="success",  # 2/6 <= tolerated_failure_rate 0.5
        rows={"r1": "select_branch_not_arrived", "r4": "select_branch_not_arrived"},
        consumed={"r0": {"a"}, "r2": {"a"}, "r3": {"a"}, "r5": {"a"}},
        extra=_select_rows_are_selected_output("a"),
    ),
}


def test_every_scenario_has_expectations() -> None:
    policy_scenarios = {
        k for k in M.SCENARIOS if any(k == f"elspeth_it_{p}_{c}" for p in M.POLICIES for c in CASES)
    }
    assert policy_scenarios == set(EXPECTED)
    assert len(EXPECTED) == 4 * 5 + 3


CASES = (M.ALL_ARRIVE, M.ROW_ERRORS, M.TASK_FAILS, M.HANG, M.LATE, M.SELECT_MISSING)


def verify_run(engine: Any, dag_run: Any, spec: Any) -> tuple[CoalesceView, dict[str, Any], dict[str, str]]:
    """The checks every finished run gets; returns the coalesce view, its summary, task states."""
    states = ti_states(dag_run)
    run = only_run(engine, dag_run)
    assert run["status"] == "completed", run
    check_run_integrity(engine, run["run_id"])
    view = check_coalesce(engine, run)
    summary = xcom(dag_run, "coalesce", "coalesce_summary")
    assert summary is not None, f"no coalesce_summary XCom; task states {states}"
    check_summary(summary, view)
    state = check_sensor_state(states["coalesce"], summary, spec)
    if state == "success":
        assert xcom(dag_run, "coalesce") == summary, "return_value differs from coalesce_summary"
        merged = [
            q(
                engine,
                "SELECT p.body FROM node_states s JOIN payloads p ON p.hash = s.output_ref "
                "WHERE s.token_id = :t AND s.node_id = :n",
                t=d["merged_token_id"],
                n=view.node_id,
            )[0]["body"]
            for d in sorted(
                view.decisions.values(), key=lambda d: ROWS.index(d["row_key"]) if d["row_key"] in ROWS else 0
            )
            if d["decision"] == "merged"
        ]
        import json

        published = xcom(dag_run, "publish")
        assert published == [json.loads(body) for body in merged], "read_merged_rows != merged rows"
        assert states["publish"] == "success"
    else:
        assert xcom(dag_run, "coalesce") is None
    return view, summary, states


# Every scenario runs on SQLite; on PostgreSQL, one scenario of every case (spread over the four
# policies and the three merges): what differs between the backends is the store's SQL (locks,
# timestamps, the late/settle ordering), which these exercise; the policies themselves are the pure
# core's, the same on both.
POSTGRES_SCENARIOS = {
    "elspeth_it_quorum_all_arrive",  # merge="nested"
    "elspeth_it_best_effort_row_errors",  # errors, drops, all_branches_lost
    "elspeth_it_first_task_fails",  # branch_task_losses
    "elspeth_it_require_all_hang",  # the deadline, late_arrival_after_failure
    "elspeth_it_quorum_late",  # late_arrival_after_merge
    "elspeth_it_quorum_select_missing",  # merge="select"
}


def _scenario_params() -> list[Any]:
    params = []
    for dag_id in sorted(EXPECTED):
        params.append(pytest.param(dag_id, "sqlite", id=f"sqlite-{dag_id}"))
        if dag_id in POSTGRES_SCENARIOS:
            params.append(
                pytest.param(dag_id, "postgresql", id=f"postgresql-{dag_id}", marks=pytest.mark.postgres)
            )
    return params


def test_postgresql_runs_a_scenario_of_every_case_and_policy() -> None:
    assert set(EXPECTED) >= POSTGRES_SCENARIOS
    assert {c for c in CASES if any(d.endswith(f"_{c}") for d in POSTGRES_SCENARIOS)} == set(CASES)
    assert {
        p for p in M.POLICIES if any(d.startswith(f"elspeth_it_{p}_") for d in POSTGRES_SCENARIOS)
    } == set(M.POLICIES)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("dag_id", "audit_url"), _scenario_params(), indirect=["audit_url"])
def test_policy_scenario(dag_id: str, audit_url: str, run_dag: Any) -> None:
    run_scenario(M.SCENARIOS[dag_id], EXPECTED[dag_id], audit_url, run_dag)


@pytest.mark.timeout(180)
def test_deferrable_coalesce_under_dag_test_decides_the_same(audit_url: str, run_dag: Any) -> None:
    """deferrable=True under dag.test() reschedules itself (an inline trigger would block the
    branches) and decides exactly like the reschedule-mode sensor, deadline included."""
    spec = M.SCENARIOS["elspeth_it_quorum_hang_deferrable"]
    assert spec.deferrable
    run_scenario(spec, EXPECTED["elspeth_it_quorum_hang"], audit_url, run_dag)


def run_scenario(spec: Any, expect: Expect, audit_url: str, run_dag: Any) -> None:
    dag_run = run_dag(M.build_dag(spec), audit_url)
    engine = engine_for_url(audit_url)
    view, summary, states = verify_run(engine, dag_run, spec)

    assert states["coalesce"] == expect.sensor, summary
    assert view.per_row() == expect.per_row(), summary["failed_rows"]
    for key, branches in expect.missing.items():
        got = view.missing(key)
        for branch, want in branches.items():
            assert got.get(branch) in ((want,) if isinstance(want, str) else want), (
                f"row {key}: missing {got}"
            )
    for key, want in expect.consumed.items():
        consumed = set(view.decisions[key]["consumed"])
        assert want(consumed) if callable(want) else consumed == want, f"row {key}: consumed {consumed}"
    if expect.late_arrivals is not None:
        assert summary["late_arrivals"] == expect.late_arrivals
    assert summary["late_arrivals"] >= expect.late_at_least
    for task_id, state in expect.tasks.items():
        assert states[task_id] == state, f"{task_id}: {states[task_id]} (all: {states})"
    if expect.extra:
        expect.extra(view, summary)
    if spec.coalesce_trigger_rule is None:
        # The coalesce started before the fork (with `load`), polled while the branches ran, and
        # still saw their arrivals: dag.test() runs one task at a time, and reschedule mode frees
        # the loop between pokes.
        first = reschedules(dag_run, "coalesce")
        assert first, "the coalesce never rescheduled"
        assert first[0].start_date < ti_start(dag_run, "fork")
