"""``airflow-elspeth verify`` catches limbo: audit runs never closed, rows never decided, tokens left
without a terminal outcome, and resolutions that hid a decidable row. On SQLite and PostgreSQL.

The audit databases are built row by row with SQLAlchemy Core inserts into the event tables of
schema 0.2 (no operator, no coalesce pass), so each test states exactly the trail it judges.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, Table, insert, update

from airflow_elspeth import airflow_states, cli
from airflow_elspeth.audit import ids
from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.model import CoalesceSpec
from airflow_elspeth.audit.read.decisions import coalesce_summary
from airflow_elspeth.audit.read.limbo import limbo_findings
from airflow_elspeth.audit.read.records import (
    AuditRun,
    DecisionCounts,
    Finding,
    FindingCheck,
    RowsUndecided,
    RunNotClosed,
    TokensWithoutOutcome,
    to_json,
)
from airflow_elspeth.audit.read.runs import coalesce_spec
from airflow_elspeth.core.config import coalesce_config

BRANCHES = ("a", "b")
NOW = datetime.now(timezone.utc).replace(microsecond=0)
FORKED = NOW - timedelta(minutes=30)  # every completed fork here completed half an hour ago


def ident(*parts: Any) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:32]


class Trail:
    """Writes a small audit trail straight into the event tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.run_nos: dict[str, int] = {}

    def _insert(self, table: Table, values: Sequence[dict[str, Any]] | dict[str, Any]) -> None:
        rows = [values] if isinstance(values, dict) else list(values)
        if rows:
            with self.engine.begin() as conn:
                conn.execute(insert(table), rows)

    def run(
        self,
        *,
        dag_id: str = "d",
        airflow_run_id: str = "r",
        try_number: int = 1,
        status: str = "completed",
        rows: int = 3,
        completed_at: datetime | None = FORKED,
        status_reason: str | None = None,
    ) -> str:
        run_id = ident("run", dag_id, airflow_run_id, try_number)
        self.run_nos[run_id] = run_no = len(self.run_nos) + 1
        done = status == "completed"
        self._insert(
            t.runs,
            {
                "run_id": run_id,
                "run_no": run_no,
                "dag_id": dag_id,
                "airflow_run_id": airflow_run_id,
                "fork_task_id": "fork",
                "try_number": try_number,
                "clear_number": 0,
                "started_at": FORKED - timedelta(minutes=1),
                "completed_at": completed_at if done else None,
                "status": status,
                "status_reason": status_reason,
                "config_hash": "0" * 64,
                "rows_total": rows if done else None,
                "chunk_size": 100,
                "chunks_total": 1 if done else None,
                "branches_json": json.dumps(list(BRANCHES)),
            },
        )
        # A row's source token and its branch tokens are its source row (with the run's branches);
        # its source token's outcome (forked) is implied.
        self._insert(
            t.source_rows,
            [
                {
                    "run_no": run_no,
                    "chunk": 0,
                    "row_no": i,
                    "row_key": self.key(i),
                    "source_hash": "p" * 64,
                    "body": "{}",
                    "recorded_at": FORKED,
                }
                for i in range(rows)
            ],
        )
        self._insert(
            t.nodes,
            [
                {
                    "run_id": run_id,
                    "node_id": f"step_{branch}",
                    "task_id": f"step_{branch}",
                    "node_type": "branch",
                    "branch_name": branch,
                    "config_json": json.dumps({"branch": branch, "previous_step": None}),
                    "config_hash": "0" * 64,
                }
                for branch in BRANCHES
            ],
        )
        return run_id

    @staticmethod
    def key(i: int) -> str:
        return f"doc-{i:03d}"

    def row_id(self, run_id: str, i: int) -> str:
        return ids.row_id(self.run_nos[run_id], i)

    def token(self, run_id: str, i: int, branch: str) -> str:
        return ids.branch_token_id(self.row_id(run_id, i), branch)

    def _outcome(
        self, run_id: str, i: int, branch: str, outcome: str, reason: str | None, *, terminal: bool = True
    ) -> dict[str, Any]:
        return {
            "token_id": self.token(run_id, i, branch),
            "run_id": run_id,
            "row_id": self.row_id(run_id, i),
            "outcome": outcome,
            "is_terminal": terminal,
            "reason": reason,
            "recorded_at": FORKED,
        }

    def coalesce(self, run_id: str, node_id: str = "join", *, timeout_s: float = 3600) -> CoalesceSpec:
        spec = CoalesceSpec(
            node_id=node_id,
            config=coalesce_config(
                branches=list(BRANCHES), policy="require_all", timeout=timedelta(seconds=timeout_s)
            ),
            delivering={b: f"step_{b}" for b in BRANCHES},
            mapped={b: False for b in BRANCHES},
        )
        self._insert(
            t.nodes,
            {
                "run_id": run_id,
                "node_id": node_id,
                "task_id": node_id,
                "node_type": "coalesce",
                "branch_name": None,
                "config_json": json.dumps(spec.as_dict()),
                "config_hash": "0" * 64,
            },
        )
        return spec

    def arrive(self, run_id: str, i: int, branch: str, after_s: float) -> datetime:
        """``branch`` delivers row ``i`` to the coalesce ``after_s`` seconds after the fork completed."""
        at = FORKED + timedelta(seconds=after_s)
        self._insert(
            t.step_results,
            {
                "run_no": self.run_nos[run_id],
                "node_id": f"step_{branch}",
                "chunk": 0,
                "row_no": i,
                "attempt": 1,
                "status": "completed",
                "output_hash": "p" * 64,
                "output_body": "{}",
                "started_at": at,
                "completed_at": at,
                "recorded_at": at,
            },
        )
        return at

    def merge(self, run_id: str, i: int, node_id: str = "join") -> None:
        """Both branches arrive (after 1 s and 2 s) and the row is merged, as a replay says: the
        decision with its merged row (its merged token, and the outcomes of that token and of the
        consumed branch tokens, are implied)."""
        self.arrive(run_id, i, "a", 1)
        at = self.arrive(run_id, i, "b", 2)
        self._decision(run_id, i, node_id, "merged", None, at, consumed=list(BRANCHES))

    def resolve(
        self,
        run_id: str,
        i: int,
        node_id: str = "join",
        *,
        state: str = "failed",
        after_s: float = 60,
        outcomes: bool = True,
    ) -> None:
        """A resolution: the coalesce task ended ``state`` ``after_s`` after the fork, row undecided;
        ``outcomes``: with the branch tokens' outcomes (not_arrived) its writer records."""
        at = FORKED + timedelta(seconds=after_s)
        self._decision(
            run_id,
            i,
            node_id,
            "failed",
            f"coalesce_task_{state}",
            at,
            details={"arrived": [], "lost": {}, "not_arrived": list(BRANCHES), "coalesce_task_state": state},
            missing=dict.fromkeys(BRANCHES, "not_arrived"),
        )
        if outcomes:
            self._insert(
                t.recorded_outcomes,
                [self._outcome(run_id, i, b, "not_arrived", "branch_task_none") for b in BRANCHES],
            )

    def _decision(
        self,
        run_id: str,
        i: int,
        node_id: str,
        decision: str,
        reason: str | None,
        at: datetime,
        *,
        consumed: Iterable[str] = (),
        details: dict[str, Any] | None = None,
        missing: dict[str, str] | None = None,
    ) -> None:
        merged = decision == "merged"
        self._insert(
            t.decisions,
            {
                "run_no": self.run_nos[run_id],
                "node_id": node_id,
                "chunk": 0,
                "row_no": i,
                "decision": decision,
                "failure_reason": reason,
                "details_json": json.dumps(details or {}),
                "consumed": json.dumps(list(consumed)),
                "missing_json": json.dumps(missing or {}),
                "late_json": "[]",
                "merged_hash": "p" * 64 if merged else None,
                "merged_body": "{}" if merged else None,
                "decided_at": at,
                "wait_ms": int((at - FORKED).total_seconds() * 1000),
                "recorded_at": at + timedelta(seconds=1),
            },
        )

    def supersede(self, run_id: str, i: int, node_id: str = "join") -> None:
        """What a cleared coalesce's new try does to a resolution before deciding the row afresh."""
        cd, d, o = t.coalesce_decisions.c, t.decisions.c, t.recorded_outcomes.c
        with self.engine.begin() as conn:
            row = (
                conn.execute(
                    t.coalesce_decisions.select().where(
                        cd.run_id == run_id, cd.node_id == node_id, cd.row_id == self.row_id(run_id, i)
                    )
                )
                .mappings()
                .one()
            )
            kept = {c.name: row[c.name] for c in t.superseded_decisions.c if c.name != "superseded_at"}
            conn.execute(
                insert(t.superseded_decisions), [{**kept, "superseded_at": NOW - timedelta(minutes=5)}]
            )
            conn.execute(
                t.decisions.delete().where(
                    d.run_no == self.run_nos[run_id], d.node_id == node_id, d.chunk == 0, d.row_no == i
                )
            )
            conn.execute(
                update(t.recorded_outcomes)
                .where(o.token_id.in_([self.token(run_id, i, b) for b in BRANCHES]), o.is_terminal)
                .values(is_terminal=False, superseded_at=NOW - timedelta(minutes=5))
            )


