"""Two DAGs in one file, each with a coalesce rescheduled every 2 s (below the 10 s under which
Airflow's scheduler races on reschedule pokes) and one of them also `require_all` over a step that may
drop rows. Each imports with its own ElspethDagWarnings, each naming its DAG and its task, once per
parse: the file's other DAG is parsed with it (so is every DAG of a file in a task's process), so a
warning that named no DAG would read as this one's.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

for dag_id, policy in (
    ("warned_reschedule_first", "first"),
    ("warned_reschedule_require_all", "require_all"),
):
    with DAG(dag_id=dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
        fork = ForkOperator(task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b"])
        steps = [
            BranchOperator(task_id=f"ask_{b}", fork=fork, branch=b, python_callable=dict, may_drop=b == "b")
            for b in fork.branches
        ]
        coalesce = CoalesceSensor(
            task_id="coalesce", fork=fork, policy=policy, timeout=timedelta(seconds=30), poke_interval=2
        )
        fork >> steps >> coalesce
