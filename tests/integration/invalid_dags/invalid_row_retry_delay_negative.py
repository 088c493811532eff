"""An invalid coalesce configuration: importing this DAG file must fail, naming the parameter."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with DAG(
    dag_id="invalid_row_retry_delay_negative", schedule=None, start_date=datetime(2026, 1, 1), catchup=False
) as dag:
    fork = ForkOperator(task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b", "c"])
    steps = [
        BranchOperator(task_id=f"ask_{b}", fork=fork, branch=b, python_callable=dict, row_retry_delay=-1)
        for b in fork.branches
    ]
    coalesce = CoalesceSensor(task_id="coalesce", fork=fork, policy="require_all", timeout=60)
    fork >> steps >> coalesce
