"""Test DAG of "one audit store per fork": only the fork names an audit connection.

``fork >> [ask_a, ask_b (mapped over the fork's chunks)] >> coalesce (+ its finalizer)`` over six
rows ``r0..r5``, chunks of two. The fork names ``audit_conn_id=STORE_CONN``; no other task names a
store, so each must use the fork's, whatever the default store is (the mapped step is built when it
runs, so it inherits then).

Like the other DAG files here, parsing this file builds only the DAGs named in ``ELSPETH_IT_DAGS``
(all of them when it is unset).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import DAG
from integration.support import integration_dag, selected

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

DAG_ID = "elspeth_it_store_of_the_fork"
STORE_CONN = "elspeth_fork_store"
BRANCHES = ("a", "b")
ROW_COUNT = 6


class Answer:
    def __init__(self, branch: str) -> None:
        self.branch = branch
        self.__qualname__ = f"Answer[{branch}]"

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], f"{self.branch}_value": row["n"]}


def build_dag() -> DAG:
    with integration_dag(DAG_ID) as dag:
        fork = ForkOperator(
            task_id="fork",
            rows=[{"id": f"r{n}", "n": n} for n in range(ROW_COUNT)],
            row_key="id",
            branches=list(BRANCHES),
            chunk_size=2,
            audit_conn_id=STORE_CONN,
        )
        ask_a = BranchOperator(task_id="ask_a", fork=fork, branch="a", python_callable=Answer("a"))
        ask_b = BranchOperator.partial(
            task_id="ask_b", fork=fork, branch="b", python_callable=Answer("b")
        ).expand(chunk=fork.chunks)
        coalesce = CoalesceSensor(
            task_id="coalesce",
            fork=fork,
            policy="require_all",
            timeout=timedelta(seconds=60),
            poke_interval=1,
            retries=0,
        )
        fork >> ask_a
        [ask_a, ask_b] >> coalesce
    return dag


for _dag_id in selected([DAG_ID]):
    globals()[_dag_id] = build_dag()
