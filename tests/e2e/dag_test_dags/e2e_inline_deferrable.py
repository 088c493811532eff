"""dag.test(): a deferrable coalesce that starts before its branches.

Two gates hold the branches back after the fork. dag.test() runs the task instances ready in one
iteration of its loop one after another, and the coalesce (``trigger_rule="always"``, re-poking every
0.5 s) is due again by the time the second gate runs: it looks while the fork has completed and no
branch has run, whatever order dag.test() picks within an iteration. dag.test() runs a trigger
inline, blocking
every other task until it fires: had the coalesce deferred then, the branches could only run after
its deadline and every row would fail ``incomplete_branches``.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with DAG(
    dag_id="e2e_inline_deferrable", schedule=None, start_date=datetime(2025, 1, 1), catchup=False
) as dag:
    fork = ForkOperator(
        task_id="fork", rows=[{"id": f"r{n}", "n": n} for n in range(5)], row_key="id", branches=["a", "b"]
    )

    @task
    def gate() -> None:
        time.sleep(1)

    first_gate, second_gate = gate.override(task_id="gate_1")(), gate.override(task_id="gate_2")()
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
    fork >> first_gate >> second_gate >> [a, b] >> consensus
