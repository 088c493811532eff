"""E2E (tests/e2e/test_e2e_fencing.py): a branch task that Airflow declared ended while its process
still runs, and writes after the coalesce recorded its loss and decided.

``slow`` answers a row every 0.6 s (``batch_size=1``: each answer is its own write, so it is in
the store when the next row starts) and holds row ``HOLD_AT``: it writes ``holding`` under
``$ELSPETH_E2E_STATE/<dag_id>`` (its content: the path of the ``airflow_elspeth`` package the task
imported, so the test knows which checkout ran) and waits for ``release`` (bounded). ``quick``
answers every row at once. ``slow`` has no retries, so the try declared ended is its last; the
coalesce is ``require_all`` with a 10-minute deadline, so only the task's loss can decide rows
``HOLD_AT`` onwards before the test lets ``slow`` answer.

* ``e2e_fencing_marked_deferrable`` / ``e2e_fencing_marked_reschedule``: the test marks ``slow``
  failed through the REST API while it holds its row; the coalesce waits deferred (polling every
  2 s), or rescheduling (every 10 s).
* ``e2e_fencing_paused``: the test pauses ``slow``'s process and its supervisor; the scheduler fails
  the task by its heartbeat timeout; the coalesce waits deferred.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG

import airflow_elspeth
from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator
from airflow_elspeth.sensors.coalesce import RESCHEDULE_RACE_POKE_SECONDS

STATE_ROOT = Path(os.environ.get("ELSPETH_E2E_STATE", "/tmp"))
GATE_LIMIT_SECONDS = 300
ROWS = [{"id": f"row-{n}", "n": n} for n in range(6)]
HOLD_AT = 2  # slow answers rows 0-1, then holds row 2 until "release"
ROW_SECONDS = 0.6


def quick(row: dict) -> dict:
    return {"quick": row["n"]}


def make_slow(dag_id: str):
    state = STATE_ROOT / dag_id

    def slow(row: dict) -> dict:
        if row["n"] == HOLD_AT:
            state.mkdir(parents=True, exist_ok=True)
            (state / "holding").write_text(str(Path(airflow_elspeth.__file__).resolve()))
            give_up = time.monotonic() + GATE_LIMIT_SECONDS
            while not (state / "release").exists() and time.monotonic() < give_up:
                time.sleep(0.1)
        time.sleep(ROW_SECONDS)
        return {"slow": row["n"] * 10}

    return slow


def build(dag_id: str, **waiting) -> DAG:
    with DAG(
        dag_id=dag_id, schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["e2e"]
    ) as dag:
        fork = ForkOperator(task_id="fork", rows=ROWS, row_key="id", branches=["quick", "slow"])
        quick_task = BranchOperator(task_id="quick", fork=fork, branch="quick", python_callable=quick)
        slow_task = BranchOperator(
            task_id="slow",
            fork=fork,
            branch="slow",
            python_callable=make_slow(dag_id),
            batch_size=1,
            retries=0,
        )
        join = CoalesceSensor(
            task_id="join",
            fork=fork,
            policy="require_all",
            merge="union",
            timeout=timedelta(minutes=10),
            retry_delay=timedelta(seconds=2),
            **waiting,
        )
        fork >> [quick_task, slow_task] >> join
    return dag


marked_deferrable = build("e2e_fencing_marked_deferrable", deferrable=True, poke_interval=2)
# Shorter pokes let Airflow's scheduler fail a rescheduling sensor on a stale event (the sensor warns).
marked_reschedule = build(
    "e2e_fencing_marked_reschedule", mode="reschedule", poke_interval=RESCHEDULE_RACE_POKE_SECONDS
)
paused = build("e2e_fencing_paused", deferrable=True, poke_interval=2)
