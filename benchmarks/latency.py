"""Latency of the audit trail: how soon a result is visible, how soon a branch skips a decided row.

* :func:`visibility` - per branch result, ``recorded_at - completed_at``: from the callable's return
  to its node state's event time, stamped inside the write that makes it visible (the benchmark
  worker computes it for every run).
* ``python -m benchmarks.latency --url URL`` (also run by ``python -m benchmarks``, in a process of
  its own, :func:`run_scenario`) - the decision -> skip scenario: a ``first`` coalesce over a fast
  branch (``FAST_ROW_SECONDS`` a row) and a slow one (``SLOW_ROW_SECONDS`` a row, one at a time).
  Both BranchOperators run for real (``execute`` in threads, a fake task instance); the deferred
  coalesce is its :class:`~airflow_elspeth.triggers.coalesce.CoalesceTrigger`'s ``poll``, called
  every ``POLL_SECONDS`` as the triggerer would (without the triggerer), and when it fires, after
  ``MIN_DEFERRAL_SECONDS`` as the real one, the resumed task's pass. Each fast arrival decides its
  row; the slow branch should skip it. Measured from the audit store: the decision -> skip
  delay (a skipped outcome's ``recorded_at`` minus its row's decision's ``recorded_at``), the
  decidable -> decided delay (``recorded_at - decided_at`` of the decisions: the poll interval),
  the visibility of both branches' results, and the slow branch's rows run and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROWS = 200
FAST_ROW_SECONDS = 0.02
SLOW_ROW_SECONDS = 0.25
POLL_SECONDS = 0.5
DAG_ID, AIRFLOW_RUN = "latency_scenario", "manual__latency"


def percentiles(values_ms: list[float]) -> dict[str, Any]:
    """p50 / p99 / max (ms) and n of a list of milliseconds."""
    if not values_ms:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values_ms)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 1),
        "p99": round(p99, 1),
        "max": round(ordered[-1], 1),
    }


def _ms(later: datetime, earlier: datetime) -> float:
    return (_utc(later) - _utc(earlier)).total_seconds() * 1000


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def visibility(engine: Any, run_id: str, nodes: list[str] | None = None) -> dict[str, Any]:
    """``recorded_at - completed_at`` (ms) of the run's branch results (of ``nodes`` if given)."""
    from sqlalchemy import select

    from airflow_elspeth.audit import schema as t

    ns, n = t.node_states.c, t.nodes.c
    query = (
        select(ns.recorded_at, ns.completed_at)
        .join(t.nodes, (n.run_id == ns.run_id) & (n.node_id == ns.node_id))
        .where(ns.run_id == run_id, n.node_type == "branch")
    )
    if nodes is not None:
        query = query.where(ns.node_id.in_(nodes))
    with engine.connect() as conn:
        return percentiles([_ms(rec, done) for rec, done in conn.execute(query)])


def skip_delays(engine: Any, run_id: str, branch: str) -> dict[str, Any]:
    """Per token of ``branch`` skipped as decided: its skip's ``recorded_at`` - the decision's."""
    from sqlalchemy import select

    from airflow_elspeth.audit import schema as t
    from airflow_elspeth.core.vocabulary import TokenOutcome

    o, tk, cd = t.token_outcomes.c, t.tokens.c, t.coalesce_decisions.c
    query = (
        select(o.recorded_at, cd.recorded_at)
        .join(t.tokens, tk.token_id == o.token_id)
        .join(t.coalesce_decisions, (cd.run_id == tk.run_id) & (cd.row_id == tk.row_id))
        .where(o.run_id == run_id, tk.branch_name == branch, o.outcome == TokenOutcome.SKIPPED)
    )
    with engine.connect() as conn:
        return percentiles([_ms(skip, decision) for skip, decision in conn.execute(query)])


