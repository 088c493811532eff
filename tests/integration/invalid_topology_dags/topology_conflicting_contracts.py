"""An invalid DAG structure: a union coalesce whose branches declare field 'value' with different types.

Importing this DAG file must fail (cluster policy), naming the coalesce, the field, both branches and
their steps.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

with DAG(
    dag_id="topology_conflicting_contracts", schedule=None, start_date=datetime(2026, 1, 1), catchup=False
) as dag:
    fork = ForkOperator(task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b"])
    ask_a = BranchOperator(
        task_id="ask_a", fork=fork, branch="a", python_callable=dict, output_fields={"value": int}
    )
    ask_b = BranchOperator(
        task_id="ask_b", fork=fork, branch="b", python_callable=dict, output_fields={"value": str}
    )
    coalesce = CoalesceSensor(
        task_id="coalesce", fork=fork, policy="require_all", merge="union", timeout=timedelta(seconds=30)
    )
    fork >> [ask_a, ask_b] >> coalesce
