"""An invalid DAG structure: the step directly upstream of the coalesce for branch 'b' belongs to
another fork (every row would be lost on 'b').

Importing this DAG file must fail (cluster policy), naming the coalesce, the branch and both forks.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with DAG(
    dag_id="topology_step_of_another_fork", schedule=None, start_date=datetime(2026, 1, 1), catchup=False
) as dag:
    orders = ForkOperator(task_id="orders", rows=[{"id": 1}], row_key="id", branches=["a", "b"])
    refunds = ForkOperator(task_id="refunds", rows=[{"id": 1}], row_key="id", branches=["a", "b"])
    orders_a = BranchOperator(task_id="orders_a", fork=orders, branch="a", python_callable=dict)
    refunds_b = BranchOperator(task_id="refunds_b", fork=refunds, branch="b", python_callable=dict)
    coalesce = CoalesceSensor(
        task_id="orders_joined", fork=orders, policy="require_all", timeout=timedelta(seconds=30)
    )
    orders >> orders_a
    refunds >> refunds_b
    [orders_a, refunds_b] >> coalesce
