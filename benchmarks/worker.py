"""One benchmark run in a fresh process: ``python -m benchmarks.worker '<json args>'``.

Run by :mod:`benchmarks.cli` with AIRFLOW_HOME, the DAGS_FOLDER and the audit connection already in
the environment (Airflow reads them at import). It runs one DAG through ``dag.test()`` (tasks run in
this process), then measures, in this order: the process's peak RSS (before anything else can raise
it), the task instances' start/end dates, the SQL the provider issued per phase, the audit rows per
table, the coalesce's waiting poll (``waiting_poll``), the audit store's bytes on disk and the floor.
It writes one JSON file.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import statistics
import sys
import time
from array import array
from pathlib import Path
from typing import Any


def rss_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self": round(own, 1), "children": round(children, 1)}


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class SqlRecorder:
    """Every statement the audit engine runs: when, how long, executemany or not, and commits.

    Kept in typed arrays, 28 bytes a statement, with each distinct statement text stored once: a
    1M-row run issues over 100,000 statements, and a tuple and a string each (about 300 bytes) made
    the recorder itself the only thing in the process that grew with the row count.
    """

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.starts, self.seconds = array("d"), array("d")
        self.rows = array("q")  # negative: executemany of that many rows
        self.sql_ids = array("i")
        self.sql_texts: list[str] = []
        self._sql_ids: dict[str, int] = {}
        self.commits = array("d")
        self._started: dict[int, float] = {}

        @event.listens_for(engine, "before_cursor_execute")
        def before(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
        ) -> None:
            self._started[id(cursor)] = time.time()

        @event.listens_for(engine, "after_cursor_execute")
        def after(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
        ) -> None:
            start = self._started.pop(id(cursor), time.time())
            rows = len(params) if executemany and isinstance(params, (list, tuple)) else 1
            text = " ".join(statement[:200].split())[:90]
            sql_id = self._sql_ids.get(text)
            if sql_id is None:
                sql_id = self._sql_ids[text] = len(self.sql_texts)
                self.sql_texts.append(text)
            self.starts.append(start)
            self.seconds.append(time.time() - start)
            self.rows.append(-rows if executemany else rows)
            self.sql_ids.append(sql_id)

        @event.listens_for(engine, "commit")
        def commit(conn: Any) -> None:
            self.commits.append(time.time())

    def window(self, start: float, end: float) -> dict[str, Any]:
        inside = [i for i, at in enumerate(self.starts) if start <= at <= end]
        top: dict[str, list[float]] = {}
        for i in inside:
            entry = top.setdefault(self.sql_texts[self.sql_ids[i]], [0, 0.0, 0])
            entry[0] += 1
            entry[1] += self.seconds[i]
            entry[2] += abs(self.rows[i])
        return {
            "top_sql": [
                {"sql": k, "calls": v[0], "seconds": round(v[1], 3), "rows": v[2]}
                for k, v in sorted(top.items(), key=lambda kv: -kv[1][1])[:8]
            ],
            "statements": len(inside),
            "executemany": sum(1 for i in inside if self.rows[i] < 0),
            "sql_seconds": round(sum(self.seconds[i] for i in inside), 3),
            "commits": sum(1 for c in self.commits if start <= c <= end),
        }


def load_dag(dag_file: str) -> Any:
    spec = importlib.util.spec_from_file_location("elspeth_benchmark_dag", dag_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def task_instances(dag_id: str, run_id: str) -> list[Any]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
            .all()
        )
        return [
            {
                "task_id": ti.task_id,
                "map_index": ti.map_index,
                "state": str(ti.state),
                "start": ti.start_date.timestamp() if ti.start_date else None,
                "end": ti.end_date.timestamp() if ti.end_date else None,
            }
            for ti in tis
        ]


def profile_phases(session: Any) -> dict[str, Any]:
    """Per phase (the operator's execute frame): inclusive time of the slowest functions below it."""
    phases = {
        "fork": "operators/fork.py",
        "branches": "operators/branch.py",
        "coalesce": "sensors/coalesce.py",
    }
    found: dict[str, list[Any]] = {k: [] for k in phases}

    def walk(frame: Any) -> None:
        for phase, suffix in phases.items():
            if frame.function == "execute" and (frame.file_path or "").endswith(suffix):
                found[phase].append(frame)
                return
        for child in frame.children:
            walk(child)

    walk(session.root_frame())
    out: dict[str, Any] = {}
    for phase, frames in found.items():
        total = sum(f.time for f in frames)
        inclusive: dict[str, float] = {}
        own: dict[str, float] = {}

        def visit(
            frame: Any,
            stack: frozenset[str],
            inclusive: dict[str, float] = inclusive,
            own: dict[str, float] = own,
        ) -> None:
            path = frame.file_path or ""
            short = path.split("site-packages/")[-1].split("/work/main/")[-1]
            key = f"{short}:{frame.function}"
            if key not in stack:  # count a recursive function once
                inclusive[key] = inclusive.get(key, 0.0) + frame.time
            own[key] = own.get(key, 0.0) + frame.total_self_time
            for child in frame.children:
                visit(child, stack | {key}, inclusive, own)

        for frame in frames:
            visit(frame, frozenset())
        top = sorted(inclusive.items(), key=lambda kv: -kv[1])
        out[phase] = {
            "seconds": round(total, 2),
            "inclusive": [(k, round(v, 2), round(100 * v / total, 1)) for k, v in top[:60] if total],
            "self": [
                (k, round(v, 2), round(100 * v / total, 1))
                for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:30]
                if total
            ],
        }
    return out


