"""dag.test(): a deferrable coalesce that starts before its branches.

``gate`` holds the branches back after the fork, so the coalesce (``trigger_rule="always"``) looks
while the fork has completed and no branch has run. dag.test() runs a trigger inline, blocking
every other task until it fires: had the coalesce deferred then, the branches could only run after
its deadline and every row would fail ``incomplete_branches``.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with DAG(dag_id="e2e_inline_deferrable", schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as dag:
    fork = ForkOperator(
        task_id="fork", rows=[{"id": f"r{n}", "n": n} for n in range(5)], row_key="id", branches=["a", "b"]
    )

    @task
    def gate() -> None:
        time.sleep(3)

    held = gate()
    a = BranchOperator(task_id="a", fork=fork, branch="a", python_callable=lambda row: {"a": row["n"]})
    b = BranchOperator(task_id="b", fork=fork, branch="b", python_callable=lambda row: {"b": -row["n"]})
    consensus = CoalesceSensor(
        task_id="consensus",
        fork=fork,
        policy="require_all",
        merge="union",
        timeout=timedelta(seconds=20),
        deferrable=True,
        poke_interval=0.5,
    )
    fork >> held >> [a, b] >> consensus
