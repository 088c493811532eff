"""Pages of a 100k-row run answer at every depth, each with a bounded number of SQL statements.

The run (100,000 rows x 3 branches, quorum 2 of 3: 30,000 failed rows, 70,000 late arrivals) is
bulk-written (tests/ui/audit_data.py: bulk_build_run, ~30 s) and kept in pytest's cache directory
under a key of the code that shapes it, so later runs reuse it.

The first view of a coalesce computes its run-wide aggregates (matrix, arrival curves) in one scan
each, in parallel, and caches them under a fingerprint of the run's progress. Every other request is
a page: a LIMIT/OFFSET walk of an index, so its statement count does not depend on its depth (no
statement per row). The test asserts that, never a duration (the machine is shared); it prints each
request's time for the reader.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from .audit_data import BuiltRun, bulk_build_run, consensus_behaviour

pytestmark = pytest.mark.integration

ROWS = 100_000
DAG, RUN = "big_dag", "scheduled__2026-01-01T00:00:00+00:00"
# SQL statements one request may issue: a page reads its run, coalesce, counts and one page of rows
# (a statement per row would be thousands here).
PAGE_STATEMENTS = 25


def _key() -> str:
    import airflow_elspeth.audit.schema as schema

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in [
        here / "audit_data.py",
        Path(schema.__file__),
        *sorted(Path(schema.__file__).parent.glob("migrations/versions/*.py")),
    ]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def big_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url

    cache = getattr(request.config, "cache", None)
    directory = cache.mkdir("elspeth-ui-100k") if cache is not None else tmp_path_factory.mktemp("big")
    path = Path(directory) / f"audit-{_key()}.db"
    if not path.exists():
        for stale in Path(directory).glob("audit-*.db*"):
            stale.unlink()
        building = path.with_suffix(".building")
        for leftover in Path(directory).glob(building.name + "*"):
            leftover.unlink()
        url = URL.create("sqlite", database=str(building)).render_as_string()
        started = time.perf_counter()
        engine = engine_for_url(url)
        built: BuiltRun = bulk_build_run(
            engine,
            dag_id=DAG,
            airflow_run_id=RUN,
            rows_total=ROWS,
            branches=["gpt", "claude", "gemini"],
            behaviour=consensus_behaviour,
        )
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        dispose_engine(url)
        building.rename(path)
        print(
            f"\nbuilt the {ROWS:,}-row run {built.run_id} in {time.perf_counter() - started:.1f}s",
            file=sys.stderr,
        )
    url = URL.create("sqlite", database=str(path)).render_as_string()
    try:
        yield url
    finally:
        dispose_engine(url)


def test_pages_of_a_100k_row_run_answer_at_every_depth(
    client: Any, auth: Callable[[str], dict[str, str]], big_store: str, use_store: Callable[[Any], None]
) -> None:
    from sqlalchemy import event

    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.read.cache import clear_cache

    clear_cache()
    engine = engine_for_url(big_store, upgrade=False)
    use_store(engine)
    headers = auth("viewer")
    base = f"/elspeth/dags/{DAG}/runs/{quote(RUN, safe='')}"
    api = f"/elspeth/api/dags/{DAG}/runs/{quote(RUN, safe='')}"
    timings: list[tuple[str, float, int]] = []
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1

    event.listen(engine, "before_cursor_execute", count)

    def timed(label: str, path: str) -> Any:
        statements[0] = 0
        started = time.perf_counter()
        response = client.get(path, headers=headers)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, (label, response.text[:500])
        timings.append((label, elapsed, statements[0]))
        return response

    first = timed("first view of the coalesce (aggregates computed)", base + "?coalesce=consensus")
    assert "30,000" in first.text and "100,000" in first.text
    pages = [
        ("HTML failed rows, page 2", base + "?page=2"),
        ("HTML failed rows, page 300 (middle)", base + "?page=300"),
        ("HTML failed rows, page 600 (last)", base + "?page=600"),
        ("HTML failed rows, reason filter, last page", base + "?reason=quorum_impossible&page=200"),
        (
            "HTML all rows, branch+reason filter, last page",
            base + "?decision=all&branch=gemini&branch_reason=late_arrival_after_merge&page=1000",
        ),
        ("HTML late arrivals, last page", base + "?late_page=3500"),
        ("JSON failed rows, offset 0", api + "/coalesces/consensus/rows?limit=50"),
        ("JSON failed rows, offset 29,950", api + "/coalesces/consensus/rows?limit=50&offset=29950"),
        (
            "JSON rows missing claude, offset 49,950",
            api + "/coalesces/consensus/rows?decision=all&branch=claude&limit=50&offset=49950",
        ),
        (
            "JSON late arrivals, offset 69,950",
            api + "/coalesces/consensus/late-arrivals?limit=50&offset=69950",
        ),
        ("JSON coalesce overview", api + "/coalesces/consensus"),
        ("HTML row lineage (row 99,999)", base + "/lineage?key=doc-099999"),
        ("HTML branch step tab (100k states)", base + "/tasks/ask_1"),
    ]
    for label, path in pages:
        response = timed(label, path)
        assert "doc-" in response.text or "overview" in label
    last = client.get(api + "/coalesces/consensus/rows?limit=50&offset=29950", headers=headers).json()
    assert last["total"] == 30_000 and len(last["rows"]) == 50

    event.remove(engine, "before_cursor_execute", count)
    width = max(len(label) for label, _, _ in timings)
    print(f"\n{ROWS:,}-row run, requests (time on this machine, SQL statements):")
    for label, elapsed, issued in timings:
        print(f"  {label:<{width}}  {elapsed * 1000:7.0f} ms  {issued:3d} statements")
    heavy = [(label, issued) for label, _, issued in timings[1:] if issued > PAGE_STATEMENTS]
    assert not heavy, f"pages issuing more than {PAGE_STATEMENTS} statements: {heavy}"
