"""``python -m benchmarks.scale``: the fork/branch/coalesce DAG on a real deployment, CeleryExecutor
with Celery workers beside the LocalExecutor, in one run.

Stands up the deployment of the end-to-end suite (tests/e2e/e2e_harness.py: scheduler, triggerer,
dag-processor, api-server, a Redis broker and ``--workers`` ``airflow celery worker`` processes,
metadata and audit databases on a temporary PostgreSQL server) and runs tests/e2e/dags/e2e_scale.py
(fork of ``--rows`` rows in chunks of ``--chunk``, three branches each mapped over the fork's
chunks, a deferrable ``require_all`` coalesce) once per ``--executor``, one after the other. Prints
rows/s (rows / the DAG run's wall time), seconds per phase, the mapped task instances per worker,
and whether ``airflow-elspeth verify`` exits 0. See benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.pg import TempPostgres

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from e2e_harness import AirflowStack, AuditDB, RedisServer, run_scale_dag  # noqa: E402

EXECUTORS = ("celery", "local")
out = Console()
if not out.is_terminal:  # redirected to a file: do not squeeze the table into 80 columns
    out = Console(width=160)
err = Console(stderr=True)


class Postgres(TempPostgres):
    """TempPostgres as the harness calls it (``admin_connection``, as tests/conftest.py's server)."""

    def admin_connection(self) -> Any:
        return self.admin()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--executor",
        action="append",
        choices=EXECUTORS,
        help="celery and/or local (repeatable; default: both, Celery first)",
    )
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the fork (default 20000)")
    parser.add_argument("--chunk", type=int, default=1000, help="fork chunk size (default 1000)")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (default 2)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="task slots per Celery worker; the LocalExecutor gets workers x concurrency (default 2)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for each DAG run")
    parser.add_argument("--json", action="store_true", help="end with one JSON object of the figures")
    parser.add_argument("--keep", action="store_true", help="keep the AIRFLOW_HOME (logs) afterwards")
    args = parser.parse_args(argv)
    for name in ("rows", "chunk", "workers", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    args.executor = list(dict.fromkeys(args.executor or EXECUTORS))
    return args


# The audit tables an audit run writes to, with how to count its rows there: the events by the
# run's number, the rest by its id.
AUDIT_TABLES = {
    table: f"SELECT count(*) FROM {table} WHERE run_no = (SELECT run_no FROM runs WHERE run_id = :run)"
    for table in ("source_rows", "step_results", "decisions")
} | {
    table: f"SELECT count(*) FROM {table} WHERE run_id = :run"
    for table in ("recorded_outcomes", "chunk_progress")
}


def audit_rows(audit: AuditDB, run_id: str) -> dict[str, int]:
    """Rows audit run ``run_id`` wrote, per table and in all."""
    counts = {table: int(audit.scalar(sql, run=run_id)) for table, sql in AUDIT_TABLES.items()}
    return {**counts, "total": sum(counts.values())}


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    celery = "celery" in args.executor
    with ExitStack() as cleanup:
        started = time.monotonic()
        pg = Postgres()
        cleanup.callback(pg.stop)
        pg.start()
        broker_url = None
        if celery:
            redis = RedisServer(home=workdir / "redis")
            cleanup.callback(redis.stop)
            redis.start()
            broker_url = redis.url
        stack = AirflowStack(
            pg=pg,
            home=workdir / "airflow",
            parallelism=args.workers * args.concurrency,
            broker_url=broker_url,
            celery_workers=args.workers if celery else 0,
            worker_concurrency=args.concurrency,
            extra_env={"ELSPETH_SCALE_ROWS": str(args.rows), "ELSPETH_SCALE_CHUNK": str(args.chunk)},
        )
        cleanup.callback(stack.stop)
        err.log(f"starting the deployment in {stack.home}")
        try:
            stack.start()
        except BaseException:
            err.print(stack.diagnostics())
            raise
        audit = AuditDB(stack.audit_url)
        cleanup.callback(audit.dispose)
        figures: dict[str, Any] = {
            "rows": args.rows,
            "chunk": args.chunk,
            "celery_workers": args.workers if celery else 0,
            "concurrency": args.concurrency,
            "nproc": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "setup_seconds": round(time.monotonic() - started, 1),
            "runs": [],
        }
        for executor in args.executor:
            err.log(f"{executor}: {args.rows} rows in chunks of {args.chunk}")
            run = run_scale_dag(stack, executor, args.rows, timeout=args.timeout)
            if run["state"] == "success":
                audit_run = audit.run_of(run["dag_id"], run["run_id"])["run_id"]
                run["decided_rows"] = audit.scalar(
                    "SELECT count(*) FROM coalesce_decisions WHERE run_id = :run", run=audit_run
                )
                run["verify_exit"] = stack.elspeth("verify", "--run-id", audit_run).returncode
                run["audit_rows"] = audit_rows(audit, audit_run)
            else:
                err.print(stack.diagnostics())
            figures["runs"].append(run)
        figures["loadavg_end"] = os.getloadavg()
        return figures


def show(figures: dict[str, Any]) -> None:
    table = Table(
        title=f"{figures['rows']:,} rows, chunks of {figures['chunk']:,}, 3 branches mapped over the chunks; "
        f"{figures['celery_workers']} Celery workers x {figures['concurrency']} slots; "
        f"load {figures['loadavg_start'][0]:.1f} -> {figures['loadavg_end'][0]:.1f}, {figures['nproc']} CPUs"
    )
    for column in ("executor", "state", "rows/s", "wall s", "queued s", "fork s", "branches s"):
        table.add_column(column, justify="right")
    table.add_column("join after branches s", justify="right")
    table.add_column("mapped TIs per host")
    table.add_column("decided", justify="right")
    table.add_column("verify", justify="right")
    for run in figures["runs"]:
        if run["state"] != "success":
            table.add_row(run["executor"], run["state"], *["-"] * 9)
            continue
        phases = run["phases"]
        table.add_row(
            run["executor"],
            run["state"],
            f"{run['rows_per_second']:,.0f}",
            f"{run['wall_seconds']:.1f}",
            f"{phases['queued']:.1f}",
            f"{phases['fork']:.1f}",
            f"{phases['branches']:.1f}",
            f"{phases['join_after_branches']:.1f}",
            ", ".join(f"{host}: {n}" for host, n in run["hosts"].items()),
            f"{run['decided_rows']:,}",
            "clean" if run["verify_exit"] == 0 else f"exit {run['verify_exit']}",
        )
    out.print(table)
    for run in figures["runs"]:
        if run["state"] == "success":
            per_row = run["audit_rows"]["total"] / figures["rows"]
            out.print(f"{run['executor']}: {per_row:.1f} audit rows per source row {run['audit_rows']}")
    out.print(f"deployment up in {figures['setup_seconds']:.0f} s (not counted)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "celery" in args.executor and shutil.which("redis-server") is None:
        err.print("redis-server not found: install the redis-server OS package")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="elspeth-scale-"))
    try:
        figures = measure(args, workdir)
    finally:
        if args.keep:
            err.log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    show(figures)
    if args.json:
        out.print_json(json.dumps(figures))
    ok = all(r["state"] == "success" and r["verify_exit"] == 0 for r in figures["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
