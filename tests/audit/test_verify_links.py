"""``airflow-elspeth verify`` checks every lineage link of a completed run, the derived ones too, and
``explain --json`` lists each token's parents. On SQLite and PostgreSQL.

In schema 0.2 a token exists exactly while the event it comes from does: a row's source token and
its branch tokens (``runs.branches_json``) while its ``source_rows`` row does, a merged token while
its merged decision does; only a nested fork's link (its source row -> the upstream merged token,
``source_rows.parent_token_id``) is stored. So the links that can break are those between events:
a step result or a decision of a row that is gone, a consumed branch that did not arrive, a merged
decision without its merged row, a nested fork's parent that is no merged token. The runs here are
written through the store's own write path (the calls the fork, the branch steps and the coalesce
make), then damaged with plain SQL on the event tables as a person or a faulty tool could.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, delete, event, update

from airflow_elspeth import cli
from airflow_elspeth.audit import ids
from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.coalesce import coalesce_pass
from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.model import CoalesceSpec, run_number
from airflow_elspeth.audit.read.limbo import UNDECIDED_GRACE, limbo_findings
from airflow_elspeth.audit.read.records import RowsUndecided
from airflow_elspeth.audit.read.runs import RunSelection, select_runs
from airflow_elspeth.audit.read.verify import derived_link_findings, verify_run
from airflow_elspeth.audit.store import AuditStore, ForkRow, NodeResult, RunIdentity
from airflow_elspeth.core.canonical import hash_value
from airflow_elspeth.core.config import coalesce_config
from airflow_elspeth.core.vocabulary import NodeStatus

BRANCHES = ("a", "b")
STEPS = {b: f"step_{b}" for b in BRANCHES}
KEYS = ("k0", "k1", "k2")


def merged_run(engine: Engine, fork_task_id: str = "fork", parents: dict[str, str] | None = None) -> str:
    """A completed audit run whose coalesce merged every row (both branches delivered each); with
    ``parents`` (row key -> upstream merged token), a nested fork's run."""
    store = AuditStore(engine)
    identity = RunIdentity(dag_id="d", airflow_run_id="r", fork_task_id=fork_task_id, try_number=1)
    run_id = store.begin_run(identity, branches=BRANCHES, chunk_size=100, config={"branches": BRANCHES})
    rows = [
        ForkRow.from_row(k, i, {"id": k}, parent_token_id=(parents or {}).get(k)) for i, k in enumerate(KEYS)
    ]
    store.write_fork_chunk(run_id, BRANCHES, 0, rows)
    store.complete_run(run_id, rows_total=len(KEYS), chunks_total=1)
    spec = CoalesceSpec(
        node_id="join",
        config=coalesce_config(branches=BRANCHES, policy="require_all", timeout=600),
        delivering=dict(STEPS),
        mapped=dict.fromkeys(BRANCHES, False),
    )
    for branch, step in STEPS.items():
        store.register_node(run_id, step, "branch", branch, {"branch": branch, "previous_step": None})
    store.register_node(run_id, "join", "coalesce", None, spec.as_dict())
    now = datetime.now(timezone.utc)
    for branch, step in STEPS.items():
        results = []
        for key in KEYS:
            digest, body = hash_value({branch: key})
            results.append(
                NodeResult(
                    token_id=branch_of(engine, run_id, key, branch),
                    row_id=row(engine, run_id, key),
                    chunk=0,
                    status=NodeStatus.COMPLETED,
                    started_at=now,
                    completed_at=now,
                    output_hash=digest,
                    output_body=body,
                )
            )
        store.write_branch_results(
            run_id, step, 1, results, chunk_tokens={0: len(KEYS)}, delivering_to=["join"]
        )
    assert coalesce_pass(store, spec, run_id, dict.fromkeys(STEPS.values(), "running")).done
    return run_id


def row(engine: Engine, run_id: str, key: str) -> str:
    """The row id of ``key`` (its index in ``KEYS``) in the run."""
    with engine.connect() as conn:
        return ids.row_id(run_number(conn, run_id), KEYS.index(key))


def source(engine: Engine, run_id: str, key: str) -> str:
    return ids.source_token_id(row(engine, run_id, key))


