"""E2E fault matrix (tests/e2e/test_e2e_faults.py): the coalesce killed, marked failed, the audit
database unreachable, a branch commit held across the deadline, a fork whose source breaks.

Every gate is a file under ``$ELSPETH_E2E_STATE/<dag_id>`` that the test creates; every wait on a
gate is bounded, so a test that forgets to open one cannot keep a worker forever.

* ``e2e_faults_coalesce_killed`` / ``_killed_no_retry`` / ``_marked_failed``: ``quick`` delivers
  every row, ``slow`` rows 0-3 and then waits on row 4 for ``release``; the coalesce
  (``require_all``, poke mode, 10-minute deadline) merges rows 0-3 and waits for the rest. Retries:
  the coalesce's default (2), none, the default.
* ``e2e_faults_audit_outage``: ``steady`` writes a row every 0.5 s, ``gated`` waits on its first
  row for ``release``; two coalesces of the same branches, one poking, one deferred. The branches
  retry (an unreachable audit store fails their try).
* ``e2e_faults_held_commit``: ``fast`` delivers every row at once, ``slow`` a row a second;
  ``best_effort`` with a 40 s deadline, so ``slow`` is writing when the deadline passes.
* ``e2e_faults_fork_raises``: the fork's source yields two chunks (one fork write), waits for
  ``raise``, then raises.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator
from airflow_elspeth.operators.fork import FORK_ROWS_PER_WRITE

STATE_ROOT = Path(os.environ.get("ELSPETH_E2E_STATE", "/tmp"))
GATE_LIMIT_SECONDS = 300
HOLD_AT = 4  # e2e_faults_coalesce_*: slow delivers rows 0-3, then waits for "release"
WAIT_ROWS = [{"id": f"row-{n}", "n": n} for n in range(10)]
OUTAGE_ROWS = [{"id": f"row-{n}", "n": n} for n in range(24)]
HELD_ROWS = [{"id": f"row-{n:02d}", "n": n} for n in range(60)]
HELD_DEADLINE = timedelta(seconds=40)
# e2e_faults_fork_raises: two chunks make one fork write (it writes FORK_ROWS_PER_WRITE rows a
# transaction), so both are in the store before the source waits and then raises.
FORK_CHUNK = FORK_ROWS_PER_WRITE // 2


def wait_for(dag_id: str, gate: str) -> None:
    """Block until the test creates ``<state>/<dag_id>/<gate>`` (bounded)."""
    path = STATE_ROOT / dag_id / gate
    give_up = time.monotonic() + GATE_LIMIT_SECONDS
    while not path.exists() and time.monotonic() < give_up:
        time.sleep(0.2)


def quick(row: dict) -> dict:
    return {"quick": row["n"]}


def make_held_back(dag_id: str):
    def slow(row: dict) -> dict:
        if row["n"] >= HOLD_AT:
            wait_for(dag_id, "release")
        time.sleep(0.05)
        return {"slow": row["n"] * 10}

    return slow


def build_waiting(dag_id: str, **coalesce_kwargs) -> DAG:
    with DAG(
        dag_id=dag_id, schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["e2e"]
    ) as dag:
        fork = ForkOperator(task_id="fork", rows=WAIT_ROWS, row_key="id", branches=["quick", "slow"])
        quick_task = BranchOperator(task_id="quick", fork=fork, branch="quick", python_callable=quick)
        slow_task = BranchOperator(
            task_id="slow", fork=fork, branch="slow", python_callable=make_held_back(dag_id), batch_size=1
        )
        join = CoalesceSensor(
            task_id="join",
            fork=fork,
            policy="require_all",
            merge="union",
            timeout=timedelta(minutes=10),
            mode="poke",
            poke_interval=2,
            retry_delay=timedelta(seconds=2),
            **coalesce_kwargs,
        )
        fork >> [quick_task, slow_task] >> join
    return dag


coalesce_killed = build_waiting("e2e_faults_coalesce_killed")
coalesce_killed_no_retry = build_waiting("e2e_faults_coalesce_killed_no_retry", retries=0)
coalesce_marked_failed = build_waiting("e2e_faults_coalesce_marked_failed")


# -- the audit database unreachable ------------------------------------------------------------------

OUTAGE_DAG = "e2e_faults_audit_outage"


def steady(row: dict) -> dict:
    time.sleep(0.5)
    return {"steady": row["n"]}


def gated(row: dict) -> dict:
    wait_for(OUTAGE_DAG, "release")
    return {"gated": row["n"] * 10}


with DAG(
    dag_id=OUTAGE_DAG, schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["e2e"]
) as audit_outage:
    fork = ForkOperator(task_id="fork", rows=OUTAGE_ROWS, row_key="id", branches=["quick", "steady", "gated"])
    retried = {"retries": 8, "retry_delay": timedelta(seconds=3)}
    outage_branches = [
        BranchOperator(task_id="quick", fork=fork, branch="quick", python_callable=quick, **retried),
        BranchOperator(
            task_id="steady", fork=fork, branch="steady", python_callable=steady, batch_size=1, **retried
        ),
        BranchOperator(task_id="gated", fork=fork, branch="gated", python_callable=gated, **retried),
    ]
    join_poke = CoalesceSensor(
        task_id="join_poke",
        fork=fork,
        policy="require_all",
        merge="union",
        timeout=timedelta(minutes=10),
        mode="poke",
        poke_interval=2,
        retry_delay=timedelta(seconds=2),
    )
    join_deferred = CoalesceSensor(
        task_id="join_deferred",
        fork=fork,
        policy="require_all",
        merge="union",
        timeout=timedelta(minutes=10),
        deferrable=True,
        poke_interval=2,
        retry_delay=timedelta(seconds=2),
    )
    fork >> outage_branches
    outage_branches >> join_poke
    outage_branches >> join_deferred


# -- a branch commit held across the deadline --------------------------------------------------------


def slow_steady(row: dict) -> dict:
    time.sleep(1.0)
    return {"slow": row["n"]}


with DAG(
    dag_id="e2e_faults_held_commit",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["e2e"],
) as held_commit:
    fork = ForkOperator(task_id="fork", rows=HELD_ROWS, row_key="id", branches=["fast", "slow"])
    fast_task = BranchOperator(task_id="fast", fork=fork, branch="fast", python_callable=quick)
    slow_task = BranchOperator(
        task_id="slow", fork=fork, branch="slow", python_callable=slow_steady, batch_size=1
    )
    join = CoalesceSensor(
        task_id="join",
        fork=fork,
        policy="best_effort",
        merge="union",
        timeout=HELD_DEADLINE,
        mode="poke",
        poke_interval=1,
        retry_delay=timedelta(seconds=2),
    )
    fork >> [fast_task, slow_task] >> join


# -- a fork whose source breaks part-way -------------------------------------------------------------

FORK_RAISES_DAG = "e2e_faults_fork_raises"


class SourceBroke(RuntimeError):
    """What the source raises after its second chunk."""


def breaking_source() -> Iterator[dict]:
    for n in range(2 * FORK_CHUNK):
        yield {"id": f"row-{n}", "n": n}
    wait_for(FORK_RAISES_DAG, "raise")  # the test first sees both chunks written
    raise SourceBroke("source connection reset after 2 chunks")


with DAG(
    dag_id=FORK_RAISES_DAG,
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["e2e"],
) as fork_raises:
    fork = ForkOperator(
        task_id="fork",
        rows=breaking_source,
        row_key="id",
        branches=["left", "right"],
        chunk_size=FORK_CHUNK,
        retries=0,
    )
    left = BranchOperator(task_id="left", fork=fork, branch="left", python_callable=quick)
    right = BranchOperator(task_id="right", fork=fork, branch="right", python_callable=quick)
    join = CoalesceSensor(
        task_id="join",
        fork=fork,
        policy="best_effort",
        merge="union",
        timeout=timedelta(minutes=5),
        mode="poke",
        poke_interval=2,
        retry_delay=timedelta(seconds=2),
    )
    fork >> [left, right] >> join
