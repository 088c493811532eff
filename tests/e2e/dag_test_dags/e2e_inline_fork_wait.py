"""dag.test(): a deferrable coalesce whose fork has not completed within ``fork_wait_timeout``.

A gate holds the fork back until the coalesce has ended: the coalesce gives up waiting for it at
``fork_wait_timeout`` (failed, or skipped with ``soft_fail``). The fork then completes, its
finalizer closes the rows the coalesce will never decide, and only then do the branches run (a
second gate), answering rows already closed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, get_current_context, task

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator
from airflow_elspeth.core.vocabulary import ENDED_TASK_STATES

ROWS = 3
FORK_WAIT = timedelta(seconds=3)


def _ended(task_id: str) -> bool:
    ti = get_current_context()["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, task_ids=[task_id], run_ids=[ti.run_id])
    return states.get(ti.run_id, {}).get(task_id) in ENDED_TASK_STATES


def _dag(dag_id: str, *, soft_fail: bool) -> DAG:
    with DAG(dag_id=dag_id, schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as dag:

        @task.sensor(task_id="fork_gate", poke_interval=0.5, mode="reschedule", timeout=300)
        def fork_gate() -> bool:
            return _ended("consensus")

        @task.sensor(task_id="branch_gate", poke_interval=0.5, mode="reschedule", timeout=300)
        def branch_gate() -> bool:
            return _ended("consensus_finalize")

        fork = ForkOperator(
            task_id="fork",
            rows=[{"id": f"r{n}", "n": n} for n in range(ROWS)],
            row_key="id",
            branches=["a", "b"],
        )
        a = BranchOperator(task_id="a", fork=fork, branch="a", python_callable=lambda row: {"a": row["n"]})
        b = BranchOperator(task_id="b", fork=fork, branch="b", python_callable=lambda row: {"b": -row["n"]})
        consensus = CoalesceSensor(
            task_id="consensus",
            fork=fork,
            policy="require_all",
            merge="union",
            timeout=timedelta(seconds=20),
            fork_wait_timeout=FORK_WAIT,
            soft_fail=soft_fail,
            deferrable=True,
            poke_interval=0.5,
        )
        fork_gate() >> fork >> branch_gate() >> [a, b] >> consensus
    return dag


fork_wait = _dag("e2e_inline_fork_wait", soft_fail=False)
fork_wait_soft = _dag("e2e_inline_fork_wait_soft", soft_fail=True)
