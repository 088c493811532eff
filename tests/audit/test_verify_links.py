"""``airflow-elspeth verify`` checks every lineage link of a completed run, the derived ones too, and
``explain --json`` lists each token's parents. On SQLite and PostgreSQL.

Only a nested fork's link (its source token -> the upstream merged token) is stored in
``token_parents``; a branch token's parent is its row's source token and a merged token's parents
are the branch tokens its decision consumed (derived, never stored). The runs here are written
through the store's own write path (the calls the fork, the branch steps and the coalesce make),
then damaged with plain SQL as a person or a faulty tool could.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, delete, event, update

from airflow_elspeth import cli
from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.coalesce import coalesce_pass
from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.model import CoalesceSpec
from airflow_elspeth.audit.read.verify import derived_link_findings
from airflow_elspeth.audit.store import (
    AuditStore,
    ForkRow,
    NodeResult,
    RunIdentity,
    branch_token_id,
    merged_token_id,
    source_token_id,
)
from airflow_elspeth.core.canonical import derive_id, hash_value
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
            row_id = derive_id(run_id, key)
            token = branch_token_id(run_id, row_id, branch)
            results.append(
                NodeResult(
                    token_id=token,
                    row_id=row_id,
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


def row(run_id: str, key: str) -> str:
    return derive_id(run_id, key)


def merged(run_id: str, key: str) -> str:
    return merged_token_id(run_id, row(run_id, key), "join")


def branch(run_id: str, key: str, name: str) -> str:
    return branch_token_id(run_id, row(run_id, key), name)


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
    merged_run(audit_engine, "fork2", parents={k: merged(outer, k) for k in KEYS})
    result, out = verify(audit_url)
    assert result.exit_code == 0, out
    assert out["runs_checked"] == 2 and out["findings"] == []


def _delete(table: Any, where: Callable[[str], tuple[Any, ...]]) -> Callable[[Engine, str], None]:
    """Delete the one row of ``table`` that ``where`` (of the run id) selects."""

    def damage(engine: Engine, run_id: str) -> None:
        with engine.begin() as conn:
            assert conn.execute(delete(table).where(*where(run_id))).rowcount == 1

    return damage


def _set(**values: Any) -> Callable[[Engine, str], None]:
    """Update k1's decision: ``values`` may be callables of the run id."""

    def damage(engine: Engine, run_id: str) -> None:
        cd = t.coalesce_decisions.c
        new = {k: v(run_id) if callable(v) else v for k, v in values.items()}
        with engine.begin() as conn:
            changed = conn.execute(
                update(t.coalesce_decisions)
                .where(cd.run_id == run_id, cd.row_id == row(run_id, "k1"))
                .values(new)
            )
            assert changed.rowcount == 1

    return damage


tk, cd, r = t.tokens.c, t.coalesce_decisions.c, t.rows.c

