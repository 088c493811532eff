"""An invalid DAG structure: the coalesce joins branch 'c', but no BranchOperator delivers it.

Importing this DAG file must fail (cluster policy), naming the coalesce, the branch and the fork.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with DAG(
    dag_id="topology_branch_without_step", schedule=None, start_date=datetime(2026, 1, 1), catchup=False
) as dag:
    fork = ForkOperator(task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b", "c"])
    steps = [
        BranchOperator(task_id=f"ask_{b}", fork=fork, branch=b, python_callable=dict) for b in ("a", "b")
    ]
    coalesce = CoalesceSensor(
        task_id="coalesce", fork=fork, policy="require_all", timeout=timedelta(seconds=30)
    )
    fork >> steps >> coalesce
