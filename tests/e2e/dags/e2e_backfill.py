"""E2E: a daily DAG backfilled over several dates, every run writing to the one audit database.

Each run forks the same row keys with its own logical date in every row. ``right`` fails every row
of ``FAIL_DAY`` (a row error, so ``require_all`` fails those rows and the coalesce fails the run)
until the test drops the ``fixed`` marker; the test then reprocesses the failed date.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, task

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

DAG_ID = "e2e_backfill"
STATE = Path(os.environ.get("ELSPETH_E2E_STATE", "/tmp")) / DAG_ID
ROWS_PER_RUN = 8
FAIL_DAY = "2025-03-03"


class UpstreamOutage(RuntimeError):
    """The simulated dependency of ``right`` is down on FAIL_DAY."""


def left(row: dict) -> dict:
    time.sleep(0.2)
    return {"day": row["day"], "left": row["n"]}


def right(row: dict) -> dict:
    time.sleep(0.2)
    if row["day"] == FAIL_DAY and not (STATE / "fixed").exists():
        raise UpstreamOutage(f"outage on {row['day']}")
    return {"day": row["day"], "right": row["n"] * 2}


with DAG(
    dag_id=DAG_ID,
    schedule="@daily",
    start_date=datetime(2025, 3, 1),
    end_date=datetime(2025, 3, 31),
    catchup=False,
    max_active_runs=3,
    tags=["e2e"],
) as dag:

    @task
    def load(ds: str | None = None) -> list[dict]:
        return [{"id": f"r{n}", "n": n, "day": ds} for n in range(ROWS_PER_RUN)]

    fork = ForkOperator(task_id="fork", rows=load(), row_key="id", branches=["left", "right"])
    left_task = BranchOperator(task_id="left", fork=fork, branch="left", python_callable=left)
    right_task = BranchOperator(task_id="right", fork=fork, branch="right", python_callable=right)
    consensus = CoalesceSensor(
        task_id="consensus",
        fork=fork,
        policy="require_all",
        merge="union",
        timeout=timedelta(minutes=5),
        deferrable=True,
        poke_interval=3,
    )
    fork >> [left_task, right_task] >> consensus
