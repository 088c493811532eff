"""The metrics' translation, with a fake stats sink in place of Airflow's: what a coalesce pass, a
branch try and a fork report, under which names and tags, and that passes over the same rows
(re-polls, a second pass, the finalizer after the sensor) never count a decision twice.
The same calls reaching a real StatsD listener: tests/integration/test_metrics_statsd.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from airflow_elspeth import metrics
from airflow_elspeth.audit.coalesce import DecidedRows, PassResult, coalesce_pass
from airflow_elspeth.audit.model import CoalesceSpec
from airflow_elspeth.audit.read.work import branch_work
from airflow_elspeth.audit.store import AuditStore
from airflow_elspeth.core.canonical import hash_value
from airflow_elspeth.core.config import coalesce_config
from airflow_elspeth.core.vocabulary import NodeStatus, NodeType
from airflow_elspeth.runtime.branch import StepTally, row_result

from .support import completed_fork

TAGS = metrics.coalesce_tags("dag", "join", "require_all")
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


Call = tuple[str, str, Any, dict[str, str]]


def counters(calls: list[Call]) -> dict[tuple[str, str | None], int]:
    """Counter totals per (name, reason tag)."""
    totals: dict[tuple[str, str | None], int] = {}
    for kind, name, value, tags in calls:
        if kind == "incr":
            key = (name, tags.get("reason"))
            totals[key] = totals.get(key, 0) + value
    return totals


class FakeSink:
    """Records every call as ``(kind, name, value, tags)``."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def incr(
        self, stat: str, count: int | None = None, rate: float | None = None, *, tags: Any = None
    ) -> None:
        self.calls.append(("incr", stat, count, tags))

    def gauge(
        self,
        stat: str,
        value: float,
        rate: float | None = None,
        delta: bool | None = None,
        *,
        tags: Any = None,
    ) -> None:
        self.calls.append(("gauge", stat, value, tags))

    def timing(self, stat: str, dt: Any, *, tags: Any = None) -> None:
        self.calls.append(("timing", stat, dt, tags))

    def take(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls


def test_a_pass_reports_its_decisions_by_outcome_and_reason_with_the_coalesce_tags() -> None:
    sink = FakeSink()
    result = PassResult(
        rows_total=10,
        rows_decided=8,
        deadline=NOW,
        now=NOW,
        newly_decided=6,
        decided=DecidedRows(
            merged=3,
            failed={"branch_lost": 2, "coalesce_task_failed": 1},
            late_arrivals=1,
            waits_from_first_arrival_ms=(5, 1200),
        ),
    )
    metrics.coalesce_pass(result, TAGS, reopened=4, sink=sink)
    assert sink.calls == [
        ("incr", "elspeth.coalesce.rows_merged", 3, TAGS),
        ("incr", "elspeth.coalesce.rows_failed", 2, {**TAGS, "reason": "branch_lost"}),
        ("incr", "elspeth.coalesce.rows_failed", 1, {**TAGS, "reason": "coalesce_task_failed"}),
        ("incr", "elspeth.coalesce.rows_resolved", 1, {**TAGS, "reason": "coalesce_task_failed"}),
        ("incr", "elspeth.coalesce.late_arrivals", 1, TAGS),
        ("incr", "elspeth.coalesce.rows_reopened", 4, TAGS),
        ("timing", "elspeth.coalesce.decision_latency", timedelta(milliseconds=5), TAGS),
        ("timing", "elspeth.coalesce.decision_latency", timedelta(milliseconds=1200), TAGS),
        ("gauge", "elspeth.coalesce.rows_undecided", 2, TAGS),
    ]
    assert TAGS == {"dag_id": "dag", "task_id": "join", "policy": "require_all"}


def test_a_pass_that_decided_nothing_reports_only_what_is_undecided() -> None:
    sink = FakeSink()
    metrics.coalesce_pass(PassResult(rows_total=5, rows_decided=5, deadline=NOW, now=NOW), TAGS, sink=sink)
    assert sink.calls == [("gauge", "elspeth.coalesce.rows_undecided", 0, TAGS)]


def test_a_branch_try_reports_what_it_kept_and_a_fork_its_rows() -> None:
    sink = FakeSink()
    tags = {"dag_id": "dag", "task_id": "enrich", "branch": "a"}
    tally = StepTally(completed=7, lost={"dropped": 1, "error:ValueError": 2}, late=1, skipped=3)
    metrics.branch_try(tally, tags, sink=sink)
    metrics.branch_try(StepTally(), tags, sink=sink)  # a try that wrote nothing sends nothing
    metrics.fork_rows(12, {"dag_id": "dag", "task_id": "fork"}, sink=sink)
    assert sink.calls == [
        ("incr", "elspeth.branch.rows_completed", 7, tags),
        ("incr", "elspeth.branch.rows_lost", 1, {**tags, "reason": "dropped"}),
        # as Airflow normalises names: StatsD's line protocol ends a name at ":"
        ("incr", "elspeth.branch.rows_lost", 2, {**tags, "reason": "error_ValueError"}),
        ("incr", "elspeth.branch.rows_late", 1, tags),
        ("incr", "elspeth.branch.rows_skipped", 3, tags),
        ("incr", "elspeth.fork.rows", 12, {"dag_id": "dag", "task_id": "fork"}),
    ]


# -- over a real audit store: passes over the same rows ----------------------------------------------


def _deliver(store: AuditStore, run_id: str, branch: str, statuses: dict[str, str]) -> None:
    """Branch ``branch`` answers the rows named in ``statuses`` (row key -> node status)."""
    clock = store.clock()
    results = []
    for item in branch_work(store.engine, run_id, branch, branch, 0, None, coalesces=["join"]).items:
        status = statuses.get(item.row_key)
        if status is None:
            continue
        now = clock()
        digest, body = hash_value({branch: item.row_key}, what="output")
        output = {"output_hash": digest, "output_body": body} if status == NodeStatus.COMPLETED else {}
        error = {"error": {"type": "ValueError", "message": "no"}} if status == NodeStatus.FAILED else {}
        results.append(
            row_result(item, 0, status=status, started_at=now, completed_at=now, **output, **error)
        )
    store.write_branch_results(run_id, branch, 1, results, chunk_tokens={0: 3}, delivering_to=["join"])


def _coalesce(store: AuditStore, run_id: str, policy: str) -> CoalesceSpec:
    spec = CoalesceSpec(
        node_id="join",
        config=coalesce_config(branches=["a", "b"], policy=policy, timeout=3600),
        delivering={"a": "a", "b": "b"},
        mapped={"a": False, "b": False},
    )
    store.register_node(run_id, "join", NodeType.COALESCE, None, spec.as_dict())
    return spec


@pytest.fixture
def run_id(store: AuditStore) -> str:
    """A completed fork of rows r0..r2 into branches a and b, whose steps are registered."""
    run = completed_fork(store, dag_id="dag", airflow_run_id="manual__1", branches=("a", "b"), rows=3)
    for branch in ("a", "b"):
        store.register_node(run, branch, NodeType.BRANCH, branch, {"branch": branch})
    return run


def test_every_decision_is_counted_once_however_many_passes_run(store: AuditStore, run_id: str) -> None:
    """``require_all``: r0 merges, r1 fails ``branch_lost`` (b's callable raised), r2 waits for b. A
    second pass over the same log (a re-poll, another process) counts nothing again; the finalizer's
    pass after the coalesce failed resolves r2, counted once as failed and as resolved."""
    spec = _coalesce(store, run_id, "require_all")
    _deliver(store, run_id, "a", dict.fromkeys(("r0", "r1", "r2"), NodeStatus.COMPLETED))
    _deliver(store, run_id, "b", {"r0": NodeStatus.COMPLETED, "r1": NodeStatus.FAILED})
    running = {"a": "success", "b": "running"}
    sink = FakeSink()
    tags = metrics.coalesce_tags("dag", "join", "require_all")

    metrics.coalesce_pass(coalesce_pass(store, spec, run_id, running), tags, sink=sink)
    first = sink.take()
    assert counters(first) == {
        ("elspeth.coalesce.rows_merged", None): 1,
        ("elspeth.coalesce.rows_failed", "branch_lost"): 1,
    }
    # one latency per decided row with an arrival: r0 and r1 (a arrived for both)
    latencies = [value for kind, _, value, _ in first if kind == "timing"]
    assert len(latencies) == 2 and all(value >= timedelta(0) for value in latencies)
    assert first[-1] == ("gauge", "elspeth.coalesce.rows_undecided", 1, tags)

    metrics.coalesce_pass(coalesce_pass(store, spec, run_id, running), tags, sink=sink)
    assert sink.take() == [("gauge", "elspeth.coalesce.rows_undecided", 1, tags)]

    ended = coalesce_pass(store, spec, run_id, running, ended_state="failed")
    metrics.coalesce_pass(ended, tags, sink=sink)
    assert counters(sink.calls) == {
        ("elspeth.coalesce.rows_failed", "coalesce_task_failed"): 1,
        ("elspeth.coalesce.rows_resolved", "coalesce_task_failed"): 1,
    }


def test_a_branch_answering_after_the_first_arrival_decided_is_a_late_arrival(
    store: AuditStore, run_id: str
) -> None:
    """``first``: both branches answered before the pass; each row is decided at a's arrival, so
    b's answers are late, counted with the decisions that record them, each once."""
    spec = _coalesce(store, run_id, "first")
    _deliver(store, run_id, "a", dict.fromkeys(("r0", "r1", "r2"), NodeStatus.COMPLETED))
    _deliver(store, run_id, "b", dict.fromkeys(("r0", "r1", "r2"), NodeStatus.COMPLETED))
    sink = FakeSink()
    tags = metrics.coalesce_tags("dag", "join", "first")
    states = {"a": "success", "b": "success"}
    for _ in range(2):
        metrics.coalesce_pass(coalesce_pass(store, spec, run_id, states), tags, sink=sink)
    assert counters(sink.calls) == {
        ("elspeth.coalesce.rows_merged", None): 3,
        ("elspeth.coalesce.late_arrivals", None): 3,
    }
    # decided at the first arrival: no wait after it
    assert [value for kind, _, value, _ in sink.calls if kind == "timing"] == [timedelta(0)] * 3
