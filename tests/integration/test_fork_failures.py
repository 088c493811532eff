"""A fork that fails for any reason marks its audit run failed, says why, and keeps nothing of it.

Two halves, each on SQLite and PostgreSQL:

* ``ForkOperator.execute`` driven directly with a stand-in task instance (fast): every kind of
  exception a try can end with (errors, RecursionError, KeyboardInterrupt, SystemExit, Airflow's
  SIGTERM exception), the audit store failing while the run is closed, PostgreSQL refusing a row.
* ``dag.test()`` runs (tests/integration/dags/elspeth_it_fork_failure_dags.py): a source raising
  after 2,500 rows, the same source succeeding on the fork's retry, bad row keys, a row over
  ``[elspeth] max_row_bytes`` and one of shared references expanding to 2**50 values (memory
  measured), a SIGTERM while the source still yields rows, the run's completion failing after its
  XCom was pushed.
"""

from __future__ import annotations

import importlib.util
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.store import AuditStore, ForkRow, RunIdentity
from airflow_elspeth.operators import fork as fork_module
from airflow_elspeth.operators.fork import AUDIT_RUN_XCOM_KEY, DEFAULT_MAX_ROW_BYTES, ForkOperator

from .checks import audit_runs, check_run_integrity, q, ti_states, ti_try_numbers, xcom
from .support import DAGS_DIR, RssGrowth, patched_env, run_env

pytestmark = pytest.mark.integration

DAG_MODULE = "elspeth_it_fork_failure_dags"
# What a fork try leaves in the audit store, per table, keyed by run_id.
RUN_TABLES = ("rows", "tokens", "token_outcomes", "node_states", "chunk_progress", "coalesce_decisions")
FINISHED = {"success", "failed", "upstream_failed", "skipped"}