def decision_delays(engine: Any, run_id: str) -> dict[str, Any]:
    """Per decision: ``recorded_at - decided_at`` (ms), from decidable to written."""
    from sqlalchemy import select

    from airflow_elspeth.audit import schema as t

    cd = t.coalesce_decisions.c
    with engine.connect() as conn:
        rows = conn.execute(select(cd.recorded_at, cd.decided_at).where(cd.run_id == run_id))
        return percentiles([_ms(rec, decided) for rec, decided in rows])


def _fast(row: dict[str, Any]) -> dict[str, Any]:
    time.sleep(FAST_ROW_SECONDS)
    return {"fast": row["id"]}


def _slow(row: dict[str, Any]) -> dict[str, Any]:
    time.sleep(SLOW_ROW_SECONDS)
    return {"slow": row["id"]}


class _TaskInstance:
    dag_id, run_id, try_number = DAG_ID, AIRFLOW_RUN, 1

    def __init__(self, ref: dict[str, Any]) -> None:
        self.ref = ref

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        return self.ref if task_ids == "fork" else None


def scenario(url: str) -> dict[str, Any]:
    """Run the decision -> skip scenario against the audit store at ``url``; its figures."""
    from airflow.sdk import DAG

    from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator
    from airflow_elspeth.audit.coalesce import coalesce_pass
    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.store import AuditStore, ForkRow, RunIdentity
    from airflow_elspeth.core.canonical import hash_value
    from airflow_elspeth.core.vocabulary import NodeType
    from airflow_elspeth.triggers import coalesce as trigger_module
    from airflow_elspeth.triggers.coalesce import CoalesceTrigger

    engine = engine_for_url(url)
    store = AuditStore(engine)
    with DAG(DAG_ID, schedule=None, start_date=datetime(2026, 1, 1)):
        fork = ForkOperator(task_id="fork", rows=[], branches=["fast", "slow"], row_key="id")
        fast = BranchOperator(task_id="fast", fork=fork, branch="fast", python_callable=_fast)
        slow = BranchOperator(task_id="slow", fork=fork, branch="slow", python_callable=_slow)
        coalesce = CoalesceSensor(task_id="coalesce", fork=fork, policy="first", timeout=3600)
        fork >> [fast, slow] >> coalesce
    run_id = store.begin_run(
        RunIdentity(dag_id=DAG_ID, airflow_run_id=AIRFLOW_RUN, fork_task_id="fork", try_number=1),
        branches=["fast", "slow"],
        chunk_size=ROWS,
        config={"branches": ["fast", "slow"]},
    )
    rows = []
    for index in range(ROWS):
        digest, body = hash_value({"id": f"r{index}"}, what="row")
        rows.append(ForkRow(row_key=f"r{index}", row_index=index, payload_hash=digest, payload_body=body))
    store.write_fork_chunk(run_id, ["fast", "slow"], 0, rows)
    store.complete_run(run_id, rows_total=ROWS, chunks_total=1)
    spec = coalesce.spec()
    store.register_node(run_id, "coalesce", NodeType.COALESCE, None, spec.as_dict())
    ref = {"audit_run_id": run_id, "chunks_total": 1}
    walls: dict[str, float] = {}
    errors: list[BaseException] = []

    def branch(task: BranchOperator) -> None:
        started = time.perf_counter()
        try:
            task.execute({"ti": _TaskInstance(ref)})
        except BaseException as err:  # reported below: the scenario is invalid
            errors.append(err)
        walls[task.task_id] = round(time.perf_counter() - started, 2)

    threads = [threading.Thread(target=branch, args=(task,)) for task in (slow, fast)]
    for thread in threads:
        thread.start()
    polls, resumes = 0, 0
    give_up = time.monotonic() + ROWS * SLOW_ROW_SECONDS * 4
    states = {"fast": "running", "slow": "running"}
    while True:  # deferred: the trigger polls; when it fires, the task resumes and runs the pass
        trigger = CoalesceTrigger(
            spec=spec.as_dict(),
            run_id=run_id,
            dag_id=DAG_ID,
            airflow_run_id=AIRFLOW_RUN,
            poll_interval=POLL_SECONDS,
        )
        deferred_at = time.monotonic()
        while trigger.poll(spec, states).reason is None:
            polls += 1
            if time.monotonic() > give_up:
                raise RuntimeError("the coalesce never decided every row")
            time.sleep(POLL_SECONDS)
        time.sleep(max(0.0, trigger_module.MIN_DEFERRAL_SECONDS - (time.monotonic() - deferred_at)))
        resumes += 1
        if coalesce_pass(store, spec, run_id, states).done:  # execute_complete's pass
            break
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"a branch failed: {errors[0]!r}") from errors[0]
    with engine.connect() as conn:
        from sqlalchemy import func, select

        from airflow_elspeth.audit import schema as t

        slow_ran = conn.execute(
            select(func.count()).where(t.node_states.c.run_id == run_id, t.node_states.c.node_id == "slow")
        ).scalar_one()
    import airflow_elspeth

    return {
        "provider": str(Path(airflow_elspeth.__file__).parent),
        "rows": ROWS,
        "fast_row_seconds": FAST_ROW_SECONDS,
        "slow_row_seconds": SLOW_ROW_SECONDS,
        "poll_seconds": POLL_SECONDS,
        "decision_to_skip_ms": skip_delays(engine, run_id, "slow"),
        "decidable_to_decided_ms": decision_delays(engine, run_id),
        "visibility_ms": visibility(engine, run_id),
        "slow_rows_run": slow_ran,
        "slow_wall_seconds": walls.get("slow"),
        "slow_wall_without_skips_seconds": round(ROWS * SLOW_ROW_SECONDS, 1),
        "trigger_polls": polls,
        "task_resumes": resumes,
    }


