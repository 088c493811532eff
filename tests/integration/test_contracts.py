"""Branch output contracts, ``on_collision`` and the parse-time checks around them.

``dag.test()`` runs of tests/integration/dags/elspeth_it_contract_dags.py on SQLite and PostgreSQL:

* an output breaking its step's contract is a loss ``contract:<field>`` with the offending value in
  the trail, and the coalesce's summary carries the merged contract, which the merged rows keep;
* ``on_collision`` ``record``, ``fail_row`` and ``prefer:a``, each in the poke, reschedule and
  deferrable modes: what each does to the rows whose branches both supply ``value``; every stored
  decision is what the oracle (tests/integration/checks.py) and ``verify`` replay from the stored log
  and outputs.

And, without a run: union contracts that conflict fail at parse time naming the coalesce, the field,
both branches and their steps; a require_all coalesce fed by a step that may drop rows, or by an
earlier step without row_retries, imports with an ElspethDagWarning.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator, topology
from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.read.lineage import explain_row, row_view
from airflow_elspeth.audit.read.records import AuditRun
from airflow_elspeth.audit.read.runs import audit_runs, pick_audit_run
from airflow_elspeth.audit.read.verify import verify_run
from airflow_elspeth.core.contract import Contract
from airflow_elspeth.exceptions import ElspethConfigError, ElspethDagWarning
from airflow_elspeth.policies import dag_policy, structure_error

from .checks import check_coalesce, check_run_integrity, check_summary, only_run, q, ti_states, xcom
from .dags import elspeth_it_contract_dags as D
from .support import HERE

pytestmark = pytest.mark.integration

ROWS = [f"r{n}" for n in range(D.ROW_COUNT)]
EVEN = [f"r{n}" for n in range(0, D.ROW_COUNT, 2)]


def run_checked(run_dag: Any, audit_url: str, dag_id: str) -> tuple[Any, Any, dict[str, Any], Any]:
    """Run one scenario; the oracle's checks, ``verify`` finds nothing, and the coalesce succeeded
    (it tolerates every failure). Returns the DagRun, the engine, the summary and the oracle's view."""
    dag_run = run_dag(D.build_dag(D.SCENARIOS[dag_id]), audit_url)
    states = ti_states(dag_run)
    assert states["coalesce"] == "success" and states["publish"] == "success", states
    engine = engine_for_url(audit_url)
    run = only_run(engine, dag_run)
    check_run_integrity(engine, run["run_id"])
    view = check_coalesce(engine, run)
    summary = xcom(dag_run, "coalesce", "coalesce_summary")
    check_summary(summary, view)
    task_states = {(dag_run.dag_id, dag_run.run_id, task): state for task, state in states.items()}
    assert verify_run(engine, AuditRun.from_row(run), task_states=task_states) == []
    return dag_run, engine, summary, view


def _state_error(engine: Any, run_id: str, row_key: str, node_id: str) -> dict[str, Any]:
    (state,) = q(
        engine,
        "SELECT s.status, s.error_json FROM node_states s JOIN rows r ON r.row_id = s.row_id "
        "WHERE s.run_id = :run AND r.row_key = :key AND s.node_id = :node",
        run=run_id,
        key=row_key,
        node=node_id,
    )
    assert state["status"] == "failed", state
    return dict(json.loads(state["error_json"]))


def _outcome(engine: Any, run_id: str, row_key: str, branch: str) -> tuple[str, str]:
    (outcome,) = q(
        engine,
        "SELECT o.outcome, o.reason FROM token_outcomes o JOIN tokens t ON t.token_id = o.token_id "
        "JOIN rows r ON r.row_id = t.row_id "
        "WHERE t.run_id = :run AND r.row_key = :key AND t.branch_name = :branch AND o.is_terminal",
        run=run_id,
        key=row_key,
        branch=branch,
    )
    return outcome["outcome"], outcome["reason"]


# ------------------------------------------------------------------------------------------------
# Contracts at run time


