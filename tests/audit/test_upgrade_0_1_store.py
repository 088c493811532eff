"""A store written by schema 0.1 upgrades to 0.2 and answers as it did.

The store is ``fixtures/store_0_1`` (README there): what 0.1 wrote in the SQLite scenarios of
tests/integration, loaded at revision 0005, with the answers 0.1's CLI gave on it. After
``migrate.upgrade`` (0006, then the batch conversion of ``audit.legacy``) the CLI must give the same
answers once 0.1's ids are translated to 0.2's (``audit.ids``), and ``verify`` must find nothing.
What legitimately differs, and is normalised before comparing:

* ``outcome_id`` (explain): 0.2 stores only the outcomes no event implies, numbered afresh by the
  conversion; an implied one (forked, merged, coalesced) has none. Checked as such, then dropped.
* the order of a row's tokens (explain): 0.1 read them in no stated order; sorted by token id.

Everything else (timestamps, hashes, bodies, counts, verdicts, reasons, join groups) must be equal.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fixtures.store_0_1.load import load_store_0_1, read_tables
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.pool import NullPool

from airflow_elspeth.audit import ids, legacy, migrate
from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.engine import create_audit_engine
from airflow_elspeth.cli import main
from airflow_elspeth.core.canonical import derive_id
from airflow_elspeth.core.vocabulary import TokenOutcome

ANSWERS_FILE = Path(__file__).resolve().parent / "fixtures" / "store_0_1" / "answers.json.gz"
ROWS_PER_BATCH = 300  # the fixture's 3080 rows take a few dozen batches
IMPLIED = {TokenOutcome.FORKED, TokenOutcome.MERGED, TokenOutcome.COALESCED}


@functools.cache
def answers_0_1() -> dict[str, Any]:
    with gzip.open(ANSWERS_FILE, "rt", encoding="utf-8") as handle:
        answers: dict[str, Any] = json.load(handle)
    return answers


@pytest.fixture
def store_0_1(audit_url: str) -> Iterator[Engine]:
    """``audit_url``'s database holding the 0.1 store at revision 0005."""
    engine = create_audit_engine(audit_url, poolclass=NullPool)
    load_store_0_1(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """``migrate.upgrade`` converts in batches of :data:`ROWS_PER_BATCH` rows."""
    monkeypatch.setattr(
        migrate, "convert_legacy", functools.partial(legacy.convert_legacy, rows_per_batch=ROWS_PER_BATCH)
    )


def cli(url: str, *args: str) -> tuple[int, Any]:
    """The CLI's exit code and JSON output, as the fixture's answers were captured."""
    result = CliRunner().invoke(main, ["--url", url, *args], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def cli_json(url: str, *args: str) -> Any:
    code, found = cli(url, *args)
    assert code == 0, (args, found)
    return found


def id_translation(engine: Engine) -> dict[str, str]:
    """0.1's id -> 0.2's, for every row, token, node state, fork group and join group."""
    answers = answers_0_1()
    with engine.connect() as conn:
        run_no = dict(conn.execute(text("SELECT run_id, run_no FROM runs")).all())
        coalesces: dict[str, list[str]] = {}
        for run_id, node_id in conn.execute(
            text("SELECT run_id, node_id FROM nodes WHERE node_type = 'coalesce'")
        ):
            coalesces.setdefault(run_id, []).append(node_id)
    new: dict[str, str] = {}
    for run_id, known in answers["ids"].items():
        for old_row, row_no in known["rows"].items():
            row = ids.row_id(run_no[run_id], row_no)
            new[old_row] = row
            # 0.1's group ids were derive_id(run, row, "fork" | "join", coalesce).
            new[derive_id(run_id, old_row, "fork")] = ids.fork_group_id(row)
            for node_id in coalesces.get(run_id, []):
                new[derive_id(run_id, old_row, "join", node_id)] = ids.join_group_id(row, node_id)
        for old_token, (kind, row_no, where) in known["tokens"].items():
            row = ids.row_id(run_no[run_id], row_no)
            new[old_token] = {
                "source": ids.source_token_id(row),
                "branch": ids.branch_token_id(row, where),
                "merged": ids.merged_token_id(row, where),
            }[kind]
    for old_state, (old_token, node_id, attempt) in answers["states"].items():
        token = new[old_token]
        merged = token == ids.merged_token_id(token.split(":", 1)[0], node_id)
        new[old_state] = token if merged else ids.state_id(token, node_id, attempt)
    return new


def translated(value: Any, new: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {new.get(k, k): translated(v, new) for k, v in value.items()}
    if isinstance(value, list):
        return [translated(v, new) for v in value]
    if isinstance(value, str):
        return new.get(value, value)
    return value


def normalised_explain(answer: dict[str, Any], *, converted: bool) -> dict[str, Any]:
    """An explain answer without what legitimately differs (module docstring)."""
    tokens = []
    for token in answer["tokens"]:
        outcomes = []
        for outcome in token["outcomes"]:
            if converted:
                assert (outcome["outcome_id"] is None) == (outcome["outcome"] in IMPLIED), outcome
            outcomes.append({k: v for k, v in outcome.items() if k != "outcome_id"})
        tokens.append({**token, "outcomes": outcomes})
    return {**answer, "tokens": sorted(tokens, key=lambda token: token["token_id"])}


def assert_answers_of_0_1(engine: Engine, url: str, *, explain_runs: set[str] | None = None) -> None:
    """``verify`` finds nothing; index, every report and explain of every captured row of
    ``explain_runs`` (default: all) equal 0.1's, translated."""
    code, verified = cli(url, "verify", "--json", "--no-airflow-states")
    assert (code, verified["findings"]) == (0, [])
    assert verified["runs_checked"] == len(answers_0_1()["report"])
    new = id_translation(engine)
    answers = answers_0_1()
    assert cli_json(url, "report", "--json", "--compact", "--no-airflow-states") == translated(
        answers["index"], new
    )
    for run_id, expected in answers["report"].items():
        found = cli_json(url, "report", "--json", "--no-airflow-states", "--run-id", run_id)
        assert found == translated(expected, new), run_id
    for run_id, rows in answers["explain"].items():
        if explain_runs is not None and run_id not in explain_runs:
            continue
        for row_key, expected in rows.items():
            found = cli_json(url, "explain", "--json", "--run-id", run_id, row_key)
            assert normalised_explain(found, converted=True) == normalised_explain(
                translated(expected, new), converted=False
            ), (run_id, row_key)


def event_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (t.source_rows, t.step_results, t.decisions, t.recorded_outcomes)
        }


@pytest.mark.timeout(900)
def test_a_0_1_store_upgraded_in_batches_answers_as_0_1_did(
    store_0_1: Engine, audit_url: str, small_batches: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = []
    convert = legacy._convert_batch

    def counted(*args: Any, **kwargs: Any) -> int:
        batches.append(args[1:])
        return convert(*args, **kwargs)

    monkeypatch.setattr(legacy, "_convert_batch", counted)
    migrate.upgrade(store_0_1)

    assert len(batches) > 10  # several batches, not one transaction
    assert migrate.current_revision(store_0_1) == migrate.head_revision()
    assert not any(name.startswith("legacy_") for name in inspect(store_0_1).get_table_names())
    tables = read_tables()
    assert event_counts(store_0_1)["source_rows"] == len(tables["rows"]["rows"])
    with store_0_1.connect() as conn:
        numbered = conn.execute(text("SELECT run_id FROM runs ORDER BY run_no")).scalars().all()
    runs = read_tables()["runs"]
    started = {
        row[runs["columns"].index("run_id")]: row[runs["columns"].index("started_at")] for row in runs["rows"]
    }
    assert numbered == sorted(started, key=lambda run_id: (started[run_id], run_id))
    assert_answers_of_0_1(store_0_1, audit_url)


@pytest.mark.timeout(900)
def test_an_interrupted_conversion_leaves_whole_batches_and_resumes(
    store_0_1: Engine, audit_url: str, small_batches: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert = legacy._convert_batch
    calls: list[tuple[str, list[int]]] = []

    def second_fails(conn: Any, run_id: str, chunks: list[int]) -> int:
        calls.append((run_id, list(chunks)))
        if len(calls) == 2:
            raise ConnectionError("the database went away")
        return convert(conn, run_id, chunks)

    monkeypatch.setattr(legacy, "_convert_batch", second_fails)
    with pytest.raises(ConnectionError):
        migrate.upgrade(store_0_1)

    # The schema is at head, the first batch converted whole, the second left legacy whole.
    assert migrate.current_revision(store_0_1) == migrate.head_revision()
    (first_run, first_chunks), (second_run, second_chunks) = calls
    rows = read_tables()["rows"]
    column = {name: i for i, name in enumerate(rows["columns"])}
    per_chunk: dict[tuple[str, int], int] = {}
    for row in rows["rows"]:
        key = (row[column["run_id"]], row[column["chunk"]])
        per_chunk[key] = per_chunk.get(key, 0) + 1
    with store_0_1.connect() as conn:
        run_no = conn.execute(
            text("SELECT run_no FROM runs WHERE run_id = :r"), {"r": first_run}
        ).scalar_one()
        converted = dict(
            conn.execute(
                select(t.source_rows.c.chunk, func.count()).group_by(
                    t.source_rows.c.run_no, t.source_rows.c.chunk
                )
            ).all()
        )
        assert set(conn.execute(select(t.source_rows.c.run_no)).scalars()) == {run_no}
        assert {
            tuple(r)
            for r in conn.execute(
                text("SELECT run_id, chunk FROM legacy_rows WHERE run_id = :r"), {"r": first_run}
            )
        }.isdisjoint((first_run, c) for c in first_chunks)
        left = conn.execute(
            text("SELECT COUNT(*) FROM legacy_rows WHERE run_id = :r AND chunk = :c"),
            {"r": second_run, "c": second_chunks[0]},
        ).scalar_one()
    assert converted == {chunk: per_chunk[(first_run, chunk)] for chunk in first_chunks}
    assert left == per_chunk[(second_run, second_chunks[0])]
    for table in (t.step_results, t.decisions):
        with store_0_1.connect() as conn:
            assert set(conn.execute(select(table.c.chunk).where(table.c.run_no == run_no)).scalars()) <= set(
                first_chunks
            )

    monkeypatch.setattr(legacy, "_convert_batch", convert)
    migrate.upgrade(store_0_1)
    assert not any(name.startswith("legacy_") for name in inspect(store_0_1).get_table_names())
    # The runs the interruption split, explained row by row; every run reported.
    assert_answers_of_0_1(store_0_1, audit_url, explain_runs={first_run, second_run})