@pytest.fixture
def trail(audit_engine: Engine) -> Trail:
    return Trail(audit_engine)


def clean_run(trail: Trail, **kwargs: Any) -> str:
    run_id = trail.run(**kwargs)
    trail.coalesce(run_id)
    for i in range(kwargs.get("rows", 3)):
        trail.merge(run_id, i)
    return run_id


def verify(url: str, *args: str) -> tuple[Result, dict[str, Any]]:
    """``airflow-elspeth --url <url> verify --json <args>``: the result and its parsed output."""
    result = CliRunner().invoke(cli.main, ["--url", url, "verify", "--json", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result, json.loads(result.output)


RUN_NOT_CLOSED = FindingCheck.RUN_NOT_CLOSED
ROWS_UNDECIDED = FindingCheck.ROWS_UNDECIDED
TOKENS_WITHOUT_OUTCOME = FindingCheck.TOKENS_WITHOUT_OUTCOME
F = TypeVar("F", bound=Finding)


def only(findings: list[Finding], kind: type[F]) -> F:
    found = [f for f in findings if isinstance(f, kind)]
    assert len(found) == 1, findings
    return found[0]


def checks(findings: list[Finding]) -> list[tuple[str, str]]:
    return sorted((f.run_id, f.check) for f in findings)


def reported(findings: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (run, check) of each finding ``verify --json`` reported."""
    return sorted((f["run_id"], f["check"]) for f in findings)


# --------------------------------------------------------------------------------------------------


def test_a_clean_trail_verifies_with_exit_0(audit_url: str, trail: Trail) -> None:
    clean_run(trail)
    clean_run(trail, airflow_run_id="r2", rows=2)
    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 0, out
    assert out["runs_checked"] == 2 and out["findings"] == []
    assert out["airflow_states"] == {"used": False, "detail": "not read (--no-airflow-states)"}
    text = CliRunner().invoke(cli.main, ["--url", audit_url, "verify", "--no-airflow-states"])
    assert text.exit_code == 0 and "no findings" in text.output and "not read" in text.output


def test_a_run_still_running_after_a_later_try_started(audit_url: str, trail: Trail) -> None:
    stale = trail.run(status="running", rows=4)
    current = clean_run(trail, try_number=2)
    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 1
    assert reported(out["findings"]) == [(stale, RUN_NOT_CLOSED)]
    finding = out["findings"][0]
    assert finding["count"] == 4 and finding["examples"] == [Trail.key(i) for i in range(4)]
    assert finding["later_tries"][0]["run_id"] == current
    assert finding["why"] == ["try 2 of fork task fork started"]

    text = CliRunner().invoke(cli.main, ["--url", audit_url, "verify", "--no-airflow-states"])
    assert text.exit_code == 1 and RUN_NOT_CLOSED in text.output


def test_a_run_still_running_after_its_fork_task_ended(audit_engine: Engine, trail: Trail) -> None:
    run = trail.run(status="running", rows=2)
    runs = _runs(audit_engine)
    assert limbo_findings(audit_engine, runs) == []  # nothing in the store says it ended
    assert limbo_findings(audit_engine, runs, task_states={("d", "r", "fork"): "running"}) == []
    for state in ("failed", "success", "upstream_failed"):
        findings = limbo_findings(audit_engine, runs, task_states={("d", "r", "fork"): state})
        assert checks(findings) == [(run, RUN_NOT_CLOSED)]
        unclosed = only(findings, RunNotClosed)
        assert unclosed.count == 2 and unclosed.fork_task_state == state


def test_rows_undecided_past_the_deadline_and_grace(
    audit_engine: Engine, audit_url: str, trail: Trail
) -> None:
    late = trail.run(rows=30)
    trail.coalesce(late, timeout_s=60)  # deadline 29 min ago: far past the 5 minute grace
    trail.merge(late, 0)
    trail.merge(late, 1)
    waiting = trail.run(airflow_run_id="still-waiting", rows=3)
    trail.coalesce(waiting, timeout_s=3600)  # deadline in half an hour: undecided rows are fine
    trail.merge(waiting, 0)
    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 1
    assert reported(out["findings"]) == [(late, ROWS_UNDECIDED)]  # one line for 28 rows, never 28 lines
    finding = out["findings"][0]
    assert finding["count"] == 28
    assert finding["examples"] == [Trail.key(i) for i in range(2, 7)]
    assert finding["coalesces"]["join"]["undecided"] == 28
    assert "past the deadline" in finding["coalesces"]["join"]["why"][0]
    # Its tokens are not judged while rows wait for a decision (nothing says the coalesce ended).
    assert not [f for f in out["findings"] if f["check"] == TOKENS_WITHOUT_OUTCOME]

    summary = coalesce_summary(audit_engine, coalesce_spec(audit_engine, late, "join"), late)
    assert (summary["rows_merged"], summary["rows_failed"], summary["rows_undecided"]) == (2, 0, 28)


def test_rows_undecided_after_the_coalesce_task_ended(audit_engine: Engine, trail: Trail) -> None:
    run = trail.run(rows=3)
    trail.coalesce(run, timeout_s=3600)  # deadline not reached
    trail.merge(run, 0)
    runs = _runs(audit_engine)
    assert limbo_findings(audit_engine, runs) == []
    assert limbo_findings(audit_engine, runs, task_states={("d", "r", "join"): "up_for_reschedule"}) == []
    findings = limbo_findings(audit_engine, runs, task_states={("d", "r", "join"): "failed"})
    # The coalesce ended: its undecided rows are limbo, and so are their tokens, now judged.
    assert checks(findings) == [(run, ROWS_UNDECIDED), (run, TOKENS_WITHOUT_OUTCOME)]
    undecided = only(findings, RowsUndecided)
    assert undecided.count == 2 and undecided.examples == [Trail.key(1), Trail.key(2)]
    assert undecided.coalesces["join"].why == ["coalesce task join ended failed"]
    tokens = only(findings, TokensWithoutOutcome)
    assert tokens.count == 4 and tokens.by_kind == {"branch": 4}
    assert tokens.example_rows == [Trail.key(1), Trail.key(2)]


def test_rows_undecided_by_two_coalesces_are_counted_once(audit_engine: Engine, trail: Trail) -> None:
    run = trail.run(rows=4)
    trail.coalesce(run, "x", timeout_s=60)
    trail.coalesce(run, "y", timeout_s=60)
    for node, decided in (("x", (0, 1)), ("y", (1, 2))):
        for i in decided:
            trail._decision(run, i, node, "failed", "incomplete_branches", FORKED + timedelta(seconds=60))
    findings = limbo_findings(audit_engine, _runs(audit_engine))
    finding = only(findings, RowsUndecided)
    assert len(findings) == 1
    assert finding.count == 3  # rows 0 (by y), 2 (by x) and 3 (by neither)
    assert finding.examples == [Trail.key(0), Trail.key(2), Trail.key(3)]
    assert {n: c.undecided for n, c in finding.coalesces.items()} == {"x": 2, "y": 2}


def test_tokens_without_outcome_once_every_row_is_decided(audit_url: str, trail: Trail) -> None:
    run = trail.run(rows=20)
    trail.coalesce(run)
    for i in range(20):
        if i < 12:  # resolved, their branch tokens left open (no not_arrived outcomes recorded)
            trail.resolve(run, i, outcomes=False)
        else:
            trail.merge(run, i)
    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 1
    assert reported(out["findings"]) == [(run, TOKENS_WITHOUT_OUTCOME)]
    finding = out["findings"][0]
    assert finding["count"] == 24 and finding["by_kind"] == {"branch": 24}
    assert len(finding["examples"]) == 5 and set(finding["example_rows"]) <= {Trail.key(i) for i in range(12)}


def test_two_terminal_outcomes_of_one_coalesce_are_flagged(audit_url: str, trail: Trail) -> None:
    """A coalesce that merged a branch token (its outcome coalesced, implied) and recorded another
    terminal outcome for it; a second coalesce's outcome for the same token is no duplicate."""
    run = trail.run(rows=2)
    trail.coalesce(run)
    trail.coalesce(run, "other")
    for i in range(2):
        trail.merge(run, i)
        trail._decision(
            run, i, "other", "merged", None, FORKED + timedelta(seconds=2), consumed=list(BRANCHES)
        )
    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 0, out  # both coalesces consumed a and b: an outcome each
    late = trail._outcome(run, 1, "a", "late", "late_arrival_after_merge")
    trail._insert(
        t.recorded_outcomes, {**late, "join_group_id": ids.join_group_id(trail.row_id(run, 1), "join")}
    )
    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 1
    assert reported(out["findings"]) == [(run, "duplicate_terminal_outcomes")]
    assert out["findings"][0]["examples"] == [trail.token(run, 1, "a")]


def test_a_resolution_of_a_decidable_row_is_flagged(audit_url: str, trail: Trail) -> None:
    run = trail.run(rows=3)
    trail.coalesce(run)
    trail.merge(run, 0)
    # Row 1: only a arrived before the coalesce task was killed: undecidable then, a fair resolution.
    trail.arrive(run, 1, "a", 1)
    trail.resolve(run, 1, after_s=60)
    trail.arrive(run, 1, "b", 120)  # after the resolution: belongs to nobody
    # Row 2: both arrived before the resolution: require_all had merged it; the resolution hid that.
    trail.arrive(run, 2, "a", 1)
    trail.arrive(run, 2, "b", 2)
    trail.resolve(run, 2, after_s=60)
    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 1
    # Resolutions are never compared with a replay of the whole log: no decision_replay finding.
    assert reported(out["findings"]) == [(run, "resolution_decidable")]
    finding = out["findings"][0]
    assert finding["count"] == 1 and finding["examples"] == [Trail.key(2)]
    assert finding["details"][0]["replayed"]["decision"] == "merged"

    explained = CliRunner().invoke(cli.main, ["--url", audit_url, "explain", Trail.key(1), "--run-id", run])
    assert explained.exit_code == 0, explained.output
    assert "resolved when the coalesce task ended failed" in " ".join(explained.output.split())
    data = json.loads(
        CliRunner().invoke(cli.main, ["--url", audit_url, "explain", Trail.key(2), "--json"]).output
    )
    assert data["replays"][0]["resolution"] is True and data["replays"][0]["undecidable_then"] is False


def test_a_decision_that_differs_from_its_replay_is_flagged(audit_url: str, trail: Trail) -> None:
    run = trail.run(rows=2)
    trail.coalesce(run)
    trail.merge(run, 0)
    trail.merge(run, 1)
    # Row 1's stored decision says it failed, yet both branches arrived: its log merges it. (Its
    # branch tokens keep outcomes, as the writer of such a failure would have recorded them.)
    d = t.decisions.c
    with trail.engine.begin() as conn:
        conn.execute(
            update(t.decisions)
            .where(d.run_no == trail.run_nos[run], d.row_no == 1)
            .values(
                decision="failed",
                failure_reason="branch_lost",
                consumed="[]",
                merged_hash=None,
                merged_body=None,
            )
        )
    trail._insert(
        t.recorded_outcomes, [trail._outcome(run, 1, b, "row_failed", "branch_lost") for b in BRANCHES]
    )
    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 1
    assert reported(out["findings"]) == [(run, "decision_replay")]
    finding = out["findings"][0]
    assert list(finding) == ["run_id", "check", "count", "counted", "examples", "coalesces", "details"]
    assert (finding["count"], finding["counted"], finding["examples"]) == (1, "rows", [Trail.key(1)])
    assert finding["coalesces"] == {"join": 1}
    [detail] = finding["details"]
    assert list(detail) == ["coalesce", "row_key", "stored", "replayed"]
    compared = [
        "decision",
        "decided_at",
        "consumed",
        "failure_reason",
        "arrival_order",
        "wait_from_first_arrival_ms",
    ]
    assert list(detail["stored"]) == list(detail["replayed"]) == compared
    stored, replayed = detail["stored"], detail["replayed"]
    assert (stored["decision"], stored["failure_reason"], stored["consumed"]) == ("failed", "branch_lost", [])
    assert (replayed["decision"], replayed["failure_reason"], replayed["consumed"]) == (
        "merged",
        None,
        ["a", "b"],
    )
    assert stored["decided_at"] == replayed["decided_at"]
    # Trail stores no arrival record, so none is compared.
    assert stored["arrival_order"] is None and stored["wait_from_first_arrival_ms"] is None

    text = CliRunner().invoke(
        cli.main, ["--url", audit_url, "verify", "--no-airflow-states"], env={"COLUMNS": "80"}
    )
    assert text.exit_code == 1
    assert f"{Trail.key(1)} stored failed, replayed merged" in " ".join(text.output.split())


def test_a_token_parent_that_is_no_token_is_flagged(audit_url: str, trail: Trail) -> None:
    run = clean_run(trail, rows=1)
    # The one stored parent link: a nested fork's source row -> the upstream merged token.
    sr = t.source_rows.c
    with trail.engine.begin() as conn:
        conn.execute(
            update(t.source_rows).where(sr.run_no == trail.run_nos[run]).values(parent_token_id="gone")
        )
    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 1
    assert out["findings"] == [
        {
            "run_id": run,
            "check": "orphan_parent",
            "count": 1,
            "counted": "token parents",
            "examples": [ids.source_token_id(trail.row_id(run, 0))],
            "missing_parents": ["gone"],
        }
    ]
    text = CliRunner().invoke(
        cli.main, ["--url", audit_url, "verify", "--no-airflow-states"], env={"COLUMNS": "80"}
    )
    assert text.exit_code == 1 and '{"missing_parents": ["gone"]}' in text.output


def test_a_finding_is_always_one_of_its_kinds() -> None:
    with pytest.raises(ValueError):
        FindingCheck("limbo")
    with pytest.raises(TypeError, match="no kind of finding"):
        Finding(run_id="r", count=1, examples=[])


def test_superseded_decisions_do_not_count_as_decided(
    audit_engine: Engine, audit_url: str, trail: Trail
) -> None:
    run = trail.run(rows=3)
    trail.coalesce(run, timeout_s=60)
    trail.merge(run, 0)
    trail.merge(run, 1)
    trail.resolve(run, 2, after_s=60)
    trail.supersede(run, 2)  # cleared: the resolution is history, row 2 waits for the new try
    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 1
    assert reported(out["findings"]) == [(run, ROWS_UNDECIDED)]
    assert out["findings"][0]["count"] == 1 and out["findings"][0]["examples"] == [Trail.key(2)]
    summary = coalesce_summary(audit_engine, coalesce_spec(audit_engine, run, "join"), run)
    assert summary["rows_undecided"] == 1 and summary["rows_failed"] == 0

    # Once the coalesce ended again, the superseded outcomes are no terminal outcomes either.
    findings = limbo_findings(audit_engine, _runs(audit_engine), task_states={("d", "r", "join"): "failed"})
    assert only(findings, TokensWithoutOutcome).count == 2

    data = json.loads(
        CliRunner().invoke(cli.main, ["--url", audit_url, "explain", Trail.key(2), "--json"]).output
    )
    assert data["decisions"] == [] and len(data["superseded_decisions"]) == 1
    branch_outcomes = [o for tok in data["tokens"] for o in tok["outcomes"] if tok["token_kind"] == "branch"]
    assert branch_outcomes and all(not o["is_terminal"] and o["superseded_at"] for o in branch_outcomes)
    text = CliRunner().invoke(cli.main, ["--url", audit_url, "explain", Trail.key(2)])
    assert text.exit_code == 0 and "superseded" in text.output


def test_report_shows_undecided_rows(audit_url: str, trail: Trail) -> None:
    run = trail.run(rows=3)
    trail.coalesce(run)
    trail.merge(run, 0)
    out = CliRunner().invoke(cli.main, ["--url", audit_url, "report", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)[0]["summary"]
    assert (summary["rows_total"], summary["rows_merged"], summary["rows_undecided"]) == (3, 1, 2)
    text = CliRunner().invoke(cli.main, ["--url", audit_url, "report"], terminal_width=200)
    assert text.exit_code == 0 and "undecided" in text.output


# --------------------------------------------------------------------------------------------------
# Airflow task states through the CLI


def fake_metadata_db(path: Path, states: dict[str, str], *, dag_id: str = "d", run_id: str = "r") -> str:
    """A stand-in for Airflow's metadata DB: just the task_instance columns the CLI reads."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE task_instance (dag_id TEXT, run_id TEXT, task_id TEXT, map_index INTEGER, "
            "try_number INTEGER, state TEXT)"
        )
        conn.executemany(
            "INSERT INTO task_instance VALUES (?, ?, ?, -1, 1, ?)",
            [(dag_id, run_id, task_id, state) for task_id, state in states.items()],
        )
        conn.execute("INSERT INTO task_instance VALUES (?, ?, 'fork', 0, 1, 'success')", (dag_id, "other"))
    return f"sqlite:///{path}"


def test_cli_reads_task_states_from_airflow_when_it_can(
    audit_url: str, trail: Trail, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = trail.run(status="running", rows=2)
    url = fake_metadata_db(tmp_path / "airflow.db", {"fork": "failed"})
    monkeypatch.setattr(airflow_states, "_airflow_metadata_url", lambda: url)
    result, out = verify(audit_url)
    assert result.exit_code == 1
    assert out["airflow_states"]["used"] is True and "1 task instances" in out["airflow_states"]["detail"]
    assert reported(out["findings"]) == [(run, RUN_NOT_CLOSED)]
    assert out["findings"][0]["why"] == ["fork task fork ended failed"]

    result, out = verify(audit_url, "--no-airflow-states")
    assert result.exit_code == 0 and out["findings"] == []


def test_cli_says_when_airflow_states_are_unavailable(
    audit_url: str, trail: Trail, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_run(trail)
    monkeypatch.setattr(airflow_states, "_airflow_metadata_url", lambda: f"sqlite:///{tmp_path / 'none.db'}")
    result, out = verify(audit_url)
    assert result.exit_code == 0
    assert out["airflow_states"]["used"] is False
    assert out["airflow_states"]["detail"].startswith("not available: no Airflow metadata DB at")
    assert not (tmp_path / "none.db").exists()  # never created
    required = CliRunner().invoke(cli.main, ["--url", audit_url, "verify", "--airflow-states"])
    assert required.exit_code != 0 and "unavailable" in required.output


def _runs(engine: Engine) -> list[AuditRun]:
    with engine.connect() as conn:
        return [
            AuditRun.from_row(row)
            for row in conn.execute(
                t.runs.select().order_by(t.runs.c.started_at, t.runs.c.try_number)
            ).mappings()
        ]


def test_ui_reports_show_undecided_resolutions_and_superseded(audit_engine: Engine, trail: Trail) -> None:
    from airflow_elspeth.audit.read.cache import clear_cache
    from airflow_elspeth.audit.read.decisions import coalesce_overview
    from airflow_elspeth.audit.read.index import audit_index
    from airflow_elspeth.audit.read.lineage import row_view
    from airflow_elspeth.audit.read.runs import audit_runs, pick_audit_run
    from airflow_elspeth.core.vocabulary import failure_reason_text

    clear_cache()
    run = trail.run(rows=4)
    trail.coalesce(run)
    trail.merge(run, 0)
    trail.arrive(run, 1, "a", 1)
    trail.resolve(run, 1)
    trail.resolve(run, 2)
    trail.supersede(run, 2)
    # The superseded resolution of row 2 is not a decision: undecided, and no failure reason.
    join = DecisionCounts(merged=1, failed=1, undecided=2, failure_reasons={"coalesce_task_failed": 1})
    (outcome,) = audit_index(audit_engine, None)[0].outcomes
    assert (outcome.coalesce, {k: getattr(outcome, k) for k in to_json(join)}) == ("join", to_json(join))
    counts = {"join": join}
    audit_run = pick_audit_run(audit_runs(audit_engine, "d", "r"))
    assert audit_run is not None and audit_run.decisions == counts
    overview = coalesce_overview(audit_engine, audit_run, "join")
    assert (overview.rows_merged, overview.rows_failed, overview.rows_undecided) == (1, 1, 2)

    resolved = row_view(audit_engine, audit_run, Trail.key(1)).decisions[0]
    assert resolved.replay is not None
    assert resolved.replay["resolution"] is True and resolved.replay["undecidable_then"] is True
    assert resolved.explanation is not None
    assert resolved.explanation.startswith("Resolved when the coalesce task ended failed")
    assert "not the policy" in failure_reason_text("coalesce_task_failed")

    reopened = row_view(audit_engine, audit_run, Trail.key(2))
    assert reopened.decisions == [] and len(reopened.superseded_decisions) == 1
    assert all(b["outcome"] is None and len(b["superseded_outcomes"]) == 1 for b in reopened.branches)
