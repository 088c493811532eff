"""An invalid DAG structure: a mapped BranchOperator names a branch its fork does not have (its
constructor only runs when the task runs, so nothing else catches it at parse time).

Importing this DAG file must fail (cluster policy), naming the step, the branch and the fork.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with DAG(
    dag_id="topology_mapped_unknown_branch", schedule=None, start_date=datetime(2026, 1, 1), catchup=False
) as dag:
    fork = ForkOperator(task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b"])
    ask_a = BranchOperator(task_id="ask_a", fork=fork, branch="a", python_callable=dict)
    ask_z = BranchOperator.partial(task_id="ask_z", fork=fork, branch="z", python_callable=dict).expand(
        chunk=fork.chunks
    )
    ask_b = BranchOperator(task_id="ask_b", fork=fork, branch="b", python_callable=dict)
    coalesce = CoalesceSensor(
        task_id="coalesce", fork=fork, policy="require_all", timeout=timedelta(seconds=30)
    )
    fork >> [ask_a, ask_b]
    [ask_a, ask_b, ask_z] >> coalesce
