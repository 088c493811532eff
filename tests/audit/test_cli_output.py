"""What ``airflow-elspeth`` prints, byte for byte, at 80 and 120 columns (golden files), and what it
refuses to guess.

The audit store is written through the store's own write path (the calls the operators make) on an
SQLite file whose clock (``dml.db_now``) is a fake one the test moves, so every id and every time in
the output is fixed. ``ELSPETH_UPDATE_GOLDEN=1`` rewrites the golden files.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, insert, text

from airflow_elspeth import cli
from airflow_elspeth.audit import dml, schema
from airflow_elspeth.audit.coalesce import coalesce_pass
from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.ids import branch_token_id, row_id, row_numbers
from airflow_elspeth.audit.model import CoalesceSpec, run_number
from airflow_elspeth.audit.read.decisions import coalesce_summary, failure_message
from airflow_elspeth.audit.read.errors import error_groups
from airflow_elspeth.audit.read.lineage import explain_row
from airflow_elspeth.audit.read.records import DecisionRecord, ShownField, shown
from airflow_elspeth.audit.read.runs import coalesce_spec
from airflow_elspeth.audit.store import (
    AuditStore,
    ForkRow,
    NodeResult,
    RunIdentity,
)
from airflow_elspeth.core.canonical import hash_value
from airflow_elspeth.core.config import coalesce_config
from airflow_elspeth.core.vocabulary import SKIP_LABEL, NodeStatus, ReasonKind, reason_kind

GOLDEN = Path(__file__).parent / "golden"
T0 = datetime(2026, 11, 27, 5, 13, 14, tzinfo=timezone.utc)
BRANCHES = ("gpt", "claude", "gemini")
STEPS = {b: f"ask_{b}" for b in BRANCHES}
DAG = "example_llm_consensus"
RUN_1 = "manual__2026-11-27T05:13:14+00:00"
RUN_2 = "manual__2026-11-28T05:13:14+00:00"


class FakeClock:
    """``datetime`` for ``dml``: ``now()`` is the test's time, which only the test moves."""

    at = T0

    @classmethod
    def now(cls, tz: Any = None) -> datetime:
        return cls.at

    @classmethod
    def move(cls, seconds: float) -> datetime:
        cls.at = cls.at + timedelta(seconds=seconds)
        return cls.at


def _spec(timeout_s: float = 6.0) -> CoalesceSpec:
    return CoalesceSpec(
        node_id="consensus",
        config=coalesce_config(
            branches=list(BRANCHES),
            policy="quorum",
            quorum=2,
            merge="nested",
            timeout=timedelta(seconds=timeout_s),
        ),
        delivering=dict(STEPS),
        mapped=dict.fromkeys(BRANCHES, False),
    )


