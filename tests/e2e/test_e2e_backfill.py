"""The README's backfill story on the real scheduler: `airflow backfill create` of the enrichment
example (tests/e2e/dags/e2e_backfill.py runs dags/example_enrichment_require_all.py as it is) over
five logical dates, three runs at a time, every run writing to the one PostgreSQL audit database. The
example's two outage days fail, every row with the reason in the audit trail; then
`--reprocess-behavior failed` re-runs exactly those two in place, and they succeed."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from e2e_harness import AirflowStack, AuditDB, verify_clean, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(600)]

DAG_ID = "e2e_backfill"
DAYS = ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04", "2026-11-05"]
OUTAGE_DAYS = {"2026-11-03", "2026-11-04"}  # dags/example_enrichment_require_all.py OUTAGE_DAYS
ROWS = 40
CUSTOMERS = [f"C{n:04d}" for n in range(1, ROWS + 1)]
NOT_FOUND = ["C0010", "C0030"]  # its UNKNOWN_POSTCODES: failed on every run, within the tolerance
BRANCHES = ("credit", "address", "churn")


def note(message: str) -> None:
    """Observations for the report (shown with ``-s``)."""
    print(f"BACKFILL: {message}")


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
    assert len(bodies) == ROWS and {json.loads(b["body"])["as_of"] for b in bodies} == {day}
    assert sorted(b["row_key"] for b in bodies) == CUSTOMERS  # no duplicate row
    kinds = {
        k["token_kind"]: k["n"]
        for k in audit.all(
            "SELECT token_kind, count(*) AS n FROM tokens WHERE run_id = :r GROUP BY token_kind", r=run_id
        )
    }
    merged = audit.scalar(
        "SELECT count(*) FROM coalesce_decisions WHERE run_id = :r AND decision = 'merged'", r=run_id
    )
    assert kinds == {"source": ROWS, "branch": ROWS * len(BRANCHES), **({"merged": merged} if merged else {})}
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


def _check_ordinary_day(audit: AuditDB, run_id: str) -> None:
    """38 customers merged from every branch; the two without an address failed, and why."""
    decisions = audit.decisions(run_id)
    assert sorted(d["key"] for d in decisions) == CUSTOMERS
    for d in decisions:
        if d["key"] in NOT_FOUND:
            assert (d["decision"], d["failure_reason"]) == ("failed", "branch_lost"), d
            assert d["missing_json"]["address"] == "error:AddressNotFound", d
        else:
            assert d["decision"] == "merged" and sorted(d["consumed"]) == sorted(BRANCHES), d


def _check_outage_day(audit: AuditDB, run_id: str) -> None:
    """Every row failed: its address lookup timed out, the reason and message in the trail."""
    decisions = audit.decisions(run_id)
    assert sorted(d["key"] for d in decisions) == CUSTOMERS
    for d in decisions:
        assert (d["decision"], d["failure_reason"]) == ("failed", "branch_lost"), d
        missing = dict(d["missing_json"])
        assert missing.pop("address") == "error:TimeoutError", d
        # credit and churn arrived before the loss, or answered after it, or not yet
        assert set(missing.values()) <= {"not_arrived", "late_arrival_after_failure"}, d
    errors = audit.all(
        "SELECT DISTINCT error_json FROM node_states WHERE run_id = :r AND node_id = 'lookup_address'",
        r=run_id,
    )
    assert [(e["type"], e["message"]) for e in (json.loads(r["error_json"]) for r in errors)] == [
        ("TimeoutError", "address-service: read timed out after 5 s")
    ]


def _compact_report(stack: AirflowStack) -> dict[tuple[str, int], str]:
    """What `airflow-elspeth report --compact` says per (logical date, fork try): "merged/failed/undecided
    state" of the coalesce."""
    text = stack.elspeth("report", "--dag-id", DAG_ID, "--compact", check=True).stdout
    note(text)
    lines = {}
    for line in text.splitlines():
        parts = line.split()  # date, time, DAG, try, coalesce, counts, state
        if parts and parts[0] in DAYS:
            assert (parts[2], parts[4]) == (DAG_ID, "enriched"), line
            lines[(parts[0], int(parts[3]))] = f"{parts[5]} {parts[6]}"
    return lines


