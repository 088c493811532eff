"""E2E: a deferrable coalesce waits in the triggerer while its branches run, and decides at its
deadline although one branch hangs.

Branches ``fast`` and ``steady`` take about a second per row; ``hung`` blocks on its first row until
the test drops a release file (bounded, so a forgotten test cannot keep a worker forever). Every
task runs in the 3-slot pool ``e2e_slots``: the three branches fill it, so the coalesce can only be
waiting without a slot (deferred: deferred tasks take no pool slot by default).
``best_effort``: each row merges what arrived by the deadline, ``hung``'s tokens end ``not_arrived``.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

DAG_ID = "e2e_deferred_deadline"
STATE = Path(os.environ.get("ELSPETH_E2E_STATE", "/tmp")) / DAG_ID
ROWS = [{"id": f"row-{n}", "n": n} for n in range(6)]
DEADLINE = timedelta(seconds=25)
HANG_LIMIT_SECONDS = 240


def fast(row: dict) -> dict:
    time.sleep(1.0)
    return {"fast": row["n"]}


def steady(row: dict) -> dict:
    time.sleep(1.0)
    return {"steady": row["n"] * 10}


def hung(row: dict) -> dict:
    release = STATE / "release"
    give_up = time.monotonic() + HANG_LIMIT_SECONDS
    while not release.exists() and time.monotonic() < give_up:
        time.sleep(0.5)
    return {"hung": row["n"]}


with DAG(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    default_args={"pool": "e2e_slots"},
    tags=["e2e"],
) as dag:
    fork = ForkOperator(task_id="fork", rows=ROWS, row_key="id", branches=["fast", "steady", "hung"])
    branches = [
        BranchOperator(task_id=name, fork=fork, branch=name, python_callable=func)
        for name, func in (("fast", fast), ("steady", steady), ("hung", hung))
    ]
    consensus = CoalesceSensor(
        task_id="consensus",
        fork=fork,
        policy="best_effort",
        merge="union",
        timeout=DEADLINE,
        deferrable=True,
        poke_interval=2,
    )
    fork >> branches >> consensus