def run_scenario(env: dict[str, str], url: str, cwd: Path) -> dict[str, Any]:
    """:func:`scenario` in a fresh process with ``env`` (an Airflow home, the PYTHONPATH).

    ``cwd`` must not be the checkout: ``python -m`` puts it first on sys.path, which would shadow
    ``--provider-path`` (as for the benchmark workers, benchmarks/cli.py).
    """
    from benchmarks import run_for_json

    command = [sys.executable, "-m", "benchmarks.latency", "--url", url]
    return run_for_json(command, "latency scenario", cwd=cwd, env=env)


def scenario_table(r: dict[str, Any]) -> Any:
    """The scenario's figures as a table for ``python -m benchmarks``."""
    from rich.table import Table

    table = Table(
        title=(
            f"decision -> skip: first-policy coalesce, {r['rows']} rows, "
            f"fast branch {r['fast_row_seconds']} s/row, "
            f"slow branch {r['slow_row_seconds']} s/row, "
            f"trigger poll every {r['poll_seconds']} s (SQLite)"
        ),
        title_justify="left",
    )
    table.add_column("")
    table.add_column("p50 / p99 / max ms (n)", justify="right")
    for label, key in (
        ("decision recorded -> slow branch's skip recorded (target < 1000)", "decision_to_skip_ms"),
        ("decidable (decided_at) -> decision recorded by the trigger", "decidable_to_decided_ms"),
        ("result visible: callable return -> recorded_at", "visibility_ms"),
    ):
        figures = r[key]
        table.add_row(label, "{p50} / {p99} / {max} ({n})".format(**figures))
    table.add_row(
        "slow branch: rows run, wall s (without skips)",
        f"{r['slow_rows_run']}, {r['slow_wall_seconds']} ({r['slow_wall_without_skips_seconds']})",
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", help="audit database URL (default: a fresh SQLite file)")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="elspeth-latency-") as tmp:
        os.environ.setdefault("AIRFLOW_HOME", tmp)
        url = opts.url or f"sqlite:///{Path(tmp) / 'audit.db'}"
        os.environ["AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT"] = json.dumps(
            {"conn_type": "elspeth", "extra": {"sqlalchemy_url": url}}
        )
        print(json.dumps(scenario(url)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
