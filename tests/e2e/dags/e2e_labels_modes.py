"""E2E: the same events in the coalesce's three waiting modes (poke, reschedule, deferrable) on the
real scheduler, so their labels can be compared (tests/e2e/test_e2e_labels_modes.py).

One DAG per mode, ``e2e_labels__<mode>``; six rows; policy ``first``, so a row is decided at its
first arrival. The order of events is fixed by files, not by timing:

* ``late`` starts all six rows at once (``concurrency=6``), marks each started, and returns only once
  the test drops ``release``: every answer comes after its row was decided (a late arrival);
* ``fast`` answers once ``late`` has started all six rows: the rows are decided with it;
* ``skipper`` starts only after ``release`` (its gate sensor waits for the file), when every row is
  already decided: it skips them all (``skipped_decided``).

The deadline is far away: no decision here depends on it. The waits are bounded, so a forgotten
test cannot hold a worker for ever.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.sensors.python import PythonSensor
from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator
from airflow_elspeth.sensors.coalesce import RESCHEDULE_RACE_POKE_SECONDS

MODES = ("poke", "reschedule", "deferrable")
ROWS = [{"id": f"row-{n}", "n": n} for n in range(6)]
WAIT_LIMIT_SECONDS = 240


def dag_id(mode: str) -> str:
    return f"e2e_labels__{mode}"


def state_dir(mode: str) -> Path:
    return Path(os.environ.get("ELSPETH_E2E_STATE", "/tmp")) / dag_id(mode)


def _wait_for(done: Callable[[], bool]) -> None:
    give_up = time.monotonic() + WAIT_LIMIT_SECONDS
    while not done() and time.monotonic() < give_up:
        time.sleep(0.2)


def _build(mode: str) -> DAG:
    state = state_dir(mode)

    def late(row: dict) -> dict:
        state.mkdir(parents=True, exist_ok=True)
        (state / f"started-{row['id']}").touch()
        _wait_for((state / "release").exists)
        return {"late": row["n"]}

    def fast(row: dict) -> dict:
        _wait_for(lambda: len(list(state.glob("started-*"))) == len(ROWS))
        return {"fast": row["n"]}

    def skipper(row: dict) -> dict:
        return {"skipper": row["n"]}

    with DAG(
        dag_id=dag_id(mode),
        schedule=None,
        start_date=datetime(2025, 1, 1),
        catchup=False,
        tags=["e2e"],
    ) as dag:
        fork = ForkOperator(task_id="fork", rows=ROWS, row_key="id", branches=["fast", "late", "skipper"])
        late_step = BranchOperator(
            task_id="late", fork=fork, branch="late", python_callable=late, concurrency=len(ROWS)
        )
        fast_step = BranchOperator(task_id="fast", fork=fork, branch="fast", python_callable=fast)
        # Poke mode: a reschedule-mode sensor can be failed by Airflow's scheduler on a stale
        # executor event (see RESCHEDULE_RACE_POKE_SECONDS in airflow_elspeth/sensors/coalesce.py),
        # which would turn the skips into losses.
        gate = PythonSensor(
            task_id="released",
            python_callable=(state / "release").exists,
            mode="poke",
            poke_interval=1,
            timeout=WAIT_LIMIT_SECONDS,
        )
        skipper_step = BranchOperator(task_id="skipper", fork=fork, branch="skipper", python_callable=skipper)
        join = CoalesceSensor(
            task_id="join",
            fork=fork,
            policy="first",
            merge="union",
            timeout=timedelta(minutes=10),
            # Reschedule mode at the interval the sensor recommends for it (same file).
            poke_interval=RESCHEDULE_RACE_POKE_SECONDS if mode == "reschedule" else 2,
            mode="reschedule" if mode == "deferrable" else mode,
            deferrable=mode == "deferrable",
        )
        fork >> [late_step, fast_step, gate]
        gate >> skipper_step
        [late_step, fast_step, skipper_step] >> join
    return dag


for _mode in MODES:
    globals()[dag_id(_mode)] = _build(_mode)