@pytest.mark.timeout(240)
def test_an_output_breaking_its_contract_is_a_contract_loss_with_its_value(
    audit_url: str, run_dag: Any
) -> None:
    dag_run, engine, summary, view = run_checked(run_dag, audit_url, "elspeth_it_contract")
    run_id = view.run_id
    bad, absent = f"r{D.BAD_SCORE_ROW}", f"r{D.NO_SCORE_ROW}"
    assert view.per_row() == {k: "branch_lost" if k in (bad, absent) else "merged" for k in ROWS}
    for key in (bad, absent):
        assert view.missing(key)["a"] == "contract:score"  # b, if it answered after, is late
        assert _outcome(engine, run_id, key, "a") == ("lost", "contract:score")
    error = _state_error(engine, run_id, bad, "ask_a")
    assert error["type"] == "ContractViolation"
    assert error["contract"] == {"field": "score", "value": "high", "expected": ["int"], "missing": False}
    assert error["message"] == "field 'score' is str, the contract says int"
    assert _state_error(engine, run_id, absent, "ask_a")["contract"]["missing"] is True
    assert summary["missing_branches"]["a"]["reasons"] == {"contract:score": 2}

    # The merged contract, on the coalesce and in its summary; every merged row keeps it.
    contract = {"fields": {"id": ["str"], "score": ["int"], "label": ["None", "str"]}, "untyped_branches": []}
    assert summary["output_contract"] == contract
    assert D.build_dag(D.SCENARIOS["elspeth_it_contract"]).get_task("coalesce").output_contract() == contract
    merged = xcom(dag_run, "publish")
    assert len(merged) == D.ROW_COUNT - 2
    check = Contract({name: frozenset(kinds) for name, kinds in contract["fields"].items()})
    assert all(check.violation(row) is None for row in merged), merged


# ------------------------------------------------------------------------------------------------
# on_collision


def _collision_params() -> list[Any]:
    return [
        pytest.param(mode, waiting, id=f"{mode}-{waiting}")
        for mode in D.ON_COLLISION
        for waiting in D.WAITING
    ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("on_collision", "waiting"), _collision_params())
def test_on_collision(on_collision: str, waiting: str, audit_url: str, run_dag: Any) -> None:
    dag_run, engine, summary, view = run_checked(
        run_dag, audit_url, D.collision_dag_id(on_collision, waiting)
    )
    assert summary["on_collision"] == on_collision
    assert summary["output_contract"] == {"fields": {}, "untyped_branches": ["a", "b"]}
    assert summary["field_collisions"] == {"value": {"rows": len(EVEN), "branches": ["a", "b"]}}
    merged = {row["id"]: row for row in xcom(dag_run, "publish")}
    if on_collision == "fail_row":
        assert view.per_row() == {k: "field_collision" if k in EVEN else "merged" for k in ROWS}
        assert summary["failure_reasons"] == {"field_collision": len(EVEN)}
        assert sorted(merged) == [k for k in ROWS if k not in EVEN]
        for key in EVEN:
            d = view.decisions[key]
            details = json.loads(d["details_json"])
            # consumed in arrival order; the suppliers of a field in configured order
            assert details["collisions"] == {"value": ["a", "b"]} and sorted(details["consumed"]) == [
                "a",
                "b",
            ]
            assert json.loads(d["collisions_json"]) == {"value": ["a", "b"]}
            assert {b: _outcome(engine, view.run_id, key, b) for b in "ab"} == {
                b: ("row_failed", "field_collision") for b in "ab"
            }
        # explain and the row page: the replay from the stored outputs agrees, and says why.
        assert [r.agrees for r in explain_row(engine, view.run_id, EVEN[0]).replays] == [True]
        audit_run = pick_audit_run(audit_runs(engine, dag_run.dag_id, dag_run.run_id))
        (decision,) = row_view(engine, audit_run, EVEN[0]).decisions
        assert decision.collision_rule == "the row fails (field_collision)"
        assert decision.explanation is not None
        clash = "supplied the same fields ('value' from a, b) and on_collision='fail_row'"
        assert clash in decision.explanation
        return
    winner = "a" if on_collision == "prefer:a" else "b"
    assert view.per_row() == dict.fromkeys(ROWS, "merged")
    assert {k: merged[k]["value"] for k in EVEN} == {k: f"{winner}{k[1:]}" for k in EVEN}
    suppliers = ["b", "a"] if winner == "a" else ["a", "b"]  # the winner listed last
    assert {k: json.loads(view.decisions[k]["collisions_json"]) for k in EVEN} == {
        k: {"value": suppliers} for k in EVEN
    }


