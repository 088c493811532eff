"""An invalid DAG structure: the fork writes to one audit store, a mapped step names another (its
rows would be looked up where the fork never wrote them; a mapped step's constructor only runs when
the task runs, so the parse-time check is what catches it).

Importing this DAG file must fail (cluster policy), naming the DAG, both tasks and both connections.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with DAG(
    dag_id="topology_mapped_step_of_another_store",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
) as dag:
    fork = ForkOperator(
        task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b"], audit_conn_id="elspeth_sqlite"
    )
    ask_a = BranchOperator(task_id="ask_a", fork=fork, branch="a", python_callable=dict)
    ask_b = BranchOperator.partial(
        task_id="ask_b", fork=fork, branch="b", python_callable=dict, audit_conn_id="elspeth_audit_default"
    ).expand(chunk=fork.chunks)
    coalesce = CoalesceSensor(
        task_id="coalesce", fork=fork, policy="require_all", timeout=timedelta(seconds=30)
    )
    fork >> ask_a
    [ask_a, ask_b] >> coalesce
