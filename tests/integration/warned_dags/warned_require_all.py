"""A sound DAG certain to fail rows: a require_all coalesce fed by a step that may drop rows (branch
'a') and by a two-step branch whose first step has no row_retries (branch 'b').

It imports (the cluster policy lets it through) with two ElspethDagWarnings naming the coalesce, the
branch and the step.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with DAG(dag_id="warned_require_all", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
    fork = ForkOperator(task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b"])
    filter_a = BranchOperator(task_id="filter_a", fork=fork, branch="a", python_callable=dict, may_drop=True)
    prep_b = BranchOperator(task_id="prep_b", fork=fork, branch="b", python_callable=dict)
    ask_b = BranchOperator(task_id="ask_b", fork=fork, branch="b", python_callable=dict, row_retries=2)
    coalesce = CoalesceSensor(
        task_id="coalesce", fork=fork, policy="require_all", timeout=timedelta(seconds=30)
    )
    fork >> [filter_a, prep_b]
    prep_b >> ask_b
    [filter_a, ask_b] >> coalesce