def dags() -> ModuleType:
    module = sys.modules.get(DAG_MODULE)
    if module is None:
        spec = importlib.util.spec_from_file_location(DAG_MODULE, DAGS_DIR / f"{DAG_MODULE}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[DAG_MODULE] = module
        spec.loader.exec_module(module)
    return module


D = dags()


def left_behind(engine: Any, run_id: str) -> dict[str, int]:
    """Rows a run still has, per table (only non-zero counts), and orphaned token parents."""
    counts = {
        table: q(engine, f"SELECT COUNT(*) AS n FROM {table} WHERE run_id = :r", r=run_id)[0]["n"]
        for table in RUN_TABLES
    }
    counts["orphan token_parents"] = q(
        engine,
        "SELECT COUNT(*) AS n FROM token_parents p"
        " WHERE NOT EXISTS (SELECT 1 FROM tokens t WHERE t.token_id = p.token_id)",
    )[0]["n"]
    return {table: n for table, n in counts.items() if n}


def running(engine: Any) -> list[dict[str, Any]]:
    return q(engine, "SELECT run_id, dag_id, try_number FROM runs WHERE status = 'running'")


def assert_failed_and_empty(engine: Any, run: dict[str, Any], reason_prefix: str) -> None:
    assert run["status"] == "failed", run
    assert run["rows_total"] == 0 and run["completed_at"] is not None, run
    assert run["status_reason"] and run["status_reason"].startswith(reason_prefix), run["status_reason"]
    assert not left_behind(engine, run["run_id"]), left_behind(engine, run["run_id"])


# ------------------------------------------------------------------------------------------------
# execute() driven directly


class FakeTI:
    """The task instance attributes and XCom push the fork uses."""

    def __init__(self, try_number: int = 1) -> None:
        self.dag_id = "elspeth_fork_direct"
        self.run_id = "manual__direct"
        self.task_id = "fork"
        self.map_index = -1
        self.try_number = try_number
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


def context(ti: FakeTI) -> Any:
    return {"ti": ti, "dag_run": SimpleNamespace(clear_number=0, run_type="manual"), "logical_date": None}


def hook_on(engine: Any) -> Any:
    """An ``ElspethAuditHook`` stand-in whatever its connection: the store of ``engine``."""
    return lambda audit_conn_id=None: SimpleNamespace(
        get_engine=lambda: engine, get_store=lambda: AuditStore(engine)
    )


@pytest.fixture
def direct_engine(audit_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The audit engine of ``audit_url``, which every ForkOperator of the test writes to."""
    engine = engine_for_url(audit_url)
    monkeypatch.setattr(fork_module, "ElspethAuditHook", hook_on(engine))
    # One chunk per transaction, so a few rows are enough to leave whole chunks written before the
    # failure (by default the fork writes FORK_ROWS_PER_WRITE rows per transaction).
    monkeypatch.setattr(fork_module, "FORK_ROWS_PER_WRITE", 1)
    return engine


def rows_then(error: BaseException | None, count: int = 5) -> Any:
    def source() -> Iterator[dict[str, Any]]:
        for n in range(count):
            yield {"id": f"r{n}", "n": n}
        if error is not None:
            raise error

    return source


def make_fork(rows: Any) -> ForkOperator:
    return ForkOperator(task_id="fork", rows=rows, row_key="id", branches=["a", "b"], chunk_size=2)


def produced(rows: list[dict[str, Any]]) -> Any:
    """``rows`` as a callable returns them, at run time: a literal list's bad rows are refused
    when the DAG is parsed (tests/unit), these tests are about the ones only the run sees."""
    return lambda: rows


def _terminated() -> BaseException:
    from airflow.sdk.exceptions import AirflowTaskTerminated

    return AirflowTaskTerminated("Task received SIGTERM signal")


ERRORS = {
    "RuntimeError": (lambda: RuntimeError("upstream API returned 503"), "error:RuntimeError: upstream API"),
    "RecursionError": (
        lambda: RecursionError("maximum recursion depth exceeded"),
        "error:RecursionError: maximum recursion depth exceeded",
    ),
    "KeyboardInterrupt": (lambda: KeyboardInterrupt(), "interrupted:KeyboardInterrupt"),
    "SystemExit": (lambda: SystemExit("worker lost"), "interrupted:SystemExit: worker lost"),
    "AirflowTaskTerminated": (_terminated, "interrupted:AirflowTaskTerminated: Task received SIGTERM"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_any_exception_part_way_fails_the_run_and_is_reraised_unchanged(
    kind: str, direct_engine: Any
) -> None:
    """Two whole chunks are written before the source raises; the error itself reaches Airflow."""
    make_error, reason = ERRORS[kind]
    error = make_error()
    ti = FakeTI()
    with pytest.raises(type(error)) as raised:
        make_fork(rows_then(error)).execute(context(ti))
    assert raised.value is error
    (run,) = audit_runs(direct_engine, ti.dag_id, ti.run_id)
    assert_failed_and_empty(direct_engine, run, reason)
    assert not running(direct_engine)
    assert AUDIT_RUN_XCOM_KEY not in ti.xcoms


@pytest.mark.timeout(60)
def test_a_row_nested_too_deeply_is_a_bad_row_not_a_recursion_error(direct_engine: Any) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    deep: Any = 1
    for _ in range(sys.getrecursionlimit() * 2):
        deep = [deep]
    rows = [{"id": "r0", "n": 0}, {"id": "r1", "n": 1}, {"id": "r2", "deep": deep}]
    ti = FakeTI()
    with pytest.raises(AirflowFailException) as raised:
        make_fork(rows).execute(context(ti))
    message = str(raised.value)
    assert "row 'r2'" in message and "nested too deeply" in message, message
    assert "nothing of audit run" in message
    (run,) = audit_runs(direct_engine, ti.dag_id, ti.run_id)
    assert_failed_and_empty(direct_engine, run, "bad_row: row 'r2'")


DUPLICATES = {
    # Two rows a write (chunk_size 2, FORK_ROWS_PER_WRITE 1): rows 0-1, then 2-3, ...
    "within_one_write": ([{"id": "r0"}, {"id": "r1"}, {"id": "r2"}, {"id": "r2"}], "'r2' (row at index 3)"),
    "against_an_earlier_write": (
        [{"id": "r0"}, {"id": "r1"}, {"id": "r2"}, {"id": "r0"}],
        "'r0' (row at index 3)",
    ),
    # The duplicate is found only by writing its row; the row after it fails validation first, and
    # the duplicate, the first bad row, is still the one named.
    "before_an_invalid_row": (
        [{"id": "r0"}, {"id": "r1"}, {"id": "r1"}, {"id": "r3", "n": float("nan")}],
        "'r1' (row at index 2)",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_a_duplicate_key_fails_the_fork_naming_the_first_bad_row(case: str, direct_engine: Any) -> None:
    """The fork keeps no per-row state in memory: a key of an earlier write is found by the rows'
    unique key in the store, and the write holding it is not kept."""
    from airflow.sdk.exceptions import AirflowFailException

    rows, named = DUPLICATES[case]
    ti = FakeTI()
    with pytest.raises(AirflowFailException, match=r"duplicate row key " + re.escape(named)):
        make_fork(produced(rows)).execute(context(ti))
    (run,) = audit_runs(direct_engine, ti.dag_id, ti.run_id)
    assert_failed_and_empty(direct_engine, run, "bad_row: duplicate row key " + named)


@pytest.fixture
def writes(direct_engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The chunk numbers of each write_fork_chunks call, with writes of up to FORK_ROWS_PER_WRITE
    rows (5,000) and a character budget of 250: large rows, not their count, end these writes."""
    monkeypatch.setattr(fork_module, "FORK_ROWS_PER_WRITE", 5_000)
    monkeypatch.setattr(fork_module, "FORK_CHARS_PER_WRITE", 250)
    calls: list[list[int]] = []
    original = AuditStore.write_fork_chunks

    def spy(self: AuditStore, run_id: str, branches: Any, chunks: Any) -> None:
        original(self, run_id, branches, chunks)
        calls.append([chunk for chunk, _ in chunks])

    monkeypatch.setattr(AuditStore, "write_fork_chunks", spy)
    return calls


def padded(key: str) -> dict[str, Any]:
    return {"id": key, "text": "x" * 90}  # about 110 characters of canonical JSON


@pytest.mark.timeout(60)
def test_a_write_ends_at_the_first_whole_chunk_past_its_character_budget(
    direct_engine: Any, writes: list[list[int]]
) -> None:
    """Two chunks of two rows pass 250 characters: the fork holds that, not 5,000 large rows."""
    ti = FakeTI()
    assert make_fork([padded(f"r{n}") for n in range(7)]).execute(context(ti)) == [0, 1, 2, 3]
    assert writes == [[0, 1], [2, 3]]
    (run,) = audit_runs(direct_engine, ti.dag_id, ti.run_id)
    assert run["status"] == "completed" and run["rows_total"] == 7


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("duplicate_of", "written"),
    [("r1", [[0, 1]]), ("r4", [[0, 1]])],
    ids=["of-an-earlier-write", "within-the-write-in-progress"],
)
def test_a_duplicate_key_is_found_across_writes_ended_by_their_size(
    duplicate_of: str, written: list[list[int]], direct_engine: Any, writes: list[list[int]]
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    rows = [padded(f"r{n}") for n in range(5)] + [padded(duplicate_of)]
    ti = FakeTI()
    named = f"'{duplicate_of}' (row at index 5)"
    with pytest.raises(AirflowFailException, match=r"duplicate row key " + re.escape(named)):
        make_fork(produced(rows)).execute(context(ti))
    assert writes == written
    (run,) = audit_runs(direct_engine, ti.dag_id, ti.run_id)
    assert_failed_and_empty(direct_engine, run, "bad_row: duplicate row key " + named)


def test_writing_the_same_rows_again_is_no_duplicate(direct_engine: Any) -> None:
    """A write retried with the same rows at the same indexes (the same try run again) stores
    nothing twice and is not taken for a duplicate key."""
    store = AuditStore(direct_engine)
    run_id = store.begin_run(
        RunIdentity(
            dag_id="elspeth_fork_direct", airflow_run_id="manual__again", fork_task_id="fork", try_number=1
        ),
        branches=["a", "b"],
        chunk_size=2,
        config={},
    )
    rows = [ForkRow.from_row(f"r{n}", n, {"id": f"r{n}"}) for n in range(2)]
    store.write_fork_chunks(run_id, ["a", "b"], [(0, rows)])
    store.write_fork_chunks(run_id, ["a", "b"], [(0, rows)])
    assert left_behind(direct_engine, run_id)["rows"] == 2


@pytest.mark.timeout(60)
def test_when_the_store_cannot_fail_the_run_the_original_error_is_reraised_and_the_next_try_closes_it(
    direct_engine: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    error = RuntimeError("source went away")

    def store_down(self: AuditStore, run_id: str, reason: str) -> None:
        raise ConnectionError("audit database unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(AuditStore, "fail_run", store_down)
        with pytest.raises(RuntimeError) as raised:
            make_fork(rows_then(error)).execute(context(FakeTI(try_number=1)))
    assert raised.value is error
    logged = "".join(capsys.readouterr())  # Airflow's task logging writes there, not to caplog
    assert "Could not mark audit run" in logged and "audit database unreachable" in logged, logged
    (first,) = audit_runs(direct_engine, "elspeth_fork_direct", "manual__direct")
    assert first["status"] == "running" and left_behind(direct_engine, first["run_id"])

    ti = FakeTI(try_number=2)
    assert make_fork(rows_then(None)).execute(context(ti)) == [0, 1, 2]
    first, second = audit_runs(direct_engine, ti.dag_id, ti.run_id)
    assert_failed_and_empty(direct_engine, first, "fork_task_ended: try 2 started")
    assert second["status"] == "completed" and second["rows_total"] == 5
    assert second["previous_run_id"] == first["run_id"]
    assert ti.xcoms[AUDIT_RUN_XCOM_KEY]["audit_run_id"] == second["run_id"]
    kept = left_behind(direct_engine, second["run_id"])
    assert (kept["rows"], kept["tokens"], kept["token_outcomes"]) == (5, 15, 5), kept  # 5 "forked"
    assert not running(direct_engine)


@pytest.mark.timeout(60)
def test_a_bad_row_when_the_store_cannot_fail_the_run_still_fails_the_task_saying_so(
    direct_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    def store_down(self: AuditStore, run_id: str, reason: str) -> None:
        raise ConnectionError("audit database unreachable")

    monkeypatch.setattr(AuditStore, "fail_run", store_down)
    rows = [{"id": "r0"}, {"id": "r1"}, {"id": "r2"}, {"id": None}]
    with pytest.raises(AirflowFailException) as raised:
        make_fork(produced(rows)).execute(context(FakeTI()))
    message = str(raised.value)
    assert "row at index 3 has no row_key column 'id'" in message, message
    assert "could not be marked failed" in message and "nothing of audit run" not in message


@pytest.mark.timeout(60)
def test_the_run_failing_to_complete_takes_back_its_xcom(
    direct_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    deleted: list[Any] = []
    monkeypatch.setattr(fork_module, "_delete_audit_run_xcom", lambda ctx, log: deleted.append(ctx["ti"]))

    def complete_fails(self: AuditStore, run_id: str, **kwargs: Any) -> None:
        raise RuntimeError("audit store went away")

    monkeypatch.setattr(AuditStore, "complete_run", complete_fails)
    ti = FakeTI()
    with pytest.raises(RuntimeError, match="audit store went away"):
        make_fork(rows_then(None)).execute(context(ti))
    assert deleted == [ti]
    (run,) = audit_runs(direct_engine, ti.dag_id, ti.run_id)
    assert_failed_and_empty(direct_engine, run, "error:RuntimeError: audit store went away")


def _incompressible(chars: int) -> str:
    return secrets.token_urlsafe(chars)[:chars]


@pytest.mark.timeout(60)
@pytest.mark.postgres
@pytest.mark.parametrize(
    ("key", "refusal"),
    [
        pytest.param(lambda: _incompressible(9000), "index row", id="key-over-the-btree-limit"),
        pytest.param(lambda: "r\x002", "NUL", id="key-with-nul"),
    ],
)
def test_postgresql_refusing_a_row_fails_the_run_with_the_database_error(
    key: Any, refusal: str, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the fork's own key checks bypassed, PostgreSQL itself refuses the key: the run still ends
    failed, naming the database's error, and the error reaches Airflow (which retries it)."""
    engine = engine_for_url(pg_url)
    monkeypatch.setattr(fork_module, "ElspethAuditHook", hook_on(engine))
    monkeypatch.setattr(fork_module, "row_key_text", str)
    rows = [{"id": "r0"}, {"id": "r1"}, {"id": key()}]
    ti = FakeTI()
    with pytest.raises(Exception) as raised:  # whatever the driver raises
        make_fork(rows).execute(context(ti))
    assert refusal in str(raised.value), raised.value
    (run,) = audit_runs(engine, ti.dag_id, ti.run_id)
    assert_failed_and_empty(engine, run, f"error:{type(raised.value).__name__}: ")
    assert refusal in run["status_reason"] and "[SQL:" not in run["status_reason"], run["status_reason"]
    assert not running(engine)


# ------------------------------------------------------------------------------------------------
# dag.test()


def run_failure_dag(dag: Any, audit_url: str, **env: str) -> Any:
    with patched_env(**run_env(dag.dag_id, audit_url), **env):
        return dag.test()


@pytest.fixture
def chunks_written(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The chunk numbers the forks of the test wrote (before anything was removed again)."""
    written: list[int] = []
    original = AuditStore.write_fork_chunks

    def spy(self: AuditStore, run_id: str, branches: Any, chunks: Any) -> None:
        original(self, run_id, branches, chunks)
        written.extend(chunk for chunk, _ in chunks)

    monkeypatch.setattr(AuditStore, "write_fork_chunks", spy)
    # One chunk per transaction, as the tests count whole chunks written before a failure (by
    # default the fork writes FORK_ROWS_PER_WRITE rows, several chunks, per transaction).
    monkeypatch.setattr(fork_module, "FORK_ROWS_PER_WRITE", 1)
    return written


def fork_runs(engine: Any, dag_run: Any) -> list[dict[str, Any]]:
    return [r for r in audit_runs(engine, dag_run.dag_id, dag_run.run_id) if r["fork_task_id"] == "fork"]


def assert_fork_side_closed(engine: Any, dag_run: Any) -> None:
    """Every task ended and no audit run of the DAG run is left running."""
    states = ti_states(dag_run)
    assert set(states.values()) <= FINISHED, states
    left = [r for r in running(engine) if r["dag_id"] == dag_run.dag_id]
    assert not left, f"audit runs left running: {left}"


@pytest.mark.timeout(240)
def test_a_source_raising_after_2500_rows_fails_the_fork_and_keeps_nothing(
    audit_url: str, airflow_metadata: str, chunks_written: list[int]
) -> None:
    D.FORK_ERRORS.pop(D.SOURCE_FAILS, None)
    dag_run = run_failure_dag(D.build_dag(D.SOURCE_FAILS), audit_url)
    states = ti_states(dag_run)
    assert states["fork"] == "failed", states
    assert {states["ask_a"], states["ask_b"]} == {"upstream_failed"}, states
    assert D.SOURCE_ERROR in D.FORK_ERRORS[D.SOURCE_FAILS]
    assert chunks_written == [0, 1], "two whole chunks were written before the source raised"

    engine = engine_for_url(audit_url)
    (run,) = fork_runs(engine, dag_run)
    assert_failed_and_empty(engine, run, f"error:RuntimeError: {D.SOURCE_ERROR}")
    assert xcom(dag_run, "fork", AUDIT_RUN_XCOM_KEY) is None
    assert_fork_side_closed(engine, dag_run)


@pytest.mark.timeout(300)
def test_a_source_failing_on_the_first_try_only_succeeds_on_the_retry(
    audit_url: str, airflow_metadata: str, tmp_path: Path, chunks_written: list[int]
) -> None:
    marker = tmp_path / "first-try-done"
    dag_run = run_failure_dag(D.build_dag(D.SOURCE_FAILS_ONCE, marker=marker), audit_url)
    states = ti_states(dag_run)
    assert states["fork"] == "success" and ti_try_numbers(dag_run)["fork"] == 2, states
    assert chunks_written == [0, 1, 0, 1, 2]

    engine = engine_for_url(audit_url)
    first, second = fork_runs(engine, dag_run)
    assert (first["try_number"], second["try_number"]) == (1, 2)
    assert_failed_and_empty(engine, first, f"error:RuntimeError: {D.SOURCE_ERROR}")
    assert second["status"] == "completed" and second["status_reason"] is None, second
    assert (second["rows_total"], second["chunks_total"]) == (D.FAIL_AFTER, 3)
    assert second["previous_run_id"] == first["run_id"]
    assert xcom(dag_run, "fork", AUDIT_RUN_XCOM_KEY)["audit_run_id"] == second["run_id"]
    outcomes = check_run_integrity(engine, second["run_id"])
    assert outcomes.get("merged") == D.FAIL_AFTER, outcomes
    assert states["coalesce"] == "success", states
    summary = xcom(dag_run, "coalesce")
    assert summary["audit_run_id"] == second["run_id"] and summary["rows_merged"] == D.FAIL_AFTER
    assert_fork_side_closed(engine, dag_run)


BAD_KEYS = {
    # dag -> what the fork's error names
    D.LONG_KEY: ["row at index 4", f"is {D.LONG_KEY_CHARS} UTF-8 bytes", "more than the 1000 allowed"],
    D.NUL_KEY: ["row at index 4", "'r\\x004'", "NUL character"],
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dag_id", sorted(BAD_KEYS))
def test_a_row_key_the_backends_cannot_index_fails_the_fork_naming_the_row(
    dag_id: str, audit_url: str, airflow_metadata: str, chunks_written: list[int]
) -> None:
    D.FORK_ERRORS.pop(dag_id, None)
    dag_run = run_failure_dag(D.build_dag(dag_id), audit_url)
    states = ti_states(dag_run)
    assert states["fork"] == "failed", states
    message = D.FORK_ERRORS[dag_id]
    for needle in BAD_KEYS[dag_id]:
        assert needle in message, message
    assert "nothing of audit run" in message
    assert len(message) < 500, "the key is shown cut short"
    assert chunks_written == [0, 1]

    engine = engine_for_url(audit_url)
    (run,) = fork_runs(engine, dag_run)
    assert_failed_and_empty(engine, run, "bad_row: row at index 4")
    assert xcom(dag_run, "fork", AUDIT_RUN_XCOM_KEY) is None
    assert_fork_side_closed(engine, dag_run)


def assert_bad_row_failed_the_fork(
    engine: Any, dag_run: Any, message: str, chunks_written: list[int], reason: str
) -> None:
    """The fork failed on row r4 (after two whole chunks were written) with ``reason``: its run is
    failed naming it, nothing of it kept, no XCom, nothing left running."""
    states = ti_states(dag_run)
    assert states["fork"] == "failed", states
    assert reason in message and "nothing of audit run" in message, message
    assert chunks_written == [0, 1]
    (run,) = fork_runs(engine, dag_run)
    assert_failed_and_empty(engine, run, f"bad_row: {reason}")
    assert xcom(dag_run, "fork", AUDIT_RUN_XCOM_KEY) is None
    assert_fork_side_closed(engine, dag_run)


@pytest.mark.timeout(240)
def test_a_row_over_max_row_bytes_fails_the_fork_naming_its_key_and_the_limit(
    audit_url: str, airflow_metadata: str, chunks_written: list[int]
) -> None:
    D.FORK_ERRORS.pop(D.OVERSIZE_ROW, None)
    dag_run = run_failure_dag(
        D.build_dag(D.OVERSIZE_ROW), audit_url, AIRFLOW__ELSPETH__MAX_ROW_BYTES=str(D.OVERSIZE_LIMIT)
    )
    reason = f"row 'r4' is larger than {D.OVERSIZE_LIMIT} bytes as canonical JSON ([elspeth] max_row_bytes)"
    assert_bad_row_failed_the_fork(
        engine_for_url(audit_url), dag_run, D.FORK_ERRORS[D.OVERSIZE_ROW], chunks_written, reason
    )


# What the fork may add to its process's resident memory while refusing the 2**50-leaf row: the
# walk's own cost is a few kilobytes. Unbounded, the row took 7.6 GB.
BOMB_RSS_GROWTH_LIMIT = 200 * 1024 * 1024


@pytest.mark.timeout(300)  # the backstop: unbounded, this row never finishes
def test_a_shared_reference_bomb_fails_the_fork_at_the_default_limit_in_bounded_memory(
    audit_url: str, airflow_metadata: str, chunks_written: list[int]
) -> None:
    """The tester's row, built in the fork's process: ``x = [1]``, ``x = [x, x]`` 50 times. The
    walk reads it up to the limit and stops; it is never serialised. A first run at a 64-byte
    limit warms dag.test() up (its first run in a process imports about 100 MB of modules), so
    the measured run, at the default 1 MiB, counts what the row costs."""
    engine = engine_for_url(audit_url)
    for limit, measured in ((64, False), (DEFAULT_MAX_ROW_BYTES, True)):
        D.FORK_ERRORS.pop(D.BOMB_ROW, None)
        chunks_written.clear()
        env = {} if measured else {"AIRFLOW__ELSPETH__MAX_ROW_BYTES": str(limit)}
        with RssGrowth() as rss:
            dag_run = run_failure_dag(D.build_dag(D.BOMB_ROW), audit_url, **env)
        reason = f"row 'r4' is larger than {limit} bytes as canonical JSON ([elspeth] max_row_bytes)"
        assert_bad_row_failed_the_fork(engine, dag_run, D.FORK_ERRORS[D.BOMB_ROW], chunks_written, reason)
    assert rss.growth < BOMB_RSS_GROWTH_LIMIT, f"RSS grew by {rss.growth / 2**20:.0f} MiB"


@pytest.mark.timeout(240)
def test_sigterm_ends_the_fork_and_keeps_nothing(
    audit_url: str, airflow_metadata: str, chunks_written: list[int]
) -> None:
    """The task runner's SIGTERM handler calls on_kill(), which ends execute() at once (dag.test()
    runs the task in this process, with that handler installed): the source's remaining rows are
    never written, the run is closed failed ``interrupted``."""
    D.FORK_ERRORS.pop(D.SIGTERM, None)
    dag_run = run_failure_dag(D.build_dag(D.SIGTERM), audit_url)
    states = ti_states(dag_run)
    assert states["fork"] == "failed", states
    assert "terminated (SIGTERM) while forking rows" in D.FORK_ERRORS[D.SIGTERM]
    assert chunks_written == [0, 1]
    engine = engine_for_url(audit_url)
    (run,) = fork_runs(engine, dag_run)
    assert_failed_and_empty(engine, run, "interrupted:AirflowTaskTerminated: fork: terminated (SIGTERM)")
    assert xcom(dag_run, "fork", AUDIT_RUN_XCOM_KEY) is None
    assert_fork_side_closed(engine, dag_run)


@pytest.mark.timeout(240)
def test_the_run_failing_to_complete_leaves_no_xcom_and_no_run_open(
    audit_url: str, airflow_metadata: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def complete_fails(self: AuditStore, run_id: str, **kwargs: Any) -> None:
        raise RuntimeError("audit store went away")

    monkeypatch.setattr(AuditStore, "complete_run", complete_fails)
    D.FORK_ERRORS.pop(D.COMPLETE_FAILS, None)
    dag_run = run_failure_dag(D.build_dag(D.COMPLETE_FAILS), audit_url)
    states = ti_states(dag_run)
    assert states["fork"] == "failed", states
    assert "audit store went away" in D.FORK_ERRORS[D.COMPLETE_FAILS]
    # Pushed before complete_run, taken back when it failed: the coalesce sees no audit run.
    assert xcom(dag_run, "fork", AUDIT_RUN_XCOM_KEY) is None

    engine = engine_for_url(audit_url)
    (run,) = fork_runs(engine, dag_run)
    assert_failed_and_empty(engine, run, "error:RuntimeError: audit store went away")
    assert_fork_side_closed(engine, dag_run)
