"""DAG shapes beyond one fork and one coalesce: chunk-mapped branches, a nested fork over merged rows;
and what must fail: invalid coalesce configurations at import, bad input rows at the fork."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.read.records import AuditRun
from airflow_elspeth.audit.read.verify import verify_run as verify_audit_run

from .checks import (
    audit_runs,
    check_coalesce,
    check_run_integrity,
    check_summary,
    only_run,
    q,
    ti_states,
    xcom,
)
from .support import DAGS_DIR, INVALID_DAGS_DIR, dag_module, patched_env
from .test_policies import verify_run

pytestmark = pytest.mark.integration

M = dag_module()
ALL_ROWS = [M.row_key(n) for n in range(M.ROW_COUNT)]


# ------------------------------------------------------------------------------------------------
# Import time


def _dagbag(folder: Any) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    # Airflow 3.3's DagBag has no include_examples (examples come from a bundle of their own).
    return DagBag(dag_folder=str(folder), safe_mode=False)


# file -> the task it fails, and what else the import error must name (the parameter and the bad value)
INVALID = {
    "invalid_quorum_out_of_range.py": ("coalesce", ["quorum must be an integer in 1..3, got 5"]),
    "invalid_quorum_missing.py": ("coalesce", ["quorum is required"]),
    "invalid_select_without_branch.py": ("coalesce", ["select_branch is required"]),
    "invalid_select_unknown_branch.py": ("coalesce", ["select_branch", "'d'"]),
    "invalid_timeout.py": ("coalesce", ["timeout must be positive"]),
    "invalid_coalesce_branches.py": ("coalesce", ["branches", "'z'"]),
    "invalid_duplicate_branches.py": ("fork", ["branches", "duplicate", "'a'"]),
    "invalid_timeout_overflow.py": ("coalesce", ["overflow a date", "timeout="]),
    "invalid_fork_wait_negative.py": ("coalesce", ["fork_wait_timeout must be a timedelta >= 0"]),
    "invalid_row_retry_delay_negative.py": ("ask_a", ["row_retry_delay", "-1"]),
    "invalid_policy_in_group.py": (
        "consensus.vote",
        ["policy must be one of ['require_all', 'quorum', 'best_effort', 'first'], got 'majority'"],
    ),
    "invalid_fork_rows_not_dicts.py": ("fork", ["rows: row at index 0 is not a JSON object (got str)"]),
}


@pytest.mark.timeout(120)
def test_invalid_configurations_fail_at_import_naming_dag_task_and_parameter() -> None:
    """The message itself names the DAG and the task: Airflow cuts the import error's traceback to
    its last frames, the provider's, so the DAG file's line may not be shown."""
    bag = _dagbag(INVALID_DAGS_DIR)
    errors = {str(path).rsplit("/", 1)[-1]: message for path, message in bag.import_errors.items()}
    assert set(errors) == set(INVALID), errors
    assert not bag.dags, f"invalid DAGs were loaded: {list(bag.dags)}"
    for name, (task_id, needles) in INVALID.items():
        last_line = errors[name].strip().splitlines()[-1]
        dag_id = name.removesuffix(".py")
        assert last_line.startswith(
            f"airflow_elspeth.exceptions.ElspethConfigError: DAG {dag_id!r}, task {task_id!r}: "
        ), last_line
        for needle in needles:
            assert needle in last_line, f"{name}: {needle!r} not in {last_line!r}"


@pytest.mark.timeout(120)
def test_the_test_dags_import_cleanly() -> None:
    with patched_env():
        bag = _dagbag(DAGS_DIR)
    assert not bag.import_errors, bag.import_errors
    assert set(M.SCENARIOS) <= set(bag.dag_ids)


# ------------------------------------------------------------------------------------------------
# Bad input rows


BAD_ROWS = {
    # kind -> what the fork's error names
    "duplicate_key": ["duplicate row key 'r1'", "index 4"],
    "not_a_dict": ["row at index 4", "not a JSON object"],
    "nan": ["row 'r5'", "canonical JSON"],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_rows_fail_the_fork_naming_the_row_and_leave_nothing_half_written(
    kind: str, audit_url: str, run_dag: Any
) -> None:
    """The bad row comes after a whole chunk (chunk_size=2) was written: it is removed again."""
    spec = M.SCENARIOS[f"elspeth_it_bad_rows_{kind}"]
    M.FORK_ERRORS.pop(spec.dag_id, None)
    dag_run = run_dag(M.build_dag(spec), audit_url)
    states = ti_states(dag_run)
    assert states["fork"] == "failed", states
    assert {states[f"ask_{b}"] for b in M.BRANCHES} == {"upstream_failed"}
    assert states["coalesce"] == "failed"  # "fork ended failed without an audit run"
    message = M.FORK_ERRORS[spec.dag_id]
    for needle in BAD_ROWS[kind]:
        assert needle in message, message
    assert "nothing of audit run" in message

    engine = engine_for_url(audit_url)
    (run,) = audit_runs(engine, dag_run.dag_id, dag_run.run_id)
    assert run["status"] == "failed" and run["rows_total"] == 0, run
    for table in ("rows", "tokens", "token_outcomes", "node_states", "coalesce_decisions", "chunk_progress"):
        left = q(engine, f"SELECT COUNT(*) AS n FROM {table} WHERE run_id = :r", r=run["run_id"])[0]["n"]
        assert left == 0, f"{left} {table} rows left for the failed fork"
    parents = q(
        engine,
        "SELECT COUNT(*) AS n FROM token_parents p WHERE NOT EXISTS"
        " (SELECT 1 FROM tokens t WHERE t.token_id = p.token_id)",
    )[0]["n"]
    assert parents == 0
    assert xcom(dag_run, "fork", "audit_run") is None


# ------------------------------------------------------------------------------------------------
# Chunk-mapped branches


@pytest.mark.timeout(180)
def test_a_failed_map_index_loses_its_chunk_only(audit_url: str, run_dag: Any) -> None:
    """ask_b is mapped over the fork's 3 chunks (2 rows each); map index 1 fails (its rows error,
    max_failed_rows=0): only r2 and r3 lose b (branch_task_failed), the other chunks merge."""
    spec = M.SCENARIOS["elspeth_it_mapped_chunk_fails"]
    dag_run = run_dag(M.build_dag(spec), audit_url)
    engine = engine_for_url(audit_url)
    view, summary, states = verify_run(engine, dag_run, spec)

    assert xcom(dag_run, "fork") == [0, 1, 2]  # fork.chunks: what the branch expanded over
    assert {k: v for k, v in states.items() if k.startswith("ask_b")} == {
        "ask_b[0]": "success",
        "ask_b[1]": "failed",
        "ask_b[2]": "success",
    }
    assert view.per_row() == {**dict.fromkeys(ALL_ROWS, "merged"), "r2": "branch_lost", "r3": "branch_lost"}
    for key in ("r2", "r3"):
        assert view.missing(key) == {"b": "branch_task_failed"}
    assert summary["missing_branches"] == {"b": {"rows": 2, "reasons": {"branch_task_failed": 2}}}
    losses = q(
        engine,
        "SELECT node_id, chunk, task_state FROM branch_task_losses"
        " WHERE run_id = :r AND task_state <> 'success'",
        r=view.run_id,
    )
    assert losses == [{"node_id": "ask_b", "chunk": 1, "task_state": "failed"}]
    # Each map index processed its own chunk: b's states of chunks 0 and 2 are arrivals.
    chunks = q(
        engine,
        "SELECT chunk, status, COUNT(*) AS n FROM node_states WHERE run_id = :r AND node_id = 'ask_b'"
        " GROUP BY chunk, status ORDER BY chunk",
        r=view.run_id,
    )
    assert [(c["chunk"], c["status"], c["n"]) for c in chunks] == [
        (0, "completed", 2),
        (1, "aborted", 2),
        (2, "completed", 2),
    ]


@pytest.mark.timeout(180)
def test_two_mapped_branches_losing_the_same_chunk_under_best_effort(audit_url: str, run_dag: Any) -> None:
    spec = M.SCENARIOS["elspeth_it_mapped_best_effort"]
    dag_run = run_dag(M.build_dag(spec), audit_url)
    engine = engine_for_url(audit_url)
    view, _summary, states = verify_run(engine, dag_run, spec)

    assert states["ask_a[2]"] == states["ask_b[2]"] == "failed"
    assert view.per_row() == dict.fromkeys(ALL_ROWS, "merged")
    for key in ("r4", "r5"):
        assert view.decisions[key]["consumed"] == ["c"]
        assert view.missing(key) == {"a": "branch_task_failed", "b": "branch_task_failed"}
    for key in ("r0", "r1", "r2", "r3"):
        assert set(view.decisions[key]["consumed"]) == {"a", "b", "c"}


# ------------------------------------------------------------------------------------------------
# Multi-step branches and row retries


@pytest.mark.timeout(180)
def test_losses_at_an_earlier_step_and_row_retries(audit_url: str, run_dag: Any) -> None:
    spec = M.SCENARIOS["elspeth_it_chain_and_row_retries"]
    dag_run = run_dag(M.build_dag(spec), audit_url)
    engine = engine_for_url(audit_url)
    view, summary, _states = verify_run(engine, dag_run, spec)

    assert view.per_row() == dict.fromkeys(ALL_ROWS, "merged")
    assert view.missing("r1") == {"c": "dropped"}
    assert view.missing("r2") == {"c": "error:ValueError"}
    assert view.missing("r4") == {"a": "error:ValueError"}
    assert set(view.decisions["r3"]["consumed"]) == {"a", "b", "c"}
    states = {
        (s["node_id"], s["row_key"]): s
        for s in q(
            engine,
            "SELECT s.node_id, r.row_key, s.status, s.error_json, s.context_json FROM node_states s"
            " JOIN rows r ON r.run_id = s.run_id AND r.row_id = s.row_id WHERE s.run_id = :r",
            r=view.run_id,
        )
    }
    # The delivering step keeps the earlier step's loss, with its reason and error.
    assert states[("prep_c", "r1")]["status"] == states[("ask_c", "r1")]["status"] == "dropped"
    assert states[("prep_c", "r2")]["status"] == states[("ask_c", "r2")]["status"] == "failed"
    lost = json.loads(states[("ask_c", "r2")]["error_json"])
    assert lost["type"] == "ValueError" and lost["lost_at_previous_step"] is True
    # b's r3 failed once, then its row retry delivered; a's r4 failed all 1 + 2 attempts.
    assert states[("ask_b", "r3")]["status"] == "completed"
    assert json.loads(states[("ask_b", "r3")]["context_json"])["attempts"] == 2
    error = json.loads(states[("ask_a", "r4")]["error_json"])
    assert error["type"] == "ValueError" and error["attempts"] == 3 and "cannot answer r4" in error["message"]
    assert summary["missing_branches"] == {
        "a": {"rows": 1, "reasons": {"error:ValueError": 1}},
        "c": {"rows": 2, "reasons": {"dropped": 1, "error:ValueError": 1}},
    }


@pytest.mark.timeout(180)
def test_a_branch_whose_first_step_fails_wholesale(audit_url: str, run_dag: Any) -> None:
    spec = M.SCENARIOS["elspeth_it_prep_fails"]
    dag_run = run_dag(M.build_dag(spec), audit_url)
    engine = engine_for_url(audit_url)
    view, _summary, states = verify_run(engine, dag_run, spec)
    assert (states["prep_c"], states["ask_c"]) == ("failed", "upstream_failed")
    assert view.per_row() == dict.fromkeys(ALL_ROWS, "merged")
    for key in ALL_ROWS:
        assert set(view.decisions[key]["consumed"]) == {"a", "b"}
        assert view.missing(key) == {"c": "branch_task_upstream_failed"}


# ------------------------------------------------------------------------------------------------
# Two coalesces on one fork; no rows at all


@pytest.mark.timeout(180)
def test_two_coalesces_on_one_fork_each_get_every_branch_they_join(audit_url: str, run_dag: Any) -> None:
    """coalesce_ab ("first" over a and b) decides every row before c's delivering step runs; c must
    still process those rows, because the require_all coalesce joins c and has not decided them."""
    spec = M.SCENARIOS["elspeth_it_two_coalesces"]
    dag_run = run_dag(M.build_dag(spec), audit_url)
    engine = engine_for_url(audit_url)
    view, summary, states = verify_run(engine, dag_run, spec)
    quick = check_coalesce(engine, view.run, "coalesce_ab")
    check_summary(xcom(dag_run, "coalesce_ab", "coalesce_summary"), quick)
    assert states["coalesce_ab"] == "success"
    assert quick.per_row() == dict.fromkeys(ALL_ROWS, "merged")
    assert states["ask_c"] == "success"
    assert view.per_row() == dict.fromkeys(ALL_ROWS, "merged"), summary["failed_rows"]
    for d in view.decisions.values():
        assert set(d["consumed"]) == {"a", "b", "c"}
    assert summary["late_arrivals"] == 0 and summary["missing_branches"] == {}


@pytest.mark.timeout(180)
def test_a_fork_without_rows(audit_url: str, run_dag: Any) -> None:
    spec = M.SCENARIOS["elspeth_it_empty"]
    dag_run = run_dag(M.build_dag(spec), audit_url)
    engine = engine_for_url(audit_url)
    states = ti_states(dag_run)
    run = only_run(engine, dag_run)
    assert (run["status"], run["rows_total"], run["chunks_total"]) == ("completed", 0, 0)
    assert xcom(dag_run, "fork") == []
    assert states["coalesce"] == "success", states
    summary = xcom(dag_run, "coalesce", "coalesce_summary")
    assert (summary["rows_total"], summary["rows_merged"], summary["rows_failed"]) == (0, 0, 0)
    assert xcom(dag_run, "publish") == []


# ------------------------------------------------------------------------------------------------
# A fork over merged rows


@pytest.mark.timeout(180)
def test_a_nested_fork_over_merged_rows_keeps_the_lineage(audit_url: str, run_dag: Any) -> None:
    spec = M.SCENARIOS["elspeth_it_nested"]
    dag_run = run_dag(M.build_dag(spec), audit_url)
    engine = engine_for_url(audit_url)
    view, _summary, states = verify_run(engine, dag_run, spec)
    assert view.per_row() == dict.fromkeys(ALL_ROWS, "merged")

    inner = only_run(engine, dag_run, "fork2")
    assert inner["status"] == "completed" and inner["rows_total"] == M.ROW_COUNT
    check_run_integrity(engine, inner["run_id"])
    inner_view = check_coalesce(engine, inner, "coalesce2")
    inner_summary = xcom(dag_run, "coalesce2", "coalesce_summary")
    check_summary(inner_summary, inner_view)
    assert states["coalesce2"] == "success"
    assert inner_view.per_row() == dict.fromkeys(ALL_ROWS, "merged")

    # Each source token of the inner run has one parent: the outer coalesce's merged token of the
    # same row, whose merged output is the inner row.
    sources = q(
        engine,
        "SELECT r.row_key, t.token_id, r.payload_ref FROM tokens t JOIN rows r"
        " ON r.run_id = t.run_id AND r.row_id = t.row_id"
        " WHERE t.run_id = :r AND t.token_kind = 'source'",
        r=inner["run_id"],
    )
    assert sorted(s["row_key"] for s in sources) == ALL_ROWS
    for source in sources:
        parents = q(
            engine,
            "SELECT parent_token_id, ordinal FROM token_parents WHERE token_id = :t",
            t=source["token_id"],
        )
        outer = view.decisions[source["row_key"]]
        assert parents == [{"parent_token_id": outer["merged_token_id"], "ordinal": 0}]
        merged_ref = q(
            engine,
            "SELECT output_ref FROM node_states WHERE token_id = :t AND node_id = 'coalesce'",
            t=outer["merged_token_id"],
        )[0]["output_ref"]
        assert source["payload_ref"] == merged_ref  # the inner row is the outer merged row
    # The merged rows the inner coalesce publishes carry both passes.
    inner_rows = q(
        engine,
        "SELECT p.body FROM coalesce_decisions d JOIN node_states s ON s.token_id = d.merged_token_id"
        " JOIN payloads p ON p.hash = s.output_ref WHERE d.run_id = :r AND d.node_id = 'coalesce2'",
        r=inner["run_id"],
    )
    for row in inner_rows:
        assert set(json.loads(row["body"])) == {"x", "y"}
    # ``verify`` finds every link of both runs whole, the stored and the derived ones.
    for run in (only_run(engine, dag_run), inner):
        assert verify_audit_run(engine, AuditRun.from_row(run)) == []
