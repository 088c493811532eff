"""`airflow backfill create` over five logical dates, three runs at a time, every run writing to the
one PostgreSQL audit database; then `--reprocess-behavior failed` re-runs the failed date in place."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from e2e_harness import AirflowStack, AuditDB, verify_clean, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(600)]

DAG_ID = "e2e_backfill"
DAYS = ["2025-03-01", "2025-03-02", "2025-03-03", "2025-03-04", "2025-03-05"]
FAIL_DAY = "2025-03-03"
ROWS = 8
BRANCHES = ("left", "right")


def _day(run: dict) -> str:
    return str(run["logical_date"])[:10]


def _backfill(stack: AirflowStack, *extra: str) -> None:
    stack.cli(
        "backfill",
        "create",
        "--dag-id",
        DAG_ID,
        "--from-date",
        DAYS[0],
        "--to-date",
        DAYS[-1],
        "--max-active-runs",
        "3",
        *extra,
        timeout=180,
    )


def _wait_backfills_done(stack: AirflowStack, timeout: float) -> list[dict]:
    def done() -> list[dict] | None:
        backfills = stack.api("GET", f"/api/v2/backfills?dag_id={DAG_ID}")["backfills"]
        return backfills if backfills and all(b["completed_at"] for b in backfills) else None

    return list(wait_until("the backfill to complete", done, timeout=timeout, interval=2))


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def _run_footprint(audit: AuditDB, run_id: str) -> dict:
    """Everything recorded for one audit run, to compare before and after the reprocess."""
    footprint = {}
    for table in (
        "rows",
        "tokens",
        "node_states",
        "token_outcomes",
        "coalesce_decisions",
        "nodes",
        "chunk_progress",
    ):
        footprint[table] = audit.scalar(f"SELECT count(*) FROM {table} WHERE run_id = :r", r=run_id)
    footprint["decisions"] = sorted(
        (d["key"], d["decision"], d["failure_reason"], str(d["decided_at"])) for d in audit.decisions(run_id)
    )
    footprint["run"] = {
        k: str(v) for k, v in audit.one("SELECT * FROM runs WHERE run_id = :r", r=run_id).items()
    }
    return footprint


def _check_run_is_its_own(audit: AuditDB, run: dict) -> None:
    """Rows, tokens, states, outcomes and decisions of an audit run all belong to it and its date."""
    run_id, day = run["run_id"], _day(run)
    bodies = audit.all(
        "SELECT r.row_key, p.body FROM rows r JOIN payloads p ON p.hash = r.payload_ref WHERE r.run_id = :r",
        r=run_id,
    )
    assert len(bodies) == ROWS and {json.loads(b["body"])["day"] for b in bodies} == {day}
    assert sorted(b["row_key"] for b in bodies) == [f"r{n}" for n in range(ROWS)]  # no duplicate row
    kinds = {
        k["token_kind"]: k["n"]
        for k in audit.all(
            "SELECT token_kind, count(*) AS n FROM tokens WHERE run_id = :r GROUP BY token_kind", r=run_id
        )
    }
    merged = audit.scalar(
        "SELECT count(*) FROM coalesce_decisions WHERE run_id = :r AND decision = 'merged'", r=run_id
    )
    assert kinds == {"source": ROWS, "branch": ROWS * 2, **({"merged": merged} if merged else {})}
    for table in ("node_states", "token_outcomes"):
        strays = audit.scalar(
            f"SELECT count(*) FROM {table} x JOIN tokens t ON t.token_id = x.token_id "
            "WHERE x.run_id = :r AND t.run_id <> x.run_id",
            r=run_id,
        )
        assert strays == 0, f"{table} of run {run_id} reference another run's tokens"
    strays = audit.scalar(
        "SELECT count(*) FROM coalesce_decisions d "
        "LEFT JOIN rows r ON r.run_id = d.run_id AND r.row_id = d.row_id "
        "WHERE d.run_id = :r AND r.row_id IS NULL",
        r=run_id,
    )
    assert strays == 0
    for body in audit.all(
        "SELECT p.body FROM node_states s JOIN payloads p ON p.hash = s.output_ref WHERE s.run_id = :r",
        r=run_id,
    ):
        assert json.loads(body["body"])["day"] == day  # branch outputs and merged rows of this date only


def test_backfill_five_dates_concurrently_then_reprocess_the_failed_one(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack = airflow_stack
    stack.wait_dag(DAG_ID)
    stack.unpause(DAG_ID)

    _backfill(stack)
    seen_running: set[int] = set()

    def all_ended() -> list[dict] | None:
        runs = stack.dag_runs(DAG_ID)
        seen_running.add(sum(r["state"] == "running" for r in runs))
        if len(runs) == len(DAYS) and all(r["state"] in ("success", "failed") for r in runs):
            return runs
        return None

    runs = wait_until("the five backfill runs to end", all_ended, timeout=360, interval=1)
    states = {r["logical_date"][:10]: r["state"] for r in runs}
    assert states == {day: ("failed" if day == FAIL_DAY else "success") for day in DAYS}, states
    assert all(r["run_type"] == "backfill" for r in runs)
    assert max(seen_running) >= 2, f"runs never overlapped: {seen_running}"
    assert max(seen_running) <= 3, "more than --max-active-runs at once"

    # -- one audit run per Airflow run, each with its own rows, tokens and decisions -------------
    audit_runs = audit.runs_of(DAG_ID)
    assert len(audit_runs) == len(DAYS)
    by_airflow_run = {r["dag_run_id"]: r for r in runs}
    assert {a["airflow_run_id"] for a in audit_runs} == set(by_airflow_run)
    for a in audit_runs:
        assert _day(a) == by_airflow_run[a["airflow_run_id"]]["logical_date"][:10]
        assert a["run_type"] == "backfill", a["run_type"]
        assert a["try_number"] == 1 and a["status"] == "completed"
        _check_run_is_its_own(audit, a)
        decisions = audit.decisions(a["run_id"])
        assert len(decisions) == ROWS
        if _day(a) == FAIL_DAY:
            assert {(d["decision"], d["failure_reason"]) for d in decisions} == {("failed", "branch_lost")}
            for d in decisions:  # decided at right's loss: left arrived before it, after it, or not yet
                assert d["missing_json"]["right"] == "error:UpstreamOutage", d
                assert d["missing_json"].get("left", "not_arrived") in (
                    "not_arrived",
                    "late_arrival_after_failure",
                ), d
        else:
            assert all(
                d["decision"] == "merged" and sorted(d["consumed"]) == sorted(BRANCHES) for d in decisions
            )
    # the runs wrote to the audit DB at the same time, not one after another
    spans = []
    for a in audit_runs:
        last = audit.scalar(
            "SELECT max(recorded_at) FROM coalesce_decisions WHERE run_id = :r", r=a["run_id"]
        )
        spans.append((a["started_at"], last))
    assert _max_overlap(spans) >= 2, spans
    verify_clean(stack, audit, "--dag-id", DAG_ID)

    # -- reprocess the failed date: same Airflow run, cleared in place -> a new, linked audit run --
    failed_run = next(r for r in runs if r["state"] == "failed")
    earlier = audit.run_of(DAG_ID, failed_run["dag_run_id"])
    before = _run_footprint(audit, earlier["run_id"])
    others_before = {a["run_id"]: _run_footprint(audit, a["run_id"]) for a in audit_runs if a != earlier}
    (stack.state_dir / DAG_ID).mkdir(parents=True, exist_ok=True)
    (stack.state_dir / DAG_ID / "fixed").touch()  # the outage is over
    _wait_backfills_done(stack, timeout=120)  # one active backfill per DAG at a time
    reprocess_started = datetime.now(timezone.utc)
    _backfill(stack, "--reprocess-behavior", "failed")

    def reprocessed() -> dict | None:
        run = stack.dag_run(DAG_ID, failed_run["dag_run_id"])
        started = run.get("start_date")
        fresh = started and datetime.fromisoformat(started.replace("Z", "+00:00")) >= reprocess_started
        return run if fresh and run["state"] in ("success", "failed") else None

    rerun = wait_until("the failed date to be reprocessed", reprocessed, timeout=240, interval=1)
    assert rerun["state"] == "success", stack.task_states(DAG_ID, failed_run["dag_run_id"])
    assert len(stack.dag_runs(DAG_ID)) == len(DAYS), "reprocessing must clear in place, not add a run"

    latest = audit.run_of(DAG_ID, failed_run["dag_run_id"])
    assert latest["run_id"] != earlier["run_id"]
    assert latest["airflow_run_id"] == earlier["airflow_run_id"]  # the same run_id, cleared in place
    assert latest["try_number"] == earlier["try_number"] + 1  # a new fork try
    assert latest["clear_number"] == earlier["clear_number"] + 1
    assert latest["previous_run_id"] == earlier["run_id"]
    assert latest["status"] == "completed"
    _check_run_is_its_own(audit, latest)
    decisions = audit.decisions(latest["run_id"])
    assert len(decisions) == ROWS and all(d["decision"] == "merged" for d in decisions)
    # the earlier run's record is intact, and nothing else was touched
    assert _run_footprint(audit, earlier["run_id"]) == before
    for run_id, footprint in others_before.items():
        assert _run_footprint(audit, run_id) == footprint
    assert len(audit.runs_of(DAG_ID)) == len(DAYS) + 1
    verify_clean(stack, audit, "--dag-id", DAG_ID)
