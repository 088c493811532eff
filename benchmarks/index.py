"""``python -m benchmarks.index [--runs 10000] [--rounds 5]``: the UI's runs index over many audit runs.

Builds a SQLite audit store of ``--runs`` audit runs (tests/ui/audit_data.py: ``bulk_index_runs``,
plain inserts: five DAGs, every outcome the index filters on, superseded tries, backfilled start
order) and serves index pages through the plugin's FastAPI app (``plugins.app.create_app``) with
FastAPI's test client: the first, a middle and the last page in logical-date order, by start, each
filter (DAG, logical-date range, every outcome, all three), as the HTML page and as
``/api/runs``, ``--rounds`` times each. Prints p50 and p99 per request and over all of them, and the
SQL statements each issued. See benchmarks/RESULTS.md ("The runs index at 10,000 audit runs").

Everything a request does is real (routing, the SQL, the Airflow task-state read against a metadata
DB without task instances, the template) but the user: the signed-in user is a viewer who may read
the five DAGs (Airflow's auth manager, whose DAG list comes from its metadata DB, is stood in for).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "ui"))

from audit_data import INDEX_DAGS, bulk_index_runs  # noqa: E402


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _requests(pages: int) -> list[tuple[str, str]]:
    middle = max(1, pages // 2)
    html = [
        ("HTML page 1 (newest logical date)", "/"),
        (f"HTML page {middle} (middle)", f"/?page={middle}"),
        (f"HTML page {pages} (last)", f"/?page={pages}"),
        ("HTML by start, last page", f"/?sort=started_at&page={pages}"),
        ("HTML one DAG", "/?dag_id=index_dag_2"),
        ("HTML logical-date range", "/?since=2020-02-01&until=2020-03-15"),
        ("HTML outcome undecided", "/?outcome=undecided"),
        ("HTML outcome all merged, page 20", "/?outcome=all_merged&page=20"),
        ("HTML DAG + range + outcome", "/?dag_id=index_dag_1&since=2020-02-01&outcome=rows_failed"),
    ]
    api = [
        ("JSON offset 0", "/api/runs"),
        (f"JSON offset {(pages - 1) * 50:,}", f"/api/runs?offset={(pages - 1) * 50}"),
        ("JSON outcome superseded", "/api/runs?outcome=superseded"),
        ("JSON 500 runs", "/api/runs?limit=500&offset=5000"),
    ]
    return html + api


def _serve(work: Path, runs: int, rounds: int) -> None:
    """Write the store under ``work``, serve every request ``rounds`` times, print the times."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.testclient import TestClient
    from sqlalchemy import event
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url
    from airflow_elspeth.plugins.app import create_app, optional_engine

    url = URL.create("sqlite", database=str(work / "audit.db")).render_as_string()
    engine = engine_for_url(url)
    started = time.perf_counter()
    bulk_index_runs(engine, runs)
    print(f"{runs:,} audit runs written in {time.perf_counter() - started:.1f}s ({work})")

    manager: Any = create_auth_manager()
    manager.get_authorized_dag_ids = lambda *, user, method="GET", session=None: set(INDEX_DAGS)
    app = create_app()
    app.dependency_overrides[optional_engine] = lambda: engine
    app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="viewer", role="viewer")
    issued = [0]

    def count(*_: Any) -> None:
        issued[0] += 1

    event.listen(engine, "before_cursor_execute", count)
    requests = _requests(-(-runs // 50))
    times: dict[str, list[float]] = {label: [] for label, _ in requests}
    statements: dict[str, int] = {}
    with TestClient(app) as client:
        client.get("/")  # warm: templates compiled, connections pooled
        for _ in range(rounds):
            for label, path in requests:
                issued[0] = 0
                begun = time.perf_counter()
                response = client.get(path)
                times[label].append(time.perf_counter() - begun)
                if response.status_code != 200:
                    raise SystemExit(f"{path}: HTTP {response.status_code}: {response.text[:300]}")
                statements[label] = issued[0]
    width = max(len(label) for label in times)
    print(f"\n{'request':<{width}}  {'p50 ms':>7}  {'p99 ms':>7}  statements")
    for label, samples in times.items():
        print(
            f"{label:<{width}}  {_percentile(samples, 0.5) * 1000:7.0f}  "
            f"{_percentile(samples, 0.99) * 1000:7.0f}  {statements[label]:10d}"
        )
    every = [s for samples in times.values() for s in samples]
    print(
        f"{'every request':<{width}}  {statistics.median(every) * 1000:7.0f}  "
        f"{_percentile(every, 0.99) * 1000:7.0f}  ({len(every)} requests)"
    )
    dispose_engine(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.index", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000, help="audit runs in the store")
    parser.add_argument("--rounds", type=int, default=5, help="times each request is served")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="elspeth-index-bench-"))
    # Airflow's metadata DB: its task_instance table only, empty (the index reads task states there).
    metadata = work / "airflow.db"
    with sqlite3.connect(metadata) as conn:
        conn.execute(
            "CREATE TABLE task_instance (dag_id TEXT, run_id TEXT, task_id TEXT, map_index INT, state TEXT)"
        )
    os.environ["AIRFLOW_HOME"] = str(work)
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{metadata}"
    os.environ["AIRFLOW__CORE__AUTH_MANAGER"] = (
        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
    )

    try:
        _serve(work, args.runs, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