# ------------------------------------------------------------------------------------------------
# Parse time


def _dag(dag_id: str) -> DAG:
    return DAG(dag_id=dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False)


def _fork() -> ForkOperator:
    return ForkOperator(task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b", "c"])


def _coalesce(fork: ForkOperator, **kwargs: Any) -> CoalesceSensor:
    return CoalesceSensor(task_id="coalesce", fork=fork, timeout=timedelta(seconds=30), **kwargs)


def test_conflicting_union_contracts_fail_at_parse_time_naming_field_branches_and_steps() -> None:
    with _dag("conflict") as dag:
        fork = _fork()
        steps = [
            BranchOperator(
                task_id="ask_a", fork=fork, branch="a", python_callable=dict, output_fields={"v": int}
            ),
            BranchOperator(task_id="ask_b", fork=fork, branch="b", python_callable=dict),
            BranchOperator(
                task_id="ask_c", fork=fork, branch="c", python_callable=dict, output_fields={"v": str | None}
            ),
        ]
        coalesce = _coalesce(fork, policy="best_effort")
        fork >> steps >> coalesce
    (problem,) = topology.check_dag(dag)
    assert problem == (
        "coalesce 'coalesce' (merge='union'): field 'v' is declared int in branch 'a', None | str in "
        "branch 'c' (steps 'ask_a', 'ask_c'); a union keeps one branch's value, so every branch "
        "supplying a field must declare the same type"
    )
    assert problem in (structure_error(dag) or "")
    from airflow.exceptions import AirflowClusterPolicyViolation

    with pytest.raises(AirflowClusterPolicyViolation, match="field 'v' is declared"):
        dag_policy(dag)


@pytest.mark.parametrize("merge", ["nested", "select"])
def test_contracts_are_only_merged_for_a_union(merge: str) -> None:
    with _dag(f"no_conflict_{merge}") as dag:
        fork = _fork()
        steps = [
            BranchOperator(
                task_id=f"ask_{b}", fork=fork, branch=b, python_callable=dict, output_fields={"v": kind}
            )
            for b, kind in zip("abc", (int, str, float), strict=True)
        ]
        coalesce = _coalesce(
            fork, policy="require_all", merge=merge, select_branch="c" if merge == "select" else None
        )
        fork >> steps >> coalesce
    assert topology.check_dag(dag) == []
    expected = None if merge == "nested" else {"fields": {"v": ["float", "int"]}, "untyped_branches": []}
    assert coalesce.output_contract() == expected


def test_a_bad_contract_fails_the_step_naming_the_field() -> None:
    fork = _fork()
    with pytest.raises(
        ElspethConfigError, match=r"task 'ask_a': output_fields\['when'\]: type <class 'datetime.datetime'>"
    ):
        BranchOperator(
            task_id="ask_a", fork=fork, branch="a", python_callable=dict, output_fields={"when": datetime}
        )
    with pytest.raises(ElspethConfigError, match="on_collision="):
        _coalesce(fork, policy="require_all", on_collision="prefer:z")


WARNED_DAGS = HERE / "warned_dags"
RESCHEDULE_RACE = (
    "coalesce 'coalesce': mode='reschedule' with poke_interval=2s: Airflow's scheduler may fail a "
    "reschedule-mode sensor on the stale executor event of its previous poke (apache/airflow#71172), "
    "more often the shorter the interval; the coalesce retries and resumes, but use poke_interval >= "
    "10s, mode='poke' or deferrable=True"
)
# Every parse-time warning of the DAGs in WARNED_DAGS, each naming its DAG and its task.
EXPECTED_WARNINGS = {
    "warned_require_all.py": [
        "DAG 'warned_require_all': coalesce 'coalesce' (require_all) joins branch 'a', whose step "
        "'filter_a' may drop rows (may_drop=True): every row it drops fails the coalesce (branch_lost)",
        "DAG 'warned_require_all': coalesce 'coalesce' (require_all) joins branch 'b', whose earlier step "
        "'prep_b' has no row_retries: one error there loses the row on the branch, and so fails it "
        "(branch_lost)",
    ],
    "warned_reschedule_two_dags.py": [
        f"DAG 'warned_reschedule_first': {RESCHEDULE_RACE}",
        f"DAG 'warned_reschedule_require_all': {RESCHEDULE_RACE}",
        "DAG 'warned_reschedule_require_all': coalesce 'coalesce' (require_all) joins branch 'b', whose "
        "step 'ask_b' may drop rows (may_drop=True): every row it drops fails the coalesce (branch_lost)",
    ],
}


def test_dags_certain_to_fail_rows_or_racing_reschedules_import_with_warnings() -> None:
    from airflow.dag_processing.dagbag import DagBag

    with pytest.warns(ElspethDagWarning) as warned:
        bag = DagBag(dag_folder=str(WARNED_DAGS), safe_mode=False)
    assert not bag.import_errors
    assert set(bag.dags) == {
        "warned_require_all",
        "warned_reschedule_first",
        "warned_reschedule_require_all",
    }
    ours = [w for w in warned if w.category is ElspethDagWarning]
    # Attributed to the DAG file, where the author looks; each once.
    for name, expected in EXPECTED_WARNINGS.items():
        issued = [str(w.message) for w in ours if w.filename == str(WARNED_DAGS / name)]
        assert sorted(issued) == sorted(expected), name
    assert len(ours) == sum(map(len, EXPECTED_WARNINGS.values()))


def test_each_parse_time_warning_is_written_once_where_airflow_logs() -> None:
    """Parsed as the DAG processor and a task's process parse a file (Airflow's logging configured,
    which writes Python warnings to the log): every warning appears once, naming its DAG."""
    import subprocess
    import sys

    script = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(WARNED_DAGS)!r}, safe_mode=False)\n"
        "assert not bag.import_errors, bag.import_errors\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for expected in EXPECTED_WARNINGS.values():
        for message in expected:
            assert output.count(message) == 1, f"{output.count(message)} times: {message}\n{output}"


