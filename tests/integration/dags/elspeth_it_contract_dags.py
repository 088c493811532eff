"""Test DAGs of branch output contracts and ``CoalesceSensor(on_collision=...)``.

Every DAG is ``fork >> [ask_a, ask_b] >> coalesce >> publish`` over six rows ``r0..r5``, union merge,
``require_all``:

* ``elspeth_it_contract``: both steps declare ``output_fields``; ``ask_a`` answers ``score`` as text on
  ``r2`` (a loss ``contract:score``) and leaves it out on ``r4`` (``contract:score`` too). The
  coalesce tolerates those two failures and exposes the merged contract.
* ``elspeth_it_collision_<mode>_<waiting>``: untyped steps that both answer ``value`` on even rows
  (a collision the contracts cannot rule out), under ``on_collision`` ``record``, ``fail_row`` or
  ``prefer:a``, with the coalesce in ``poke``, ``reschedule`` or ``deferrable`` mode (deferrable
  reschedules under ``dag.test()``; poke waits for the branches: ``trigger_rule="all_done"``).

Like the other DAG files here, parsing this file builds only the DAGs named in ``ELSPETH_IT_DAGS``
(all of them when it is unset).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, task
from integration.support import integration_dag, selected

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator, read_merged_rows

BRANCHES = ("a", "b")
ROW_COUNT = 6
BAD_SCORE_ROW, NO_SCORE_ROW = 2, 4  # ask_a breaks its contract on these rows
CONTRACTS = {"a": {"id": str, "score": int}, "b": {"id": str, "label": str | None}}
ON_COLLISION = ("record", "fail_row", "prefer:a")
WAITING = ("poke", "reschedule", "deferrable")


@dataclass(frozen=True)
class Scenario:
    dag_id: str
    contracts: bool
    on_collision: str = "record"
    waiting: str = "reschedule"


class Answer:
    """With contracts: ``a`` scores, ``b`` labels, ``a`` breaks its contract on two rows. Without:
    both answer ``value`` (their own) on even rows and a field of their own on every row; only ``a``
    answers ``id``."""

    def __init__(self, branch: str, contracts: bool) -> None:
        self.branch, self.contracts = branch, contracts
        self.__qualname__ = f"Answer[{branch}]"

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        n, b = row["n"], self.branch
        if not self.contracts:
            own = {"id": row["id"]} if b == "a" else {}  # only a names the row: no collision on id
            return {**own, f"{b}_only": n, **({"value": f"{b}{n}"} if n % 2 == 0 else {})}
        if b == "b":
            return {"id": row["id"], "label": None if n == 0 else f"label {n}"}
        if n == BAD_SCORE_ROW:
            return {"id": row["id"], "score": "high"}
        return {"id": row["id"]} if n == NO_SCORE_ROW else {"id": row["id"], "score": n}


def build_dag(scenario: Scenario) -> DAG:
    with integration_dag(scenario.dag_id) as dag:
        fork = ForkOperator(
            task_id="fork",
            rows=[{"id": f"r{n}", "n": n} for n in range(ROW_COUNT)],
            row_key="id",
            branches=list(BRANCHES),
            chunk_size=4,
        )
        steps = [
            BranchOperator(
                task_id=f"ask_{b}",
                fork=fork,
                branch=b,
                python_callable=Answer(b, scenario.contracts),
                output_fields=CONTRACTS[b] if scenario.contracts else None,
            )
            for b in BRANCHES
        ]
        waiting: dict[str, Any] = {"deferrable": scenario.waiting == "deferrable"}
        if scenario.waiting == "poke":
            waiting.update(mode="poke", trigger_rule="all_done")
        coalesce = CoalesceSensor(
            task_id="coalesce",
            fork=fork,
            policy="require_all",
            merge="union",
            on_collision=scenario.on_collision,
            timeout=timedelta(seconds=60),
            tolerated_failures=ROW_COUNT,
            poke_interval=1,
            retries=0,
            **waiting,
        )
        fork >> steps >> coalesce

        @task
        def publish(summary: dict[str, Any]) -> list[dict[str, Any]]:
            return list(read_merged_rows(summary))

        publish(coalesce.output)
    return dag


def collision_dag_id(on_collision: str, waiting: str) -> str:
    return f"elspeth_it_collision_{on_collision.replace(':', '_')}_{waiting}"


SCENARIOS: dict[str, Scenario] = {
    "elspeth_it_contract": Scenario("elspeth_it_contract", contracts=True),
    **{
        collision_dag_id(mode, waiting): Scenario(collision_dag_id(mode, waiting), False, mode, waiting)
        for mode in ON_COLLISION
        for waiting in WAITING
    },
}

for _dag_id in selected(SCENARIOS):
    globals()[_dag_id] = build_dag(SCENARIOS[_dag_id])
