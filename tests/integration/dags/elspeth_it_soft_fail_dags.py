"""Test DAGs of ``CoalesceSensor(soft_fail=...)``: rows failing beyond the tolerance, a fork that fails.

Every DAG is ``fork >> [ask_a, ask_b] >> coalesce >> publish`` over six rows ``r0..r5``. Branch ``a``
raises on ``r1`` and ``r4``, so a ``require_all`` coalesce fails those two rows, beyond its tolerance
of none; with ``bad_rows`` the fork itself fails (a duplicate row key), so the coalesce fails the way
a sensor does when what it waits for can never come. Each scenario exists with ``soft_fail`` on and
off, and in the reschedule and the deferrable mode (which reschedules under ``dag.test()``).

Like the other DAG files here, parsing this file builds only the DAGs named in ``ELSPETH_IT_DAGS``
(all of them when it is unset).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, task
from integration.support import integration_dag, selected

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

BRANCHES = ("a", "b")
ROW_COUNT = 6
FAILING_ROWS = (1, 4)  # branch "a" raises on these rows


@dataclass(frozen=True)
class Scenario:
    dag_id: str
    soft_fail: bool
    deferrable: bool = False
    bad_rows: bool = False  # the fork fails on a duplicate row key


def _rows(bad: bool) -> Iterator[dict[str, Any]]:
    for n in range(ROW_COUNT):
        yield {"id": "r1" if bad and n == 4 else f"r{n}", "n": n}


class Answer:
    """Branch ``a`` raises on ``FAILING_ROWS``; every other call answers."""

    def __init__(self, branch: str) -> None:
        self.branch = branch
        self.__qualname__ = f"Answer[{branch}]"

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.branch == "a" and row["n"] in FAILING_ROWS:
            raise ValueError(f"a cannot answer {row['id']}")
        return {"id": row["id"], f"{self.branch}_value": row["n"]}


def build_dag(scenario: Scenario) -> DAG:
    with integration_dag(scenario.dag_id) as dag:
        bad = scenario.bad_rows
        fork = ForkOperator(
            task_id="fork", rows=lambda: _rows(bad), row_key="id", branches=list(BRANCHES), chunk_size=4
        )
        steps = [
            BranchOperator(task_id=f"ask_{b}", fork=fork, branch=b, python_callable=Answer(b))
            for b in BRANCHES
        ]
        coalesce = CoalesceSensor(
            task_id="coalesce",
            fork=fork,
            policy="require_all",
            timeout=timedelta(seconds=60),
            soft_fail=scenario.soft_fail,
            deferrable=scenario.deferrable,
            poke_interval=1,
            retries=0,
        )
        fork >> steps >> coalesce

        @task
        def publish(summary: dict[str, Any]) -> int:
            return int(summary["rows_merged"])

        publish(coalesce.output)
    return dag


def dag_id(soft_fail: bool, deferrable: bool, bad_rows: bool) -> str:
    return (
        f"elspeth_it_soft_fail_{'on' if soft_fail else 'off'}"
        f"{'_deferrable' if deferrable else ''}{'_fork_fails' if bad_rows else ''}"
    )


SCENARIOS: dict[str, Scenario] = {
    dag_id(*flags): Scenario(dag_id(*flags), *flags) for flags in itertools.product((True, False), repeat=3)
}

for _dag_id in selected(SCENARIOS):
    globals()[_dag_id] = build_dag(SCENARIOS[_dag_id])
