"""E2E: a branch task's process is SIGKILLed mid-way.

``victim`` writes one call marker per call and commits every row (``batch_size=1``). On row
``KILL_AT`` of its first try it writes its pid and waits to be killed (bounded); the test SIGKILLs
that pid and marks the kill done, so the next call proceeds.

* ``e2e_killed_worker``: ``retries=1``: Airflow retries the task, the retry resumes after the rows
  already recorded, and ``require_all`` merges every row.
* ``e2e_killed_no_retry``: ``retries=0``: the task ends ``failed``; ``best_effort`` merges what
  ``quick`` delivered, and ``victim``'s missing rows are losses ``branch_task_failed`` long before
  the (10-minute) deadline.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

STATE_ROOT = Path(os.environ.get("ELSPETH_E2E_STATE", "/tmp"))
ROWS = [{"id": f"row-{n}", "n": n} for n in range(10)]
KILL_AT = 4
WAIT_FOR_KILL_SECONDS = 180


def quick(row: dict) -> dict:
    return {"quick": row["n"]}


def make_victim(dag_id: str):
    state = STATE_ROOT / dag_id

    def victim(row: dict) -> dict:
        calls = state / "calls"
        calls.mkdir(parents=True, exist_ok=True)
        (calls / f"{row['id']}.{uuid.uuid4().hex}").touch()
        if row["n"] == KILL_AT and not (state / "killed").exists():
            (state / "victim.pid").write_text(str(os.getpid()))
            give_up = time.monotonic() + WAIT_FOR_KILL_SECONDS
            while not (state / "killed").exists() and time.monotonic() < give_up:
                time.sleep(0.2)
            time.sleep(30)  # the SIGKILL lands here
        time.sleep(0.1)
        return {"victim": row["n"] * 100}

    return victim


def build(dag_id: str, *, retries: int, policy: str, deadline: timedelta) -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=datetime(2025, 1, 1),
        catchup=False,
        tags=["e2e"],
    ) as dag:
        fork = ForkOperator(task_id="fork", rows=ROWS, row_key="id", branches=["quick", "victim"])
        quick_task = BranchOperator(task_id="quick", fork=fork, branch="quick", python_callable=quick)
        victim_task = BranchOperator(
            task_id="victim",
            fork=fork,
            branch="victim",
            python_callable=make_victim(dag_id),
            batch_size=1,
            retries=retries,
            retry_delay=timedelta(seconds=2),
        )
        consensus = CoalesceSensor(
            task_id="consensus",
            fork=fork,
            policy=policy,
            merge="union",
            timeout=deadline,
            deferrable=True,
            poke_interval=2,
        )
        fork >> [quick_task, victim_task] >> consensus
    return dag


killed_worker = build("e2e_killed_worker", retries=1, policy="require_all", deadline=timedelta(minutes=5))
killed_no_retry = build(
    "e2e_killed_no_retry", retries=0, policy="best_effort", deadline=timedelta(minutes=10)
)
