"""E2E: the provider's metrics from a deferred coalesce whose trigger decides every row in the
triggerer (tests/e2e/test_e2e_metrics.py).

Eight rows, branches ``ok`` and ``gated``, policy ``require_all``. ``gated`` answers only once the
test drops ``release`` into the DAG's state folder, after it saw the coalesce deferred, so every row
is decided by the trigger's passes; its callable raises on rows 0 and 1 (tolerated), which fail
``branch_lost``. The wait is bounded, so a forgotten test cannot hold a worker for ever.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

DAG_ID = "e2e_metrics"
ROWS = [{"id": f"row-{n}", "n": n} for n in range(8)]
FAILING = (0, 1)
WAIT_LIMIT_SECONDS = 240


def state_dir() -> Path:
    return Path(os.environ.get("ELSPETH_E2E_STATE", "/tmp")) / DAG_ID


def ok(row: dict) -> dict:
    return {"ok": row["n"]}


def gated(row: dict) -> dict:
    give_up = time.monotonic() + WAIT_LIMIT_SECONDS
    while not (state_dir() / "release").exists() and time.monotonic() < give_up:
        time.sleep(0.2)
    if row["n"] in FAILING:
        raise ValueError(f"gated cannot answer {row['id']}")
    return {"gated": row["n"]}


with DAG(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["e2e"],
) as dag:
    fork = ForkOperator(task_id="fork", rows=ROWS, row_key="id", branches=["ok", "gated"])
    ok_step = BranchOperator(task_id="ok", fork=fork, branch="ok", python_callable=ok)
    gated_step = BranchOperator(task_id="gated", fork=fork, branch="gated", python_callable=gated)
    consensus = CoalesceSensor(
        task_id="consensus",
        fork=fork,
        policy="require_all",
        timeout=timedelta(minutes=10),
        tolerated_failures=len(FAILING),
        poke_interval=1,
        deferrable=True,
    )
    fork >> [ok_step, gated_step] >> consensus
