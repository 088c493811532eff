"""Fetch each package from whichever mirror answers first.

``first`` merges the first arrival and records the others as late or missing; ``select`` would keep
one named branch instead. The EU mirror is slow for large packages, and each mirror has lost some
files (``FileNotFoundError``): the US mirror every package whose size is a multiple of 4 MB, the EU
mirror those of a multiple of 10 MB. A package fails only when every mirror lost it: ``pkg-15``
(160 MB) fails ``all_branches_lost``, each mirror's error recorded, and the coalesce tolerates that
one failure (``tolerated_failures=1``); the other 19 packages merge.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

PACKAGES = [{"package": f"pkg-{n:02d}", "size_mb": 5 + (n * 37) % 200} for n in range(1, 21)]


def fetch_from(mirror: str, missing_every: int, seconds_per_100mb: float):
    def fetch(row: dict) -> dict:
        if row["size_mb"] % missing_every == 0:
            raise FileNotFoundError(f"{mirror}: {row['package']} not found")
        time.sleep(seconds_per_100mb * row["size_mb"] / 100)
        return {"mirror": mirror, "sha256": f"{row['package']}-digest", "size_mb": row["size_mb"]}

    fetch.__name__ = f"fetch_{mirror}"
    return fetch


with DAG(
    dag_id="example_first_mirror",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["elspeth", "example"],
    doc_md=__doc__,
) as dag:
    fork = ForkOperator(task_id="fork", rows=PACKAGES, row_key="package", branches=["us", "eu"])
    us = BranchOperator(task_id="mirror_us", fork=fork, branch="us", python_callable=fetch_from("us", 4, 0.0))
    eu = BranchOperator(
        task_id="mirror_eu", fork=fork, branch="eu", python_callable=fetch_from("eu", 10, 0.01)
    )
    fetched = CoalesceSensor(
        task_id="fetched",
        fork=fork,
        policy="first",
        merge="union",
        timeout=timedelta(minutes=5),
        tolerated_failures=1,
    )
    fork >> [us, eu] >> fetched
