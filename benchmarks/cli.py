"""``python -m benchmarks``: the audit trail at the cost of writing it, measured side by side.

fork -> 3 branches (trivial callables) -> coalesce through ``dag.test()`` at 10k / 100k / 1M rows on
SQLite and PostgreSQL, each (size, database) in a fresh process; plus the floor (raw bulk insert of
the same audit rows), the lean floor (``../shared/bench/lean_floor.py``: one row per event, run at
the same size right after each of our runs), the naive mapped-task way at 1,000 rows and the
coalesce's waiting query.
See benchmarks/RESULTS.md for figures from this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import latency, run_for_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
NAIVE_ROWS = 1_000  # Airflow's default max_map_length is 1024
DATABASES = ("sqlite", "postgresql")
PHASES = ("fork", "branch_alpha", "branch_beta", "branch_gamma", "coalesce")
# The lean floor lives beside the repository (in CI the repository's parent folder holds shared/).
LEAN_FLOOR = REPO.parent / "shared" / "bench" / "lean_floor.py"

out = Console()
if not out.is_terminal:  # redirected to a file: do not squeeze the tables into 80 columns
    out = Console(width=140)
err = Console(stderr=True)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        from importlib.metadata import version

        info["airflow"] = version("apache-airflow")
        info["sqlalchemy"] = version("sqlalchemy")
    except Exception:
        pass
    info["loadavg_start"] = os.getloadavg()
    info["provider"] = provider_label()
    return info


def provider_label() -> str:
    """Which airflow_elspeth the workers import: --provider-path, else the checkout's commit."""
    if PROVIDER_PATH:
        return PROVIDER_PATH[0]
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "airflow_elspeth"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"{REPO}@{sha}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return str(REPO)


PROVIDER_PATH: list[str] = []  # --provider-path: a patched copy of airflow_elspeth to measure instead