def run(args: dict[str, Any]) -> dict[str, Any]:
    import airflow_elspeth

    result: dict[str, Any] = {
        "mode": args["mode"],
        "rows": args["rows"],
        "db": args["db"],
        "provider": str(Path(airflow_elspeth.__file__).parent),
    }
    expected = args.get("provider_path")
    if expected and not Path(airflow_elspeth.__file__).is_relative_to(expected):
        raise RuntimeError(f"imported {airflow_elspeth.__file__}, not the provider under {expected}")
    started_import = time.perf_counter()
    import airflow  # noqa: F401  (configures settings and the ORM)

    dag = load_dag(args["dag_file"])
    result["import_seconds"] = round(time.perf_counter() - started_import, 2)

    recorder = engine = None
    if args["mode"] == "elspeth":
        from airflow_elspeth.audit.engine import engine_for_url
        from airflow_elspeth.hooks.audit import embedded_database_url

        url = args.get("audit_url") or embedded_database_url()
        engine = engine_for_url(url)  # the process-wide engine the operators' hook will use
        recorder = SqlRecorder(engine)
    result["rss_before_mb"] = current_rss_mb()

    profiler = None
    if args.get("profile"):
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
        profiler.start()
    started = time.time()
    dag_run = dag.test()
    wall = time.time() - started
    if profiler is not None:
        profiler.stop()
    result["peak_rss_mb"] = rss_mb()  # first, before counting/floor work can raise it
    result["rss_after_mb"] = current_rss_mb()
    result["end_to_end_seconds"] = round(wall, 3)
    result["dag_run_state"] = str(dag_run.state)
    tis = task_instances(dag.dag_id, dag_run.run_id)
    result["task_instances"] = len(tis)
    result["ti_states"] = {s: sum(1 for t in tis if t["state"] == s) for s in {t["state"] for t in tis}}

    if profiler is not None:
        Path(args["profile"]).write_text(profiler.output_text(color=False, unicode=True, show_all=False))
        profiler.last_session.save(args["profile"] + ".pyisession")
        Path(args["profile"] + ".phases.json").write_text(
            json.dumps(profile_phases(profiler.last_session), indent=1)
        )

    if args["mode"] != "elspeth":
        return result

    assert engine is not None and recorder is not None
    from benchmarks.factory import POKES, TIMINGS

    phases: dict[str, Any] = {}
    for ti in sorted(tis, key=lambda t: t["start"] or 0):
        timing = TIMINGS.get(ti["task_id"])
        if timing is None or not (ti["start"] and ti["end"]):
            continue
        start, seconds = timing["start"], timing["seconds"]
        phases[ti["task_id"]] = {
            "seconds": round(seconds, 3),
            "ti_seconds": round(ti["end"] - ti["start"], 3),
            **recorder.window(start, start + seconds),
        }
        if ti["task_id"] in POKES:
            phases[ti["task_id"]]["pokes"] = POKES[ti["task_id"]]["pokes"]
            phases[ti["task_id"]]["poke_seconds"] = round(POKES[ti["task_id"]]["seconds"], 3)
    result["phases"] = phases
    total = sum(p["seconds"] for p in phases.values())
    result["phases_total_seconds"] = round(total, 3)
    result["ti_total_seconds"] = round(sum(p["ti_seconds"] for p in phases.values()), 3)
    result["rows_per_second"] = round(args["rows"] / total, 1) if total else None

    from sqlalchemy import func, select

    from airflow_elspeth.audit import schema as t
    from airflow_elspeth.audit.coalesce import waiting_poll

    with engine.connect() as conn:
        result["audit_rows"] = {
            table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in t.metadata.sorted_tables
        }
        run_id = conn.execute(select(t.runs.c.run_id).where(t.runs.c.dag_id == dag.dag_id)).scalar_one()
        decisions = dict(
            conn.execute(
                select(t.coalesce_decisions.c.decision, func.count()).group_by(
                    t.coalesce_decisions.c.decision
                )
            ).all()
        )
    result["audit_rows_total"] = sum(result["audit_rows"].values())
    from benchmarks.latency import visibility

    result["visibility_ms"] = visibility(engine, run_id)  # callable return -> visible in the store
    result["decisions"] = decisions
    result["audit_run_id"] = run_id

    # The coalesce's waiting poll, as the trigger runs it (read-only), on this run's tables.
    spec = dag.task_dict["coalesce"].spec()
    undecidable: dict[int, str] = {}  # what one trigger remembers between its polls
    # warm the pool and the page cache, as a trigger's first poll would
    waiting_poll(engine, spec, run_id, {}, undecidable)
    polls = []
    answer = None
    for _ in range(args.get("polls", 20)):
        before = time.perf_counter()
        answer = waiting_poll(engine, spec, run_id, {}, undecidable).reason
        polls.append((time.perf_counter() - before) * 1000)
    result["poll_ms"] = {
        "mean": round(statistics.mean(polls), 2),
        "median": round(statistics.median(polls), 2),
        "max": round(max(polls), 2),
        "n": len(polls),
        "answer": answer,
    }

    from airflow_elspeth.audit.engine import create_audit_engine
    from airflow_elspeth.audit.migrate import VERSION_TABLE
    from benchmarks import floor

    # Bytes on disk, after the polls: the checkpoint this takes on SQLite cannot change their times.
    # Its version table too, so PostgreSQL counts the tables the SQLite file holds.
    result["audit_bytes"] = floor.store_bytes(engine, [*floor.audit_tables(), VERSION_TABLE])
    result["bytes_per_source_row"] = round(result["audit_bytes"]["bytes"] / args["rows"])

    # The floor: the same rows, raw bulk inserts into a fresh copy of the schema.
    floors = {}
    for method, target_url in args.get("floor_targets", {}).items():
        target = create_audit_engine(target_url)
        try:
            floors[method] = floor.measure(engine, target, method=method)
        finally:
            target.dispose()
            if target_url.startswith("sqlite:///"):
                for suffix in ("", "-wal", "-shm"):
                    Path(target_url[len("sqlite:///") :] + suffix).unlink(missing_ok=True)
    result["floors"] = floors
    if floors:
        best = min(floors.values(), key=lambda f: f["seconds"])
        result["floor_method"] = best["method"]
        result["floor_seconds"] = best["seconds"]
        result["overhead_vs_floor"] = round(total / best["seconds"], 2) if best["seconds"] else None
        result["floor_bytes_per_source_row"] = round(best["disk"]["bytes"] / args["rows"])
    return result


def main() -> int:
    args = json.loads(sys.argv[1])
    result = run(args)
    Path(args["out"]).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
