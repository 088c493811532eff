"""Time the coalesce's waiting query against an existing audit database (e.g. mid-run).

``python -m benchmarks.poll --url sqlite:////path/elspeth_audit.db [--run-id ID] [--polls 20]
[--also-postgresql]``

Runs :func:`airflow_elspeth.audit.coalesce.waiting_poll` - the read-only poll the deferred
coalesce's trigger makes every ``poll_interval`` - for the benchmark DAG's coalesce (3 branches
``branch_alpha|beta|gamma``, require_all) on the newest audit run, and prints the times. The polls
share one memory of undecidable chunks, as one trigger's polls do.

``--also-postgresql`` copies the tables that query reads (``runs``, ``chunk_progress``,
``branch_task_losses``: the same rows, so the same work) into a temporary PostgreSQL server whose
schema is built by the provider's migrations, and times the same poll there too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import timedelta
from typing import Any


def bench_spec() -> Any:
    from airflow_elspeth.audit.model import CoalesceSpec
    from airflow_elspeth.core.config import coalesce_config
    from benchmarks.factory import BRANCHES

    config = coalesce_config(
        branches=list(BRANCHES), policy="require_all", merge="union", timeout=timedelta(hours=6)
    )
    return CoalesceSpec(
        node_id="coalesce",
        config=config,
        delivering={b: f"branch_{b}" for b in BRANCHES},
        mapped={b: False for b in BRANCHES},
    )


def time_polls(engine: Any, spec: Any, run_id: str, polls: int = 20) -> dict[str, Any]:
    from airflow_elspeth.audit.coalesce import waiting_poll

    undecidable: dict[int, str] = {}  # what one trigger remembers between its polls
    waiting_poll(engine, spec, run_id, {}, undecidable)  # warm-up: pool connection, page cache
    times, answer = [], None
    for _ in range(polls):
        started = time.perf_counter()
        answer = waiting_poll(engine, spec, run_id, {}, undecidable).reason
        times.append((time.perf_counter() - started) * 1000)
    return {
        "mean": round(statistics.mean(times), 2),
        "median": round(statistics.median(times), 2),
        "max": round(max(times), 2),
        "n": polls,
        "answer": answer,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.poll", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="SQLAlchemy URL of the audit database")
    parser.add_argument("--run-id", help="audit run id (default: the newest run)")
    parser.add_argument("--polls", type=int, default=20)
    parser.add_argument(
        "--also-postgresql", action="store_true", help="time it on PostgreSQL too (see above)"
    )
    opts = parser.parse_args()
    from sqlalchemy import func, select

    from airflow_elspeth.audit import schema as t
    from airflow_elspeth.audit.engine import create_audit_engine

    engine = create_audit_engine(opts.url)
    with engine.connect() as conn:
        run_id = (
            opts.run_id
            or conn.execute(
                select(t.runs.c.run_id).order_by(t.runs.c.started_at.desc()).limit(1)
            ).scalar_one()
        )
        rows_total = conn.execute(select(t.runs.c.rows_total).where(t.runs.c.run_id == run_id)).scalar()
        progress_rows = conn.execute(
            select(func.count()).select_from(t.chunk_progress).where(t.chunk_progress.c.run_id == run_id)
        ).scalar_one()
    result: dict[str, Any] = {
        "run_id": run_id,
        "rows_total": rows_total,
        "chunk_progress_rows": progress_rows,
    }
    result[engine.dialect.name] = time_polls(engine, bench_spec(), run_id, opts.polls)
    if opts.also_postgresql:
        result["postgresql"] = poll_on_postgresql(engine, run_id, opts.polls)
    print(json.dumps(result))
    return 0


def poll_on_postgresql(source: Any, run_id: str, polls: int) -> dict[str, Any]:
    from sqlalchemy import select

    from airflow_elspeth.audit import schema as t
    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url
    from benchmarks.pg import TempPostgres

    with TempPostgres() as pg:
        url = pg.create_database("poll")
        target = engine_for_url(url)  # schema built by the provider's migrations
        with source.connect() as src, target.begin() as dst:
            for table in (t.runs, t.chunk_progress, t.branch_task_losses):
                rows = [
                    dict(r) for r in src.execute(select(table).where(table.c.run_id == run_id)).mappings()
                ]
                if rows:
                    dst.execute(table.insert(), rows)
        with target.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
        try:
            return {"server": pg.version(), **time_polls(target, bench_spec(), run_id, polls)}
        finally:
            dispose_engine(url)


if __name__ == "__main__":
    raise SystemExit(main())
