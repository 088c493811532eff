"""E2E: a deferrable coalesce whose fork has not completed within ``fork_wait_timeout``.

A gate before the fork blocks until the test drops a release file (bounded, so a forgotten test
cannot keep a worker forever). The coalesce defers at once; its trigger gives up waiting for the
fork at ``fork_wait_timeout`` and the resumed task fails (``AirflowSensorTimeout``, no retry), as a
reschedule-mode coalesce would. Released, the fork completes and its finalizer closes the rows.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, task

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

DAG_ID = "e2e_deferred_fork_wait"
STATE = Path(os.environ.get("ELSPETH_E2E_STATE", "/tmp")) / DAG_ID
ROWS = [{"id": f"row-{n}", "n": n} for n in range(4)]
FORK_WAIT = timedelta(seconds=20)
HOLD_LIMIT_SECONDS = 240

with DAG(dag_id=DAG_ID, schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["e2e"]) as dag:

    @task
    def gate() -> None:
        give_up = time.monotonic() + HOLD_LIMIT_SECONDS
        while not (STATE / "release").exists() and time.monotonic() < give_up:
            time.sleep(0.5)

    fork = ForkOperator(task_id="fork", rows=ROWS, row_key="id", branches=["left", "right"])
    branches = [
        BranchOperator(
            task_id=name, fork=fork, branch=name, python_callable=lambda row, name=name: {name: row["n"]}
        )
        for name in ("left", "right")
    ]
    consensus = CoalesceSensor(
        task_id="consensus",
        fork=fork,
        policy="require_all",
        merge="union",
        timeout=timedelta(seconds=30),
        fork_wait_timeout=FORK_WAIT,
        deferrable=True,
        poke_interval=2,
    )
    gate() >> fork >> branches >> consensus