def test_no_warning_without_require_all_or_with_retries() -> None:
    with _dag("quiet") as dag:
        fork = _fork()
        prep = BranchOperator(task_id="prep_a", fork=fork, branch="a", python_callable=dict, row_retries=1)
        steps = [
            BranchOperator(task_id=f"ask_{b}", fork=fork, branch=b, python_callable=dict, may_drop=b == "c")
            for b in "abc"
        ]
        fork >> [prep, *steps[1:]]
        prep >> steps[0]
        best_effort = _coalesce(fork, policy="best_effort")
        steps >> best_effort
    assert topology.dag_warnings(dag) == []  # may_drop before a best_effort coalesce is expected
    with _dag("loud") as dag:
        fork = _fork()
        prep = BranchOperator(task_id="prep_a", fork=fork, branch="a", python_callable=dict, row_retries=1)
        steps = [BranchOperator(task_id=f"ask_{b}", fork=fork, branch=b, python_callable=dict) for b in "abc"]
        fork >> [prep, *steps[1:]]
        prep >> steps[0]
        steps >> _coalesce(fork, policy="require_all")
    assert topology.dag_warnings(dag) == []  # the earlier step retries its rows


def test_a_fail_row_union_whose_contracts_share_a_field_warns_that_every_row_fails() -> None:
    """Two contracts declaring one field (alike, so no conflict) under ``on_collision="fail_row"``:
    every row merging both branches is certain to fail ``field_collision``."""
    fields = {"a": {"id": str, "score": float}, "b": {"id": str, "label": str}, "c": None}

    def build(dag_id: str, on_collision: str) -> DAG:
        with _dag(dag_id) as dag:
            fork = _fork()
            steps = [
                BranchOperator(
                    task_id=f"ask_{b}", fork=fork, branch=b, python_callable=dict, output_fields=declared
                )
                for b, declared in fields.items()
            ]
            fork >> steps
            steps >> _coalesce(fork, policy="best_effort", merge="union", on_collision=on_collision)
        return dag

    assert topology.check_dag(build("shared_field", "fail_row")) == []
    assert topology.dag_warnings(build("shared_field", "fail_row")) == [
        "coalesce 'coalesce' (on_collision='fail_row'): branches 'a', 'b' all declare field 'id', so "
        "every row merging them fails (field_collision); drop the field from all but one contract, or "
        "choose on_collision='prefer:<branch>'"
    ]
    assert topology.dag_warnings(build("preferred", "prefer:a")) == []
    assert topology.dag_warnings(build("recorded", "record")) == []