def test_backfill_five_dates_concurrently_then_reprocess_the_failed_ones(
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
    assert states == {day: ("failed" if day in OUTAGE_DAYS else "success") for day in DAYS}, states
    assert all(r["run_type"] == "backfill" for r in runs)
    assert max(seen_running) >= 2, f"runs never overlapped: {seen_running}"
    assert max(seen_running) <= 3, "more than --max-active-runs at once"
    for run in runs:  # an outage day fails at its coalesce, and what reads its rows never runs
        tis = stack.task_states(DAG_ID, run["dag_run_id"])
        outage = _day(run) in OUTAGE_DAYS
        assert (tis["enriched"], tis["publish"]) == (
            ("failed", "upstream_failed") if outage else ("success", "success")
        ), tis
        assert tis["enriched_finalize"] == "success", tis

    # -- one audit run per Airflow run, each with its own rows, tokens and decisions -------------
    audit_runs = audit.runs_of(DAG_ID)
    assert len(audit_runs) == len(DAYS)
    by_airflow_run = {r["dag_run_id"]: r for r in runs}
    assert {a["airflow_run_id"] for a in audit_runs} == set(by_airflow_run)
    for a in audit_runs:
        assert _day(a) == by_airflow_run[a["airflow_run_id"]]["logical_date"][:10]
        assert a["run_type"] == "backfill", a["run_type"]
        assert a["try_number"] == 1 and a["clear_number"] == 0 and a["status"] == "completed"
        _check_run_is_its_own(audit, a)
        (_check_outage_day if _day(a) in OUTAGE_DAYS else _check_ordinary_day)(audit, a["run_id"])
    # the runs wrote to the audit DB at the same time, not one after another
    spans = []
    for a in audit_runs:
        last = audit.scalar(
            "SELECT max(recorded_at) FROM coalesce_decisions WHERE run_id = :r", r=a["run_id"]
        )
        spans.append((a["started_at"], last))
    assert _max_overlap(spans) >= 2, spans
    verify_clean(stack, audit, "--dag-id", DAG_ID)
    assert _compact_report(stack) == {
        (day, 1): "0/40/0 rows_failed" if day in OUTAGE_DAYS else "38/2/0 rows_failed" for day in DAYS
    }
    outage_run = next(a for a in audit_runs if _day(a) in OUTAGE_DAYS)
    explained = stack.elspeth("explain", "C0001", "--run-id", outage_run["run_id"], check=True).stdout
    assert "TimeoutError: address-service: read timed out after 5 s" in explained, explained

    # -- reprocess the failed dates: the same Airflow runs, cleared in place -> new, linked audit runs
    failed_runs = [r for r in runs if r["state"] == "failed"]
    earlier = {r["dag_run_id"]: audit.run_of(DAG_ID, r["dag_run_id"]) for r in failed_runs}
    before = {run_id: _run_footprint(audit, a["run_id"]) for run_id, a in earlier.items()}
    failed_audit_runs = {a["run_id"] for a in earlier.values()}
    others_before = {
        a["run_id"]: _run_footprint(audit, a["run_id"])
        for a in audit_runs
        if a["run_id"] not in failed_audit_runs
    }
    _wait_backfills_done(stack, timeout=120)  # one active backfill per DAG at a time
    reprocess_started = datetime.now(timezone.utc)
    _backfill(stack, "--reprocess-behavior", "failed")

    def reprocessed() -> list[dict] | None:
        reruns = [stack.dag_run(DAG_ID, r["dag_run_id"]) for r in failed_runs]
        for run in reruns:
            started = run.get("start_date")
            fresh = started and datetime.fromisoformat(started.replace("Z", "+00:00")) >= reprocess_started
            if not (fresh and run["state"] in ("success", "failed")):
                return None
        return reruns

    reruns = wait_until("the failed dates to be reprocessed", reprocessed, timeout=240, interval=1)
    for rerun in reruns:
        assert rerun["state"] == "success", stack.task_states(DAG_ID, rerun["dag_run_id"])
    runs_now = stack.dag_runs(DAG_ID)
    assert len(runs_now) == len(DAYS), "reprocessing must clear in place, not add a run"
    assert {r["logical_date"][:10]: r["state"] for r in runs_now} == dict.fromkeys(DAYS, "success")
    untouched = {r["dag_run_id"]: r["start_date"] for r in runs if r["state"] == "success"}
    assert {r["dag_run_id"]: r["start_date"] for r in runs_now if r["dag_run_id"] in untouched} == untouched

    for airflow_run_id, first in earlier.items():
        latest = audit.run_of(DAG_ID, airflow_run_id)
        assert latest["run_id"] != first["run_id"]
        assert latest["airflow_run_id"] == first["airflow_run_id"]  # the same run_id, cleared in place
        assert latest["try_number"] == first["try_number"] + 1  # a new fork try
        assert latest["clear_number"] == first["clear_number"] + 1
        assert latest["previous_run_id"] == first["run_id"]
        assert latest["status"] == "completed"
        _check_run_is_its_own(audit, latest)
        _check_ordinary_day(audit, latest["run_id"])  # the outage is over
        # the earlier run's record is intact
        assert _run_footprint(audit, first["run_id"]) == before[airflow_run_id]
    for run_id, footprint in others_before.items():  # and nothing else was touched
        assert _run_footprint(audit, run_id) == footprint
    assert len(audit.runs_of(DAG_ID)) == len(DAYS) + len(OUTAGE_DAYS)
    verify_clean(stack, audit, "--dag-id", DAG_ID)
    assert _compact_report(stack) == {
        **{(day, 1): "38/2/0 rows_failed" for day in DAYS},
        **{(day, 1): "0/40/0 superseded" for day in OUTAGE_DAYS},
        **{(day, 2): "38/2/0 rows_failed" for day in OUTAGE_DAYS},
    }
