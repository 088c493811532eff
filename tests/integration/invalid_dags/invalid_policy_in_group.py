"""An unknown policy on a coalesce inside a TaskGroup: the import error names the DAG, the task (its
group-prefixed id) and the parameter, although the traceback Airflow shows ends in the provider."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, TaskGroup

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with (
    DAG(
        dag_id="invalid_policy_in_group", schedule=None, start_date=datetime(2026, 1, 1), catchup=False
    ) as dag,
    TaskGroup(group_id="consensus"),
):
    fork = ForkOperator(task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b"])
    steps = [BranchOperator(task_id=f"ask_{b}", fork=fork, branch=b, python_callable=dict) for b in "ab"]
    coalesce = CoalesceSensor(task_id="vote", fork=fork, policy="majority", timeout=timedelta(seconds=30))
    fork >> steps >> coalesce