class Builder:
    """One audit run written call by call, at the fake clock's times."""

    def __init__(
        self, engine: Engine, airflow_run_id: str, try_number: int, keys: list[str], day: int
    ) -> None:
        self.store = AuditStore(engine)
        identity = RunIdentity(
            dag_id=DAG,
            airflow_run_id=airflow_run_id,
            fork_task_id="fork",
            try_number=try_number,
            run_type="manual",
            logical_date=datetime(2026, 11, day, 5, 13, 14, tzinfo=timezone.utc),
        )
        self.run_id = self.store.begin_run(
            identity, branches=list(BRANCHES), chunk_size=100, config={"branches": list(BRANCHES)}
        )
        self.keys = keys
        rows = []
        for index, key in enumerate(keys):
            digest, body = hash_value({"id": key, "pages": 10 * (index + 1)})
            rows.append(ForkRow(row_key=key, row_index=index, payload_hash=digest, payload_body=body))
        self.store.write_fork_chunk(self.run_id, list(BRANCHES), 0, rows)
        self.store.complete_run(self.run_id, rows_total=len(keys), chunks_total=1)
        with engine.connect() as conn:
            self.run_no = run_number(conn, self.run_id)
        for branch, step in STEPS.items():
            self.store.register_node(
                self.run_id, step, "branch", branch, {"branch": branch, "previous_step": None}
            )
        self.spec = _spec()
        self.store.register_node(self.run_id, "consensus", "coalesce", None, self.spec.as_dict())

    def row(self, key: str) -> str:
        return row_id(self.run_no, self.keys.index(key))

    def token(self, key: str, branch: str) -> str:
        return branch_token_id(self.row(key), branch)

    def write(self, branch: str, outcomes: dict[str, str], *, late: str | None = None) -> None:
        """``outcomes``: row key -> ``ok`` or an error type; ``late``: written as discarded."""
        results = []
        for key, what in outcomes.items():
            done = FakeClock.at
            common: dict[str, Any] = {
                "token_id": self.token(key, branch),
                "row_id": self.row(key),
                "chunk": 0,
                "started_at": done - timedelta(milliseconds=40),
                "completed_at": done,
            }
            if what == "ok":
                digest, body = hash_value({f"{branch}_label": "invoice", "key": key})
                status = NodeStatus.DISCARDED if late else NodeStatus.COMPLETED
                context = {"late": late} if late else None
                results.append(
                    NodeResult(**common, status=status, output_hash=digest, output_body=body, context=context)
                )
            else:
                error = {"type": what, "message": f"429 Too Many Requests for {key}", "attempts": 1}
                results.append(
                    NodeResult(**common, status=NodeStatus.FAILED, error=error, context={"attempts": 1})
                )
        self.store.write_branch_results(
            self.run_id,
            STEPS[branch],
            1,
            results,
            chunk_tokens={0: len(self.keys)},
            delivering_to=["consensus"],
        )

    def decide(self) -> None:
        coalesce_pass(self.store, self.spec, self.run_id, {step: "running" for step in STEPS.values()})

    def skip(self, branch: str, keys: list[str]) -> None:
        self.store.record_skipped(
            self.run_id, STEPS[branch], {0: len(self.keys)}, [self.token(k, branch) for k in keys]
        )


@pytest.fixture
def store(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[str, str]]]:
    """Three audit runs of one DAG: run 1 (tries 1 and 2 of its fork), run 2; returns (url, ids)."""
    FakeClock.at = T0
    monkeypatch.setattr(dml, "datetime", FakeClock)
    engine = engine_for_url(sqlite_url)
    keys = [f"doc-00{i}" for i in range(1, 6)]
    main = Builder(engine, RUN_1, 1, keys, day=27)
    FakeClock.move(1)
    main.write("gpt", {k: "ok" for k in keys[:4]})
    FakeClock.move(0.25)
    main.write("claude", {"doc-001": "ok", "doc-002": "ok", "doc-003": "ok", "doc-004": "RateLimitError"})
    FakeClock.move(2)
    main.write("gemini", {"doc-002": "ok"})
    main.decide()  # doc-001..003 merged by gpt and claude; doc-002's gemini is late, seen by the pass
    FakeClock.move(4)  # past the deadline
    main.decide()  # doc-004 and doc-005 fail at the deadline
    FakeClock.move(1.5)
    main.write("gemini", {"doc-003": "ok"}, late="late_arrival_after_merge")
    main.write("gemini", {"doc-004": "ok"}, late="late_arrival_after_failure")
    main.skip("gemini", ["doc-001", "doc-005"])
    # Try 2 of the same fork in the same DAG run (a cleared fork), and a second DAG run.
    ids = {"try1": main.run_id}
    for name, airflow_run, try_number, day in (("try2", RUN_1, 2, 27), ("other", RUN_2, 1, 28)):
        FakeClock.at = datetime(2026, 11, day, 6, 0, 0, tzinfo=timezone.utc) + timedelta(minutes=try_number)
        extra = Builder(engine, airflow_run, try_number, ["doc-001", "doc-002"], day=day)
        FakeClock.move(1)
        extra.write("gpt", {"doc-001": "ok", "doc-002": "ok"})
        extra.write("claude", {"doc-001": "ok", "doc-002": "ok"})
        extra.decide()
        extra.skip("gemini", ["doc-001", "doc-002"])
        ids[name] = extra.run_id
    yield sqlite_url, ids


