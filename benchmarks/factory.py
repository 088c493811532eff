"""DAG factories for the benchmark: ours (fork -> 3 branches -> coalesce) and the naive mapped way.

The benchmark writes a two-line DAG file calling one of these into a temporary DAGS_FOLDER, so
``dag.test()`` finds and parses it through Airflow's own bundle machinery.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

BRANCHES = ("alpha", "beta", "gamma")
START = datetime(2026, 1, 1)


def make_row(i: int) -> dict[str, Any]:
    """One input row (~90 bytes of canonical JSON): a key, a label, two numbers and a flag."""
    return {
        "id": i,
        "name": f"item-{i:07d}",
        "value": (i * 7919) % 100_003,
        "price": i % 997 / 10,
        "ok": i % 2 == 0,
    }


def generate_rows(n: int) -> Iterator[dict[str, Any]]:
    """The fork's source, streamed: never a list of n rows in memory."""
    return (make_row(i) for i in range(n))


# Trivial branch callables: each returns a small dict with a field of its own (no union collisions).
def branch_alpha(row: dict[str, Any]) -> dict[str, Any]:
    return {"alpha": row["value"] + 1}


def branch_beta(row: dict[str, Any]) -> dict[str, Any]:
    return {"beta": row["name"].upper()}


def branch_gamma(row: dict[str, Any]) -> dict[str, Any]:
    return {"gamma": row["price"] * 2}


CALLABLES = {"alpha": branch_alpha, "beta": branch_beta, "gamma": branch_gamma}

# task_id -> {"start": epoch seconds, "seconds": execute() wall time}; dag.test() runs every task in
# the benchmark worker's process, so the worker reads this after the run.
TIMINGS: dict[str, dict[str, float]] = {}
# sensor task_id -> {"pokes": n, "seconds": time inside poke()}: the rest of a sensor's execute() is
# its poke_interval sleeps (a pass leaves events younger than the coalesce's settle window for the
# next poke) and the final report.
POKES: dict[str, dict[str, float]] = {}


def timed(cls: type) -> type:
    """A subclass of a provider operator whose ``execute`` records its own wall time, nothing else.

    The task instance's start/end dates also cover the task runner's own work (the in-process
    execution API starting the task, XCom pushes, state updates): the worker reports both.
    """

    class Timed(cls):  # type: ignore[misc, valid-type]
        def execute(self, context: Any) -> Any:
            start, started = time.time(), time.perf_counter()
            try:
                return super().execute(context)
            finally:
                TIMINGS[self.task_id] = {"start": start, "seconds": time.perf_counter() - started}

    if hasattr(cls, "poke"):

        def poke(self: Any, context: Any) -> Any:
            started = time.perf_counter()
            try:
                return super(Timed, self).poke(context)
            finally:
                entry = POKES.setdefault(self.task_id, {"pokes": 0, "seconds": 0.0})
                entry["pokes"] += 1
                entry["seconds"] += time.perf_counter() - started

        Timed.poke = poke  # type: ignore[attr-defined]

    Timed.__name__ = Timed.__qualname__ = cls.__name__
    return Timed


def elspeth_dag(dag_id: str, rows: int, *, chunk_size: int = 1000) -> Any:
    """fork -> 3 BranchOperators -> CoalesceSensor (require_all, union).

    The coalesce runs after the branches (``trigger_rule="all_done"``, ``mode="poke"``) instead of
    the default ``always`` + reschedule: under ``dag.test()`` tasks run one after another in one
    process, and a coalesce started first would only reschedule itself (and sleep) while nothing
    else runs. Ordered this way each phase is one task instance whose start/end dates time it, and
    the coalesce does its whole job in one pass (the same code path as any poke).
    """
    from airflow.sdk import DAG

    from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

    ForkOperator, BranchOperator, CoalesceSensor = (
        timed(ForkOperator),
        timed(BranchOperator),
        timed(CoalesceSensor),
    )
    with DAG(dag_id=dag_id, schedule=None, start_date=START, catchup=False, tags=["benchmark"]) as dag:
        fork = ForkOperator(
            task_id="fork",
            rows=functools.partial(generate_rows, rows),
            row_key="id",
            branches=list(BRANCHES),
            chunk_size=chunk_size,
        )
        branches = [
            BranchOperator(task_id=f"branch_{b}", fork=fork, branch=b, python_callable=CALLABLES[b])
            for b in BRANCHES
        ]
        coalesce = CoalesceSensor(
            task_id="coalesce",
            fork=fork,
            policy="require_all",
            merge="union",
            timeout=timedelta(hours=6),
            mode="poke",
            poke_interval=1,
            trigger_rule="all_done",
        )
        fork >> branches >> coalesce
    return dag


def naive_dag(dag_id: str, rows: int) -> Any:
    """The naive Airflow way: one mapped task instance per (row, branch), a trigger-rule join.

    ``load`` pushes the rows as one XCom; each branch is ``.expand(row=...)`` over them (one task
    instance per row, Airflow's ``max_map_length`` caps this at 1024); ``join`` runs with
    ``trigger_rule="all_done"`` and merges the three outputs of each row by map index. It keeps no
    audit trail beyond Airflow's own task instances and XComs.
    """
    from airflow.sdk import DAG, task

    with DAG(dag_id=dag_id, schedule=None, start_date=START, catchup=False, tags=["benchmark"]) as dag:

        @task
        def load() -> list[dict[str, Any]]:
            return list(generate_rows(rows))

        @task
        def alpha(row: dict[str, Any]) -> dict[str, Any]:
            return branch_alpha(row)

        @task
        def beta(row: dict[str, Any]) -> dict[str, Any]:
            return branch_beta(row)

        @task
        def gamma(row: dict[str, Any]) -> dict[str, Any]:
            return branch_gamma(row)

        @task(trigger_rule="all_done")
        def join(a: Any, b: Any, c: Any) -> dict[str, int]:
            merged = failed = 0
            for out_a, out_b, out_c in zip(a, b, c, strict=False):
                if out_a is None or out_b is None or out_c is None:
                    failed += 1
                else:
                    merged += 1
                    _ = {**out_a, **out_b, **out_c}
            return {"merged": merged, "failed": failed}

        source = load()
        join(alpha.expand(row=source), beta.expand(row=source), gamma.expand(row=source))
    return dag