# damage -> the findings it leaves (each check's count, examples and details), run id -> expected.
DAMAGES: dict[str, tuple[Callable[[Engine, str], None], Callable[[str], dict[str, dict[str, Any]]]]] = {
    "source token deleted": (
        _delete(t.tokens, lambda run: (tk.token_id == source_token_id(run, row(run, "k1")),)),
        lambda run: {
            "source_token_missing": {"count": 1, "examples": ["k1"]},
            "branch_parent_missing": {
                "count": 2,
                "examples": sorted(branch(run, "k1", b) for b in BRANCHES),
                "rows": ["k1", "k1"],
                "branches": [b for _, b in sorted((branch(run, "k1", b), b) for b in BRANCHES)],
            },
            # The source token's terminal outcome (forked) is left without its token: no finding.
        },
    ),
    "consumed branch token deleted": (
        _delete(t.tokens, lambda run: (tk.token_id == branch(run, "k1", "b"),)),
        lambda run: {
            # Its node states stay: the log still merges the row as its decision did.
            "consumed_token_missing": {
                "count": 1,
                "examples": ["k1"],
                "coalesces": ["join"],
                "branches": ["b"],
            },
        },
    ),
    "merged token deleted": (
        _delete(t.tokens, lambda run: (tk.token_id == merged(run, "k1"),)),
        lambda run: {
            "merged_token_missing": {
                "count": 1,
                "examples": ["k1"],
                "coalesces": ["join"],
                "merged_token_ids": [merged(run, "k1")],
            },
        },
    ),
    "consumed list names a branch without a token": (
        _set(consumed='["a", "x"]'),
        lambda run: {
            "consumed_token_missing": {
                "count": 1,
                "examples": ["k1"],
                "coalesces": ["join"],
                "branches": ["x"],
            },
            "decision_replay": None,  # the replay consumed a and b
        },
    ),
    "consumed is JSON but no list": (
        # Both databases alike: no elements to look up (SQLite would walk an object's values), and
        # the replay, which consumed a list, disagrees with it.
        _set(consumed='{"a": "b"}'),
        lambda run: {"decision_replay": None},
    ),
    "decision names another row's merged token": (
        _set(merged_token_id=lambda run: merged(run, "k2")),
        lambda run: {
            "merged_token_missing": {
                "count": 1,
                "examples": ["k1"],
                "coalesces": ["join"],
                "merged_token_ids": [merged(run, "k2")],
            },
            "merged_token_without_decision": {"count": 1, "examples": [merged(run, "k1")], "rows": ["k1"]},
        },
    ),
    "decision deleted": (
        _delete(t.coalesce_decisions, lambda run: (cd.run_id == run, cd.row_id == row(run, "k1"))),
        lambda run: {
            "merged_token_without_decision": {"count": 1, "examples": [merged(run, "k1")], "rows": ["k1"]},
        },
    ),
    "row deleted": (
        _delete(t.rows, lambda run: (r.run_id == run, r.row_id == row(run, "k1"))),
        lambda run: {
            "branch_parent_missing": {
                "count": 2,
                "examples": sorted(branch(run, "k1", b) for b in BRANCHES),
                "rows": [None, None],
                "branches": [b for _, b in sorted((branch(run, "k1", b), b) for b in BRANCHES)],
            },
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
    want = expected(run)
    assert checks(out["findings"]) == set(want), out["findings"]
    assert {f["run_id"] for f in out["findings"]} == {run} != {other}
    for check, details in want.items():
        if details is not None:
            assert finding(out["findings"], check) == details, check


def test_verify_names_the_broken_links_in_text(audit_engine: Engine, audit_url: str) -> None:
    run = merged_run(audit_engine)
    DAMAGES["source token deleted"][0](audit_engine, run)
    for width in ("80", "200"):
        text = CliRunner().invoke(
            cli.main, ["--url", audit_url, "verify", "--no-airflow-states"], env={"COLUMNS": width}
        )
        assert text.exit_code == 1, text.output
        said = " ".join(text.output.split())
        assert "2 integrity findings (3 items)" in said
        assert "source_token_missing" in said and "k1" in said
        assert "branch_parent_missing" in said and "2 tokens" in said


def test_a_nested_fork_that_lost_its_upstream_merged_token(audit_engine: Engine, audit_url: str) -> None:
    """The stored link (inner source token -> outer merged token) is an orphan, and the outer
    decision names a merged token that is gone."""
    outer = merged_run(audit_engine)
    inner = merged_run(audit_engine, "fork2", parents={k: merged(outer, k) for k in KEYS})
    DAMAGES["merged token deleted"][0](audit_engine, outer)
    result, out = verify(audit_url)
    assert result.exit_code == 1
    assert sorted((f["run_id"], f["check"]) for f in out["findings"]) == [
        (outer, "merged_token_missing"),
        (inner, "orphan_parent"),
    ]
    orphan = finding(out["findings"], "orphan_parent")
    assert orphan == {
        "count": 1,
        "examples": [source_token_id(inner, row(inner, "k1"))],
        "missing_parents": [merged(outer, "k1")],
    }


def test_explain_json_lists_every_tokens_parents(audit_engine: Engine, audit_url: str) -> None:
    """A source token's parents are none (a nested fork's: the upstream merged token), a branch
    token's its row's source token, a merged token's the branch tokens it consumed, in order."""
    outer = merged_run(audit_engine)
    inner = merged_run(audit_engine, "fork2", parents={k: merged(outer, k) for k in KEYS})
    for run, upstream in ((outer, []), (inner, [merged(outer, "k1")])):
        result = CliRunner().invoke(
            cli.main, ["--url", audit_url, "explain", "k1", "--run-id", run, "--json"]
        )
        assert result.exit_code == 0, result.output
        parents = {tok["token_id"]: tok["parents"] for tok in json.loads(result.output)["tokens"]}
        source = source_token_id(run, row(run, "k1"))
        assert parents == {
            source: upstream,
            branch(run, "k1", "a"): [source],
            branch(run, "k1", "b"): [source],
            merged(run, "k1"): [branch(run, "k1", "a"), branch(run, "k1", "b")],
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
    assert seen == ["off"] * 5