def airflow_env(home: Path, dags: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__ELSPETH__", "AIRFLOW_CONN_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=os.pathsep.join(
            [*PROVIDER_PATH, str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    )
    return env


def prepare_template(workdir: Path) -> Path:
    """One migrated Airflow home, copied for every run (``airflow db migrate`` takes a while)."""
    template = workdir / "airflow-home-template"
    dags = workdir / "no-dags"
    template.mkdir()
    dags.mkdir()
    err.log("airflow db migrate (template metadata DB)")
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=airflow_env(template, dags),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return template


class Runner:
    def __init__(
        self,
        workdir: Path,
        template: Path,
        pg: Any | None,
        keep: bool,
        profile_dir: Path | None,
        lean_floor: bool = True,
    ) -> None:
        self.workdir, self.template, self.pg, self.keep, self.profile_dir = (
            workdir,
            template,
            pg,
            keep,
            profile_dir,
        )
        self.lean_floor = lean_floor

    def run(self, mode: str, rows: int, db: str, *, floor: bool = True) -> dict[str, Any]:
        name = f"{mode}_{db}_{rows}"
        run_dir = self.workdir / name
        home, dags = run_dir / "home", run_dir / "dags"
        shutil.copytree(self.template, home)
        dags.mkdir()
        dag_id = f"bench_{name}"
        factory = "elspeth_dag" if mode == "elspeth" else "naive_dag"
        dag_file = dags / f"{dag_id}.py"
        # "airflow" and "dag" must both appear for the DAG processor's safe mode to parse the file.
        dag_file.write_text(
            f'"""airflow DAG built by the benchmark factory."""\n'
            f"from benchmarks.factory import {factory}\n\ndag = {factory}({dag_id!r}, {rows})\n"
        )
        env = airflow_env(home, dags)
        args: dict[str, Any] = {
            "mode": mode,
            "rows": rows,
            "db": db,
            "dag_file": str(dag_file),
            "out": str(run_dir / "result.json"),
        }
        databases: list[str] = []
        if mode == "elspeth":
            if db == "postgresql":
                assert self.pg is not None
                audit_db = f"audit_{rows}"
                url = self.pg.create_database(audit_db)
                databases.append(audit_db)
                env["AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT"] = json.dumps(
                    {"conn_type": "elspeth", "extra": {"sqlalchemy_url": url}}
                )
                args["audit_url"] = url
                if floor:
                    targets = {"execute_values": "floor_ev"}
                    if rows <= 10_000:
                        targets["executemany"] = "floor_em"
                    args["floor_targets"] = {}
                    for method, dbname in targets.items():
                        args["floor_targets"][method] = self.pg.create_database(f"{dbname}_{rows}")
                        databases.append(f"{dbname}_{rows}")
            elif floor:
                args["floor_targets"] = {"executemany": f"sqlite:///{run_dir / 'floor.db'}"}
        if PROVIDER_PATH:
            args["provider_path"] = PROVIDER_PATH[0]
        if self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            args["profile"] = str(self.profile_dir / f"{name}.txt")
        err.log(f"running {name} ...")
        started = time.time()
        with open(run_dir / "worker.log", "w") as log:
            # cwd is the run's own directory, not the checkout: ``python -m`` puts the cwd first on
            # sys.path, which would shadow --provider-path with the checkout's airflow_elspeth.
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.worker", json.dumps(args)],
                cwd=run_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            if proc.returncode != 0:
                tail = (run_dir / "worker.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"benchmark worker {name} failed (exit {proc.returncode}):\n{tail}")
            result: dict[str, Any] = json.loads((run_dir / "result.json").read_text())
            result["process_seconds"] = round(time.time() - started, 1)
            if not result["dag_run_state"].endswith("success"):
                raise RuntimeError(
                    f"{name}: the DAG run ended {result['dag_run_state']}: see {run_dir}/worker.log"
                )
            if mode == "elspeth" and self.lean_floor:
                # Right after our run, at the same size: the ratio compares like with like.
                result["lean_floor"] = run_lean_floor(rows)
                seconds = result["lean_floor"]["seconds"]
                result["lean_ratio"] = round(result["phases_total_seconds"] / seconds, 2) if seconds else None
                # The lean floor keeps SQLite only: its file is the yardstick beside PostgreSQL too.
                result["lean_bytes_ratio"] = round(
                    result["audit_bytes"]["bytes"] / result["lean_floor"]["db_bytes"], 2
                )
            err.log(f"{name}: {summary_line(result)}")
            return result
        finally:
            if not self.keep:
                for database in databases:
                    self.pg.drop_database(database)
                if proc.returncode == 0:
                    shutil.rmtree(run_dir, ignore_errors=True)


def run_lean_floor(rows: int) -> dict[str, Any]:
    """``lean_floor.py --rows N --json`` in a fresh process: its figures (seconds, rows_per_second,
    db_bytes and db_bytes_per_row: its SQLite file after ``wal_checkpoint(TRUNCATE)``; it has no
    PostgreSQL mode)."""
    if not LEAN_FLOOR.is_file():
        raise FileNotFoundError(
            f"the lean floor {LEAN_FLOOR} is missing (the repository's parent folder must hold "
            "shared/bench/lean_floor.py); --no-lean-floor skips it"
        )
    return run_for_json([sys.executable, str(LEAN_FLOOR), "--rows", str(rows), "--json"], str(LEAN_FLOOR))


def audit_rows_per_source_row(r: dict[str, Any]) -> float:
    return round(r["audit_rows_total"] / r["rows"], 1)


def summary_line(r: dict[str, Any]) -> str:
    if r["mode"] != "elspeth":
        return f"end to end {r['end_to_end_seconds']} s, {r['task_instances']} task instances"
    lean = r.get("lean_floor") or {}
    return (
        f"phases {r['phases_total_seconds']} s, {r['rows_per_second']} rows/s, "
        f"lean floor {lean.get('rows_per_second', '-')} rows/s ({lean.get('seconds', '-')} s), "
        f"x{r.get('lean_ratio')} the lean floor, {audit_rows_per_source_row(r)} audit rows/source row, "
        f"{r['bytes_per_source_row']} bytes/source row (lean floor {lean.get('db_bytes_per_row', '-')}), "
        f"floor {r.get('floor_seconds')} s, overhead x{r.get('overhead_vs_floor')}, "
        f"peak RSS {r['peak_rss_mb']['self']} MB, poll {r['poll_ms']['mean']} ms"
    )


def size_table(rows: int, results: dict[str, dict[str, Any]]) -> Table:
    dbs = list(results)
    table = Table(
        title=f"{rows:,} rows x 3 branches (fork -> branches -> coalesce, dag.test)", title_justify="left"
    )
    table.add_column("")
    for db in dbs:
        table.add_column(db, justify="right")

    def add(label: str, fn: Any, style: str | None = None) -> None:
        cells = []
        for db in dbs:
            try:
                value = fn(results[db])
            except (KeyError, TypeError):
                value = None
            cells.append("-" if value is None else str(value))
        table.add_row(label, *cells, style=style)

    for phase in PHASES:
        add(
            f"{phase} s  (SQL s / statements / commits)",
            lambda r, p=phase: (
                f"{r['phases'][p]['seconds']:.1f}  ({r['phases'][p]['sql_seconds']:.1f} / "
                f"{r['phases'][p]['statements']:,} / {r['phases'][p]['commits']:,})"
            ),
        )
    add(
        "  coalesce: pokes / s inside poke()",
        lambda r: f"{r['phases']['coalesce']['pokes']} / {r['phases']['coalesce']['poke_seconds']:.1f}",
    )
    add("total of phases s (operators' execute)", lambda r: f"{r['phases_total_seconds']:.1f}", "bold")
    add("total of task instances s (start..end)", lambda r: f"{r['ti_total_seconds']:.1f}")
    add("rows per second", lambda r: f"{r['rows_per_second']:,.0f}", "bold")
    add(
        "lean floor rows per second (lean_floor.py, same size)",
        lambda r: f"{r['lean_floor']['rows_per_second']:,.0f} ({r['lean_floor']['seconds']:.1f} s)",
    )
    add("phases / lean floor time (target <= 4)", lambda r: f"x{r['lean_ratio']}", "bold")
    add("audit rows per source row", audit_rows_per_source_row)
    add(
        "bytes on disk per source row (SQLite file / PostgreSQL pg_total_relation_size)",
        lambda r: f"{r['bytes_per_source_row']:,}",
        "bold",
    )
    add(
        "lean floor bytes per source row (its SQLite file, beside PostgreSQL too)",
        lambda r: f"{r['lean_floor']['db_bytes_per_row']:,}",
    )
    add("bytes / lean floor (target <= 2)", lambda r: f"x{r['lean_bytes_ratio']}", "bold")
    add("floor bytes per source row (our rows copied)", lambda r: f"{r['floor_bytes_per_source_row']:,}")
    add("floor s (raw bulk insert)", lambda r: f"{r['floor_seconds']:.1f} ({r['floor_method']})")
    add("overhead vs floor (target <= 2)", lambda r: f"x{r['overhead_vs_floor']}", "bold")
    add("peak RSS MB (dag.test process)", lambda r: f"{r['peak_rss_mb']['self']:.0f}", "bold")
    add("RSS before dag.test MB", lambda r: f"{r['rss_before_mb']:.0f}")
    add(
        "poll: waiting_poll ms (mean/max)",
        lambda r: f"{r['poll_ms']['mean']:.1f} / {r['poll_ms']['max']:.1f}",
    )
    any_result = next(iter(results.values()))
    for name in any_result.get("audit_rows", {}):
        add(f"  rows in {name}", lambda r, n=name: f"{r['audit_rows'][n]:,}")
    add("  audit rows total", lambda r: f"{r['audit_rows_total']:,}")
    add(
        "result visible ms: callable return -> recorded_at (p50/p99/max; target p99 <= 250)",
        lambda r: "{p50} / {p99} / {max}".format(**r["visibility_ms"]),
        "bold",
    )
    add("decisions", lambda r: ", ".join(f"{k}={v:,}" for k, v in r["decisions"].items()))
    return table


def naive_table(naive: dict[str, Any], ours: dict[str, dict[str, Any]]) -> Table:
    table = Table(
        title=f"{NAIVE_ROWS:,} rows x 3 branches: naive mapped tasks vs airflow-elspeth "
        "(dag.test, end to end)",
        title_justify="left",
    )
    for col in ("way", "audit db", "task instances", "end to end s", "speed-up (target >= 20)"):
        table.add_column(col, justify="right")
    table.add_row(
        "naive: one mapped TI per (row, branch) + all_done join",
        "-",
        str(naive["task_instances"]),
        f"{naive['end_to_end_seconds']:.1f}",
        "1",
    )
    for db, r in ours.items():
        table.add_row(
            "airflow-elspeth fork/branches/coalesce",
            db,
            str(r["task_instances"]),
            f"{r['end_to_end_seconds']:.1f}",
            f"x{naive['end_to_end_seconds'] / r['end_to_end_seconds']:.1f}",
        )
    return table


def compact(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "phase_seconds": {p: v["seconds"] for p, v in r["phases"].items()},
        "phases_total_seconds": r["phases_total_seconds"],
        "ti_seconds": {p: v["ti_seconds"] for p, v in r["phases"].items()},
        "rows_per_second": r["rows_per_second"],
        "peak_rss_mb": r["peak_rss_mb"]["self"],
        "floor_seconds": r.get("floor_seconds"),
        "floor_method": r.get("floor_method"),
        "overhead_vs_floor": r.get("overhead_vs_floor"),
        "lean_floor_rows_per_second": (r.get("lean_floor") or {}).get("rows_per_second"),
        "lean_floor_seconds": (r.get("lean_floor") or {}).get("seconds"),
        "lean_ratio": r.get("lean_ratio"),
        "audit_rows": r["audit_rows"],
        "audit_rows_per_source_row": audit_rows_per_source_row(r),
        "audit_bytes": r["audit_bytes"]["bytes"],
        "bytes_per_source_row": r["bytes_per_source_row"],
        "lean_floor_bytes_per_source_row": (r.get("lean_floor") or {}).get("db_bytes_per_row"),
        "bytes_vs_lean_floor": r.get("lean_bytes_ratio"),
        "floor_bytes_per_source_row": r.get("floor_bytes_per_source_row"),
        "poll_ms": r["poll_ms"]["mean"],
        "visibility_p99_ms": r["visibility_ms"]["p99"],
        "end_to_end_seconds": r["end_to_end_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, action="append", help="row count (repeatable); default 10000, 100000, 1000000"
    )
    parser.add_argument(
        "--db", choices=DATABASES, action="append", help="database (repeatable); default both"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object with the figures as the last line"
    )
    parser.add_argument("--no-naive", action="store_true", help="skip the naive mapped-task comparison")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor (raw bulk insert)")
    parser.add_argument(
        "--no-lean-floor",
        action="store_true",
        help=f"skip the lean floor ({LEAN_FLOOR.relative_to(REPO.parent)}, run after each of our runs)",
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="run the DAGs under pyinstrument, write profiles to DIR"
    )
    parser.add_argument(
        "--save",
        type=Path,
        metavar="FILE",
        help="write every raw figure (incl. SQL per phase) as JSON to FILE",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories and databases")
    parser.add_argument(
        "--workdir", type=Path, help="where temporary Airflow homes and SQLite files go (default: a temp dir)"
    )
    parser.add_argument(
        "--provider-path",
        type=Path,
        metavar="DIR",
        help="put DIR first on the workers' PYTHONPATH (a patched copy of airflow_elspeth, to measure a fix)",
    )
    opts = parser.parse_args(argv)
    if opts.provider_path:
        PROVIDER_PATH.append(str(opts.provider_path.resolve()))
    sizes = sorted(set(opts.rows or DEFAULT_SIZES))
    dbs = [db for db in DATABASES if db in (opts.db or DATABASES)]

    info = machine()
    results: dict[int, dict[str, dict[str, Any]]] = {}
    naive: dict[str, Any] | None = None
    ours_1k: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="elspeth-bench-", dir=opts.workdir))
        if not opts.keep:
            stack.callback(shutil.rmtree, workdir, True)
        pg = None
        if "postgresql" in dbs:
            from benchmarks.pg import TempPostgres

            pg = TempPostgres().start()
            if not opts.keep:
                stack.callback(pg.stop)
            info["postgresql"] = pg.version()
            err.log(f"temporary PostgreSQL {info['postgresql']} on port {pg.port}")
        runner = Runner(
            workdir, prepare_template(workdir), pg, opts.keep, opts.profile, not opts.no_lean_floor
        )
        for rows in sizes:
            results[rows] = {}
            for db in dbs:
                results[rows][db] = runner.run("elspeth", rows, db, floor=not opts.no_floor)
            out.print(size_table(rows, results[rows]))
        if not opts.no_naive:
            naive = runner.run("naive", NAIVE_ROWS, "sqlite")
            for db in dbs:
                ours_1k[db] = results.get(NAIVE_ROWS, {}).get(db) or runner.run(
                    "elspeth", NAIVE_ROWS, db, floor=False
                )
            out.print(naive_table(naive, ours_1k))
        home = workdir / "latency-home"
        home.mkdir()
        skips = latency.run_scenario(airflow_env(home, workdir), f"sqlite:///{workdir / 'latency.db'}", home)
        out.print(latency.scenario_table(skips))
    info["loadavg_end"] = os.getloadavg()
    if opts.save:
        raw = {
            "machine": info,
            "results": {str(k): v for k, v in results.items()},
            "naive": naive,
            "ours_1k": ours_1k,
            "decision_to_skip": skips,
        }
        opts.save.write_text(json.dumps(raw, indent=1, default=str))
    out.print(f"machine: {info}")
    if opts.json:
        figures: dict[str, Any] = {
            "machine": info,
            "results": {
                str(rows): {db: compact(r) for db, r in by_db.items()} for rows, by_db in results.items()
            },
        }
        if naive is not None:
            figures["naive"] = {
                "rows": NAIVE_ROWS,
                "naive_seconds": naive["end_to_end_seconds"],
                "naive_task_instances": naive["task_instances"],
                "ours_seconds": {db: r["end_to_end_seconds"] for db, r in ours_1k.items()},
                "speedup": {
                    db: round(naive["end_to_end_seconds"] / r["end_to_end_seconds"], 1)
                    for db, r in ours_1k.items()
                },
            }
        figures["decision_to_skip"] = skips
        largest = max(sizes)
        figures["poll_ms"] = {
            "rows": largest,
            **{db: results[largest][db]["poll_ms"] for db in results[largest]},
        }
        print(json.dumps(figures, default=str))
    return 0