def invoke(url: str, *args: str, width: int = 80) -> Result:
    return CliRunner().invoke(cli.main, ["--url", url, *args], env={"COLUMNS": str(width)})


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("ELSPETH_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with ELSPETH_UPDATE_GOLDEN=1"
    assert text == path.read_text(), (
        f"{name} differs from its golden file (ELSPETH_UPDATE_GOLDEN=1 rewrites it)"
    )


@pytest.mark.parametrize("width", [80, 120])
def test_report_golden(store: tuple[str, dict[str, str]], width: int) -> None:
    url, ids = store
    result = invoke(url, "report", "--no-airflow-states", "--dag-id", DAG, width=width)
    assert result.exit_code == 0, result.output
    golden(f"report_{width}.txt", result.output)
    assert all(len(line) <= width for line in result.output.splitlines())
    # By logical date then fork try; the earlier try of the first DAG run is marked.
    first, second, third = (result.output.index(ids[k]) for k in ("try1", "try2", "other"))
    assert first < second < third
    assert "superseded by try 2" in result.output


@pytest.mark.parametrize("width", [80, 120])
def test_explain_golden(store: tuple[str, dict[str, str]], width: int) -> None:
    url, ids = store
    for key in ("doc-003", "doc-005"):
        result = invoke(url, "explain", key, width=width)
        assert result.exit_code == 0, result.output
        golden(f"explain_{key}_{width}.txt", result.output)
        assert all(len(line) <= width for line in result.output.splitlines())
        assert f"found in one audit run: {ids['try1']}" in " ".join(result.output.split())
    skipped = invoke(url, "explain", "doc-005", width=120).output
    assert "gemini → skipped (skipped_decided)" in skipped
    assert "branch_task_running" in skipped  # what the decision saw, kept
    late = invoke(url, "explain", "doc-003", width=120).output
    assert "gemini → late (late_arrival_after_merge)" in late


@pytest.mark.parametrize("width", [80, 120])
def test_explain_ambiguous_lists_runs(store: tuple[str, dict[str, str]], width: int) -> None:
    url, ids = store
    result = invoke(url, "explain", "doc-001", width=width)
    assert result.exit_code == 2
    golden(f"explain_ambiguous_{width}.txt", result.output)
    assert all(len(line) <= width for line in result.output.splitlines())
    for run_id in ids.values():
        assert run_id in result.output
    assert "--run-id" in result.output and "--airflow-run-id" in result.output
    # Narrowed to one DAG run: still its two fork tries, one superseded.
    narrowed = invoke(url, "explain", "doc-001", "--dag-id", DAG, "--airflow-run-id", RUN_1, width=width)
    assert narrowed.exit_code == 2
    assert "superseded by try 2" in narrowed.output and "(current)" in narrowed.output
    as_json = CliRunner().invoke(cli.main, ["--url", url, "explain", "doc-001", "--json"])
    assert as_json.exit_code == 2
    listed = json.loads(as_json.output[: as_json.output.rindex("}") + 1])
    assert listed["error"] == "ambiguous" and [r["run_id"] for r in listed["runs"]] == [
        ids["try1"],
        ids["try2"],
        ids["other"],
    ]
    assert [r["current"] for r in listed["runs"]] == [False, True, True]
    # Unambiguous within the filters: picked, and named.
    picked = invoke(url, "explain", "doc-001", "--airflow-run-id", RUN_2, width=width)
    assert picked.exit_code == 0, picked.output
    assert f"found in one audit run: {ids['other']}" in " ".join(picked.output.split())
    chosen = invoke(url, "explain", "doc-001", "--run-id", ids["try2"], width=width)
    assert chosen.exit_code == 0 and "found in one audit run" not in chosen.output


def test_verify_plurals(store: tuple[str, dict[str, str]]) -> None:
    url, ids = store
    one = invoke(url, "verify", "--no-airflow-states", "--run-id", ids["other"])
    assert one.exit_code == 0, one.output
    assert "verified 1 audit run: no findings" in one.output
    every = invoke(url, "verify", "--no-airflow-states")
    assert "verified 3 audit runs: no findings" in every.output


def test_an_empty_id_is_refused_not_read_as_every_run(store: tuple[str, dict[str, str]]) -> None:
    url, _ = store
    for command in (
        ["verify", "--no-airflow-states"],
        ["report", "--no-airflow-states"],
        ["explain", "doc-001"],
    ):
        for option in ("--run-id", "--dag-id", "--airflow-run-id"):
            result = invoke(url, *command, option, "")
            assert result.exit_code == 2, (command, option, result.output)
            assert f"Invalid value for '{option}': is empty" in result.output


def test_headline_counts_equal_their_tables(store: tuple[str, dict[str, str]]) -> None:
    url, ids = store
    engine = engine_for_url(url)
    summary = coalesce_summary(engine, coalesce_spec(engine, ids["try1"], "consensus"), ids["try1"])
    # What report prints: each headline count is the sum of the table under it.
    report = invoke(url, "report", "--json")
    assert report.exit_code == 0, report.output
    for item in json.loads(report.output):
        s = item["summary"]
        tables = s["missing_branches"].values()
        late = sum(
            n for info in tables for r, n in info["reasons"].items() if reason_kind(r) is ReasonKind.LATE
        )
        assert s["late_arrivals"] == late
        assert all(info["rows"] == sum(info["reasons"].values()) for info in tables)
        assert s["rows_total"] == s["rows_merged"] + s["rows_failed"] + s["rows_undecided"]
        assert s["rows_failed"] == sum(s["failure_reasons"].values())
        if item["run"]["run_id"] == ids["try1"]:
            assert s == json.loads(json.dumps(summary, default=str))
    assert summary["late_arrivals"] == 3
    assert summary["missing_branches"]["gemini"]["reasons"] == {
        "skipped_decided": 2,
        "late_arrival_after_merge": 2,
        "late_arrival_after_failure": 1,
    }
    by_key = {row["row_key"]: row for row in summary["failed_rows"]}
    assert by_key["doc-004"]["missing"] == {
        "claude": "error:RateLimitError",
        "gemini": "late_arrival_after_failure",
    }
    assert by_key["doc-005"]["missing"]["gemini"] == "skipped_decided"


def test_failure_message_names_ten_rows() -> None:
    summary = {
        "coalesce": "c",
        "policy": "require_all",
        "quorum": None,
        "merge": "union",
        "expected_branches": ["a", "b"],
        "rows_failed": 13,
        "rows_total": 20,
        "tolerated_failures": 0,
        "failure_reasons": {"branch_lost": 13},
        "missing_branches": {"a": {"rows": 13, "reasons": {"error:E": 13}}},
        "failed_rows": [{"row_key": f"k{i}"} for i in range(13)],
        "audit_run_id": "r",
    }
    message = failure_message(summary)
    assert message.startswith("coalesce 'c' (require_all (2 of 2), merge=union)")
    assert "Failed rows: k0, k1, k2, k3, k4, k5, k6, k7, k8, k9 and 3 more." in message
    assert "k10" not in message
    one = failure_message({**summary, "rows_failed": 1, "failed_rows": [{"row_key": "only"}]})
    assert "Failed rows: only." in one and "more" not in one


def test_identical_errors_group_across_rows_and_runs(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same error on different rows of two DAG runs is one fingerprint; the database groups the
    losses by it, and ``report`` prints one line for it with its rows and audit runs."""
    FakeClock.at = T0
    monkeypatch.setattr(dml, "datetime", FakeClock)
    engine = engine_for_url(sqlite_url)
    keys = ["doc-001", "doc-002", "doc-003"]
    runs = []
    for airflow_run, day, errors in (
        (RUN_1, 27, {"doc-001": "RateLimitError", "doc-002": "RateLimitError", "doc-003": "KeyError"}),
        (RUN_2, 28, {"doc-001": "ok", "doc-002": "ok", "doc-003": "RateLimitError"}),
    ):
        run = Builder(engine, airflow_run, 1, keys, day=day)
        FakeClock.move(1)
        run.write("gpt", {k: "ok" for k in keys})
        run.write("claude", errors)
        FakeClock.move(6)  # past the deadline: the rows with claude's error fail, gemini never came
        run.decide()
        runs.append(run.run_id)

    groups = error_groups(engine, runs)
    assert [(g.reason, g.rows, g.audit_runs, g.branches) for g in groups] == [
        ("error:RateLimitError", 3, sorted(runs), ["claude"]),
        ("error:KeyError", 1, [runs[0]], ["claude"]),
    ]
    assert groups[0].message_shape == "<n> Too Many Requests for doc-<n>"
    assert groups[0].example_row_keys == ["doc-001", "doc-002", "doc-003"]
    with engine.connect() as conn:
        by_hash = conn.execute(
            text(
                "SELECT error_hash, count(*) FROM token_outcomes"
                " WHERE is_terminal AND error_hash IS NOT NULL GROUP BY error_hash ORDER BY count(*) DESC"
            )
        ).all()
    assert [tuple(row) for row in by_hash] == [(groups[0].error_hash, 3), (groups[1].error_hash, 1)]

    wide = invoke(sqlite_url, "report", "--no-airflow-states", "--dag-id", DAG, width=120).output
    assert "Row errors by fingerprint, across 2 audit runs" in wide
    assert f"{groups[0].error_hash[:12]} │ error:RateLimitError │    3 │    2 │ claude" in wide
    narrow = invoke(sqlite_url, "report", "--no-airflow-states", "--dag-id", DAG, width=80).output
    assert (
        f"{groups[0].error_hash[:12]} error:RateLimitError · 3 rows · 2 audit runs · branch claude" in narrow
    )
    as_json = json.loads(invoke(sqlite_url, "report", "--no-airflow-states", "--json").output)
    assert {e["error_hash"] for item in as_json for e in item["errors"]} == {g.error_hash for g in groups}


def test_the_arrival_record_is_what_the_replay_computes(store: tuple[str, dict[str, str]]) -> None:
    """Each decision stores its arrival order with offsets from the first arrival and the wait from
    it; ``verify`` replays them from the event log, flags a record that differs, and skips the
    comparison for a decision stored without one (written before schema revision 0003)."""
    url, ids = store
    engine = engine_for_url(url)
    with engine.begin() as conn:
        row = conn.execute(
            text(
                "SELECT row_id, details_json, wait_ms, wait_from_first_arrival_ms FROM coalesce_decisions"
                " WHERE run_id = :r AND row_key = 'doc-003'"
            ),
            {"r": ids["try1"]},
        ).one()
    details = json.loads(row.details_json)
    assert details["arrival_order"] == [
        {"branch": "gpt", "offset_ms": 0},
        {"branch": "claude", "offset_ms": 250},
    ]
    assert (row.wait_ms, row.wait_from_first_arrival_ms) == (1250, 250)
    summary = coalesce_summary(engine, coalesce_spec(engine, ids["try1"], "consensus"), ids["try1"])
    assert summary["waits_ms"]["from_first_arrival"]["max"] >= 250

    def verify_findings() -> list[str]:
        result = invoke(url, "verify", "--no-airflow-states", "--json", "--run-id", ids["try1"])
        return [f["check"] for f in json.loads(result.output)["findings"]]

    assert verify_findings() == []
    tampered = {
        **details,
        "arrival_order": [{"branch": "claude", "offset_ms": 0}, {"branch": "gpt", "offset_ms": 250}],
    }
    # The decision event itself (``coalesce_decisions`` is a view over ``decisions``).
    run_no, row_no = row_numbers(row.row_id)
    stored = {"run": run_no, "node": "consensus", "row": row_no}
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE decisions SET details_json = :d"
                " WHERE run_no = :run AND node_id = :node AND row_no = :row"
            ),
            {"d": json.dumps(tampered), **stored},
        )
    assert verify_findings() == ["decision_replay"]
    unrecorded = {k: v for k, v in details.items() if k != "arrival_order"}
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE decisions SET details_json = :d, wait_from_first_arrival_ms = NULL"
                " WHERE run_no = :run AND node_id = :node AND row_no = :row"
            ),
            {"d": json.dumps(unrecorded), **stored},
        )
    assert verify_findings() == []


def row_page(url: str, run_id: str, key: str) -> str:
    """The row page of ``key`` in audit run ``run_id``, rendered by the UI's own templates, as text
    (HTML entities read)."""
    from starlette.requests import Request

    from airflow_elspeth.audit.read.lineage import row_view
    from airflow_elspeth.audit.read.runs import audit_runs
    from airflow_elspeth.plugins import app, chart

    engine = engine_for_url(url)
    selected = next(r for r in audit_runs(engine, DAG, RUN_1) if r.audit_run_id == run_id)
    page = app.templates.env.get_template("row.html").render(
        dag_id=DAG,
        run_id=RUN_1,
        links=app.Links(Request({"type": "http", "root_path": ""}), DAG, RUN_1),
        selected=selected,
        row=row_view(engine, selected, key),
        coalesce=None,
        colours=chart.colours(selected.branches),
    )
    return html.unescape(page)


def test_a_skip_has_one_label(store: tuple[str, dict[str, str]]) -> None:
    """The end of the branch task that skipped a decided row reads as a loss in the row's log
    (``branch_task_success``): ``explain`` and the row page show it as the skip, in the words the
    token's outcome and the decision's missing branches use (issue 21)."""
    url, ids = store
    engine = engine_for_url(url)
    with engine.begin() as conn:  # what the coalesce pass records when the skipping task ends
        conn.execute(
            insert(schema.branch_task_losses).values(
                run_id=ids["try1"],
                node_id=STEPS["gemini"],
                chunk=0,
                branch_name="gemini",
                task_state="success",
                observed_at=FakeClock.move(1),
            )
        )
    out = invoke(url, "explain", "doc-005", "--run-id", ids["try1"], width=120).output
    assert f"gemini → {SKIP_LABEL}" in out  # the token's outcome
    assert "gemini: not_arrived, then skipped_decided" in out  # the decision's missing branch
    log = out[out.index("event log, replayed:") :].splitlines()
    assert [line.split()[1:] for line in log if "gemini" in line] == [["gemini", *SKIP_LABEL.split()]]
    assert "branch_task_success" not in out and "replay agrees" in out
    page = row_page(url, ids["try1"], "doc-005")
    assert f"<td>{SKIP_LABEL}</td>" in page and "branch_task_success" not in page
    assert '<span class="badge skipped">skipped</span>' in page
    assert "gemini: not_arrived, then skipped_decided" in page


def test_the_decision_record_is_laid_out_from_its_shown_fields(
    store: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``explain`` and the row page show every shown field of the decision record, and only from
    :meth:`DecisionRecord.shown_fields`: a new field marked :func:`shown` needs neither cli.py nor
    row.html (docs/ARCHITECTURE.md, "What a change touches")."""

    @dataclass(frozen=True)
    class Probe(DecisionRecord):
        probe_column: int = field(default=7, metadata=shown("probe column"))

    probe = Probe.extending(DecisionRecord.from_row(_stored_decision(store, "doc-004")))
    assert probe.shown_fields()[-1] == ShownField("probe_column", "probe column", ["7"], ", ")
    unshown = {"coalesce", "decided_at", "wait_ms", "late", "merged_token_id", "missing_since"}
    assert {f.name for f in probe.shown_fields()}.isdisjoint(unshown)

    url, ids = store
    listed = DecisionRecord.shown_fields
    added = ShownField("probe_column", "probe column", ["7 ms", "then 8 ms"], "; ")
    monkeypatch.setattr(DecisionRecord, "shown_fields", lambda self: [*listed(self), added])
    for key in ("doc-003", "doc-004", "doc-005"):
        out = " ".join(invoke(url, "explain", key, "--run-id", ids["try1"], width=200).output.split())
        page = " ".join(row_page(url, ids["try1"], key).split())
        (decision,) = explain_row(engine_for_url(url), ids["try1"], key).decisions
        shown_now = decision.shown_fields()
        assert shown_now[0].name == "consumed" and shown_now[-1] == added
        for f in shown_now:
            text_ = " ".join(f.text.split())
            assert f"{f.label}: {text_}" in out, (key, f)
            assert f'<dt>{f.label.capitalize()}</dt><dd class="shown-{f.name}">{text_}</dd>' in page, (key, f)


def _stored_decision(store: tuple[str, dict[str, str]], key: str) -> dict[str, Any]:
    url, ids = store
    with engine_for_url(url).connect() as conn:
        row = (
            conn.execute(
                text("SELECT * FROM coalesce_decisions WHERE run_id = :r AND row_key = :k"),
                {"r": ids["try1"], "k": key},
            )
            .mappings()
            .one()
        )
    return dict(row)


def test_db_upgrade_names_the_store_it_upgraded(tmp_path: Path) -> None:
    """A deployment has several stores (the default, forks' own, a --url): each line names which,
    the password masked; an unreachable store is named too, not left to a traceback."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    first = invoke(url, "db", "upgrade", width=40)
    assert first.exit_code == 0, first.output
    assert first.output == f"audit store {url} upgraded from an empty database to revision 0006\n"
    again = invoke(url, "db", "upgrade", "--json")
    assert json.loads(again.output) == {
        "url": url,
        "store": url,
        "previous_revision": "0006",
        "revision": "0006",
    }
    assert invoke(url, "db", "upgrade").output == f"audit store {url} is at revision 0006 (already)\n"

    refused = CliRunner().invoke(
        cli.main, ["--url", "postgresql+psycopg2://elspeth:s3cret@127.0.0.1:1/audit", "db", "upgrade"]
    )
    assert refused.exit_code == 1
    assert refused.output.startswith(
        "Error: cannot upgrade audit store postgresql+psycopg2://elspeth:***@127.0.0.1:1/audit: "
        "OperationalError: "
    ), refused.output
    assert "s3cret" not in refused.output


def test_report_compact_golden(store: tuple[str, dict[str, str]]) -> None:
    """One line per audit run within 80 columns, by logical date then fork try; narrower, the DAG
    and the coalesces give way (cut with an ellipsis), never the date, the try or the state."""
    url, ids = store
    result = invoke(url, "report", "--no-airflow-states", "--compact", width=80)
    assert result.exit_code == 0, result.output
    golden("report_compact_80.txt", result.output)
    assert all(len(line) <= 80 for line in result.output.splitlines())
    narrow = invoke(url, "report", "--no-airflow-states", "--compact", width=60).output.splitlines()
    assert all(len(line) <= 60 for line in narrow)
    assert narrow[-3:] == [
        "2026-11-27 05:13  example…    1  consensus 3/2/0  superseded",
        "2026-11-27 05:13  example…    2  consensus 2/0/0  all_merged",
        "2026-11-28 05:13  example…    1  consensus 2/0/0  all_merged",
    ]
    # --json: the UI index's entries (the same verdicts), oldest first.
    listed = json.loads(invoke(url, "report", "--no-airflow-states", "--compact", "--json").output)
    assert [(r["run_id"], r["current"], r["verdict"]) for r in listed] == [
        (ids["try1"], False, "superseded"),
        (ids["try2"], True, "all_merged"),
        (ids["other"], True, "all_merged"),
    ]
    assert [(o["merged"], o["failed"], o["undecided"]) for o in listed[0]["outcomes"]] == [(3, 2, 0)]


def test_report_selects_by_logical_date_and_limit(audit_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--since`` (inclusive) and ``--until`` (exclusive) select by logical date, ``--limit`` keeps
    the newest and says how many it left out; the selection is the store's, over 241 audit runs."""
    FakeClock.at = T0
    monkeypatch.setattr(dml, "datetime", FakeClock)
    store = AuditStore(engine_for_url(audit_url))
    first = datetime(2026, 1, 1, tzinfo=timezone.utc)
    hourly = {}  # hour since ``first`` -> audit run id
    for hour in range(240):
        FakeClock.move(1)
        logical = first + timedelta(hours=hour)
        identity = RunIdentity(
            dag_id=DAG if hour % 2 else "other_dag",
            airflow_run_id=f"scheduled__{logical.isoformat()}",
            fork_task_id="fork",
            try_number=1,
            run_type="scheduled",
            logical_date=logical,
        )
        hourly[hour] = store.begin_run(identity, branches=list(BRANCHES), chunk_size=10, config={})
    FakeClock.move(1)
    undated = store.begin_run(
        RunIdentity(dag_id=DAG, airflow_run_id="asset_triggered", fork_task_id="fork", try_number=1),
        branches=list(BRANCHES),
        chunk_size=10,
        config={},
    )

    def selected(*args: str) -> list[str]:
        result = CliRunner().invoke(cli.main, ["--url", audit_url, "report", "--compact", "--json", *args])
        assert result.exit_code == 0, result.output
        return [run["run_id"] for run in json.loads(result.stdout)]

    def hours(*wanted: range) -> list[str]:
        return [hourly[h] for r in wanted for h in r]

    assert selected() == [*hours(range(240)), undated]  # by logical date; none last
    assert selected("--since", "2026-01-03", "--until", "2026-01-05") == hours(range(48, 96))
    assert selected("--since", "2026-01-03T12:00:00+02:00", "--until", "2026-01-03T13:00") == hours(
        range(58, 61)
    )
    assert selected("--until", "2026-01-01T02:00:00Z") == hours(range(2))
    assert selected("--since", "2026-01-10T23:00") == hours(range(239, 240))
    assert selected("--since", "2026-01-11") == []
    assert selected("--dag-id", DAG, "--since", "2026-01-05", "--until", "2026-01-06") == hours(
        range(97, 120, 2)
    )

    newest = CliRunner().invoke(
        cli.main, ["--url", audit_url, "report", "--compact", "--json", "--limit", "25"]
    )
    assert [run["run_id"] for run in json.loads(newest.stdout)] == hours(range(215, 240))
    assert newest.stderr == "216 older audit runs left out (--limit 25).\n"
    assert selected("--since", "2026-01-05", "--until", "2026-01-06", "--limit", "4") == hours(
        range(116, 120)
    )
    assert selected("--until", "2026-01-01T02:00", "--limit", "2") == hours(range(2))  # nothing left out

    text = invoke(audit_url, "report", "--no-airflow-states", "--compact", "--dag-id", DAG, "--limit", "3")
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert "118 older audit runs left out (--limit 3)." in lines
    assert [line.split()[:2] for line in lines[-3:]] == [
        ["2026-01-10", "19:00"],
        ["2026-01-10", "21:00"],
        ["2026-01-10", "23:00"],
    ]
    assert all(line.endswith("fork_running") for line in lines[-3:])  # begun, never completed
    full = invoke(audit_url, "report", "--no-airflow-states", "--limit", "1", width=120)
    assert "240 older audit runs left out (--limit 1)." in full.output
    assert full.output.count("no coalesce registered") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "Invalid value for '--since': 'yesterday' is not an ISO 8601 date"),
        (["--until", "2026-13-01"], "Invalid value for '--until': '2026-13-01' is not an ISO 8601 date"),
        (
            ["--since", "2026-01-02", "--until", "2026-01-02"],
            "Invalid value for '--until': until 2026-01-02T00:00:00+00:00 is not after since 2026-01-02",
        ),
        (["--limit", "0"], "Invalid value for '--limit'"),
    ],
)
def test_report_refuses_a_bad_selection(sqlite_url: str, args: list[str], message: str) -> None:
    result = invoke(sqlite_url, "report", "--no-airflow-states", *args, width=200)
    assert result.exit_code == 2
    assert message in result.output