def merged(engine: Engine, run_id: str, key: str) -> str:
    return ids.merged_token_id(row(engine, run_id, key), "join")


def branch_of(engine: Engine, run_id: str, key: str, name: str) -> str:
    return ids.branch_token_id(row(engine, run_id, key), name)


def verify(url: str, *args: str) -> tuple[Result, dict[str, Any]]:
    """``airflow-elspeth --url <url> verify --json --no-airflow-states <args>``, and its output."""
    result = CliRunner().invoke(cli.main, ["--url", url, "verify", "--json", "--no-airflow-states", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result, json.loads(result.output)


def checks(findings: list[dict[str, Any]]) -> set[str]:
    return {f["check"] for f in findings}


def finding(findings: list[dict[str, Any]], check: str) -> dict[str, Any]:
    """The one finding of ``check``, without the fields every finding has but its examples."""
    (found,) = [f for f in findings if f["check"] == check]
    return {k: v for k, v in found.items() if k not in ("run_id", "check", "counted")}


# --------------------------------------------------------------------------------------------------


def test_merged_runs_and_a_nested_fork_verify_clean(audit_engine: Engine, audit_url: str) -> None:
    outer = merged_run(audit_engine)
    merged_run(audit_engine, "fork2", parents={k: merged(audit_engine, outer, k) for k in KEYS})
    result, out = verify(audit_url)
    assert result.exit_code == 0, out
    assert out["runs_checked"] == 2 and out["findings"] == []


sr, st, d = t.source_rows.c, t.step_results.c, t.decisions.c


def _of_k1(table: Any, engine: Engine, run_id: str) -> tuple[Any, ...]:
    """The rows of an event table that are k1's in the run."""
    run_no, row_no = ids.row_numbers(row(engine, run_id, "k1"))
    return (table.c.run_no == run_no, table.c.row_no == row_no)


def _delete(table: Any, *where: Any, rows: int = 1) -> Callable[[Engine, str], None]:
    """Delete k1's ``rows`` rows of ``table`` (narrowed by ``where``)."""

    def damage(engine: Engine, run_id: str) -> None:
        with engine.begin() as conn:
            assert conn.execute(delete(table).where(*_of_k1(table, engine, run_id), *where)).rowcount == rows

    return damage


def _set(**values: Any) -> Callable[[Engine, str], None]:
    """Update k1's decision."""

    def damage(engine: Engine, run_id: str) -> None:
        with engine.begin() as conn:
            changed = conn.execute(
                update(t.decisions).where(*_of_k1(t.decisions, engine, run_id)).values(values)
            )
            assert changed.rowcount == 1

    return damage


def _both(*damages: Callable[[Engine, str], None]) -> Callable[[Engine, str], None]:
    def damage(engine: Engine, run_id: str) -> None:
        for one in damages:
            one(engine, run_id)

    return damage


def _without_outcome(engine: Engine, run: str, *names: str) -> dict[str, Any]:
    """The ``tokens_without_outcome`` of k1's branch tokens ``names``: their outcome (coalesced) is
    implied by the merged decision's ``consumed``, so a decision that stops naming them leaves none."""
    return {
        "count": len(names),
        "examples": [branch_of(engine, run, "k1", name) for name in names],
        "example_rows": ["k1"],
        "by_kind": {"branch": len(names)},
        "checked_because": "every row decided",
    }


def _row_gone(engine: Engine, run: str) -> str:
    """k1's row id, as a finding names a row whose key went with it."""
    return row(engine, run, "k1")


# damage -> the findings it leaves (each check's count, examples and details), (engine, run id) ->
# expected.
DAMAGES: dict[
    str, tuple[Callable[[Engine, str], None], Callable[[Engine, str], dict[str, dict[str, Any] | None]]]
] = {
    "source row deleted (its step results and decision stay)": (
        # 0.1's "source token deleted" and "row deleted": the row, its source and branch tokens go.
        _delete(t.source_rows),
        lambda engine, run: {
            "source_token_missing": {"count": 1, "examples": [_row_gone(engine, run)]},
            "branch_parent_missing": {
                "count": 2,
                "examples": [branch_of(engine, run, "k1", b) for b in BRANCHES],
                "rows": [None, None],
                "branches": list(BRANCHES),
            },
        },
    ),
    "a decision whose source row is gone": (
        _both(_delete(t.step_results, rows=2), _delete(t.source_rows)),
        lambda engine, run: {"source_token_missing": {"count": 1, "examples": [_row_gone(engine, run)]}},
    ),
    "a consumed branch result deleted": (
        # 0.1's "consumed branch token deleted": the branch token stays (its row does), its arrival
        # is gone, so the log no longer merges the row either.
        _delete(t.step_results, st.node_id == STEPS["b"]),
        lambda engine, run: {
            "consumed_token_missing": {
                "count": 1,
                "examples": ["k1"],
                "coalesces": ["join"],
                "branches": ["b"],
            },
            "decision_replay": None,  # the replay finds b not arrived: pending
        },
    ),
    "consumed list names a branch without a token": (
        _set(consumed='["a", "x"]'),
        lambda engine, run: {
            "consumed_token_missing": {
                "count": 1,
                "examples": ["k1"],
                "coalesces": ["join"],
                "branches": ["x"],
            },
            "decision_replay": None,  # the replay consumed a and b
            "tokens_without_outcome": _without_outcome(engine, run, "b"),
        },
    ),
    "consumed is JSON but no list": (
        # Both databases alike: no elements to look up (SQLite would walk an object's values), and
        # the replay, which consumed a list, disagrees with it.
        _set(consumed='{"a": "b"}'),
        lambda engine, run: {
            "decision_replay": None,
            "tokens_without_outcome": _without_outcome(engine, run, *BRANCHES),
        },
    ),
    "merged row deleted": (
        # 0.1's "merged token deleted": the merged token's payload is its decision's merged row.
        _set(merged_hash=None, merged_body=None),
        lambda engine, run: {
            "merged_token_missing": {
                "count": 1,
                "examples": ["k1"],
                "coalesces": ["join"],
                "merged_token_ids": [merged(engine, run, "k1")],
            },
        },
    ),
    "a failed decision keeps a merged row": (
        # 0.1's "decision names another row's merged token": a merged row no merged decision names.
        _set(decision="failed", failure_reason="incomplete_branches", consumed="[]"),
        lambda engine, run: {
            "merged_token_without_decision": {
                "count": 1,
                "examples": [merged(engine, run, "k1")],
                "rows": ["k1"],
            },
            "decision_replay": None,  # the replay merges it
            "tokens_without_outcome": _without_outcome(engine, run, *BRANCHES),
        },
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_broken_derived_link_is_a_finding(audit_engine: Engine, audit_url: str, damage: str) -> None:
    run = merged_run(audit_engine)
    other = merged_run(audit_engine, "fork_other")  # left whole: no finding of its own
    do, expected = DAMAGES[damage]
    do(audit_engine, run)
    result, out = verify(audit_url)
    assert result.exit_code == 1, out
    want = expected(audit_engine, run)
    assert checks(out["findings"]) == set(want), out["findings"]
    assert {f["run_id"] for f in out["findings"]} == {run} != {other}
    for check, details in want.items():
        if details is not None:
            assert finding(out["findings"], check) == details, check


def test_a_deleted_decision_leaves_its_row_undecided(audit_engine: Engine) -> None:
    """0.1's "decision deleted": the merged token goes with its decision, and the row is undecided,
    which ``verify`` reports once nothing will decide it (here: past the deadline and its grace)."""
    run = merged_run(audit_engine)
    _delete(t.decisions)(audit_engine, run)
    (audit_run,) = select_runs(audit_engine, RunSelection(run_id=run))
    assert verify_run(audit_engine, audit_run) == []  # before the deadline: still waiting
    later = datetime.now(timezone.utc) + timedelta(seconds=600) + UNDECIDED_GRACE + timedelta(minutes=1)
    (undecided,) = limbo_findings(audit_engine, [audit_run], now=later)
    assert isinstance(undecided, RowsUndecided)
    assert (undecided.count, undecided.examples) == (1, ["k1"])


def test_verify_names_the_broken_links_in_text(audit_engine: Engine, audit_url: str) -> None:
    run = merged_run(audit_engine)
    DAMAGES["source row deleted (its step results and decision stay)"][0](audit_engine, run)
    for width in ("80", "200"):
        text = CliRunner().invoke(
            cli.main, ["--url", audit_url, "verify", "--no-airflow-states"], env={"COLUMNS": width}
        )
        assert text.exit_code == 1, text.output
        said = " ".join(text.output.split())
        assert "2 integrity findings (3 items)" in said
        assert "source_token_missing" in said and _row_gone(audit_engine, run) in said
        assert "branch_parent_missing" in said and "2 tokens" in said


def test_a_nested_fork_that_lost_its_upstream_merged_token(audit_engine: Engine, audit_url: str) -> None:
    """The stored link (inner source row -> outer merged token) is an orphan once the outer
    decision that made that merged token is gone (the outer row is then undecided, not yet limbo)."""
    outer = merged_run(audit_engine)
    inner = merged_run(audit_engine, "fork2", parents={k: merged(audit_engine, outer, k) for k in KEYS})
    _delete(t.decisions)(audit_engine, outer)
    result, out = verify(audit_url)
    assert result.exit_code == 1
    assert sorted((f["run_id"], f["check"]) for f in out["findings"]) == [(inner, "orphan_parent")]
    orphan = finding(out["findings"], "orphan_parent")
    assert orphan == {
        "count": 1,
        "examples": [source(audit_engine, inner, "k1")],
        "missing_parents": [merged(audit_engine, outer, "k1")],
    }


def test_a_nested_fork_parent_that_is_no_merged_token(audit_engine: Engine, audit_url: str) -> None:
    """A parent that names a merged token of a row no coalesce merged, or that is no merged token's
    id at all, is an orphan."""
    outer = merged_run(audit_engine)
    not_merged = ids.merged_token_id(row(audit_engine, outer, "k0"), "no_such_coalesce")
    inner = merged_run(audit_engine, "fork2", parents={"k0": not_merged, "k1": "gone", "k2": "1.x:m:join"})
    result, out = verify(audit_url)
    assert result.exit_code == 1
    assert finding(out["findings"], "orphan_parent") == {
        "count": 3,
        "examples": [source(audit_engine, inner, k) for k in KEYS],
        "missing_parents": [not_merged, "gone", "1.x:m:join"],
    }


def test_explain_json_lists_every_tokens_parents(audit_engine: Engine, audit_url: str) -> None:
    """A source token's parents are none (a nested fork's: the upstream merged token), a branch
    token's its row's source token, a merged token's the branch tokens it consumed, in order."""
    outer = merged_run(audit_engine)
    inner = merged_run(audit_engine, "fork2", parents={k: merged(audit_engine, outer, k) for k in KEYS})
    for run, upstream in ((outer, []), (inner, [merged(audit_engine, outer, "k1")])):
        result = CliRunner().invoke(
            cli.main, ["--url", audit_url, "explain", "k1", "--run-id", run, "--json"]
        )
        assert result.exit_code == 0, result.output
        parents = {tok["token_id"]: tok["parents"] for tok in json.loads(result.output)["tokens"]}
        source_token = source(audit_engine, run, "k1")
        a, b = (branch_of(audit_engine, run, "k1", name) for name in BRANCHES)
        assert parents == {
            source_token: upstream,
            a: [source_token],
            b: [source_token],
            merged(audit_engine, run, "k1"): [a, b],
        }


@pytest.mark.postgres
def test_the_link_checks_run_with_nested_loop_joins_off_on_postgresql(pg_url: str) -> None:
    """Each check reads the whole run: on a run the planner's statistics do not know yet, a nested
    loop join would take quadratic time (see tests/audit/test_whole_run_reads.py), so every one runs
    with them off (the function scan of ``consumed`` still loops over each decision's own list)."""
    engine = engine_for_url(pg_url)
    run = merged_run(engine)
    seen: list[str] = []

    def setting(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            probe = cursor.connection.cursor()
            try:
                probe.execute("SHOW enable_nestloop")
                seen.append(probe.fetchone()[0])
            finally:
                probe.close()

    event.listen(engine, "before_cursor_execute", setting)
    try:
        assert derived_link_findings(engine, run) == []
    finally:
        event.remove(engine, "before_cursor_execute", setting)
    assert seen and set(seen) == {"off"}
