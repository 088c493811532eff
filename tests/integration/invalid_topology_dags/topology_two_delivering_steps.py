"""An invalid DAG structure: two BranchOperators of the fork deliver branch 'a' to the coalesce.

Importing this DAG file must fail (cluster policy), naming the coalesce, the branch, the fork and
both steps.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with DAG(
    dag_id="topology_two_delivering_steps", schedule=None, start_date=datetime(2026, 1, 1), catchup=False
) as dag:
    fork = ForkOperator(task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b"])
    ask_a = BranchOperator(task_id="ask_a", fork=fork, branch="a", python_callable=dict)
    ask_a_again = BranchOperator(task_id="ask_a_again", fork=fork, branch="a", python_callable=dict)
    ask_b = BranchOperator(task_id="ask_b", fork=fork, branch="b", python_callable=dict)
    coalesce = CoalesceSensor(
        task_id="coalesce", fork=fork, policy="require_all", timeout=timedelta(seconds=30)
    )
    fork >> [ask_a, ask_a_again, ask_b] >> coalesce
