"""The provider's metrics reach a StatsD server as Airflow sends its own: a real DAG under
``dag.test()``, in a process of its own configured only through ``AIRFLOW__METRICS__*`` (Airflow
initialises its metrics from the configuration once per process), sending to a UDP socket on
loopback that this test owns. The translation itself: tests/unit/test_metrics.py; the deferred
coalesce's trigger in a real triggerer: tests/e2e/test_e2e_metrics.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from statsd_listener import Metric, StatsdListener

from airflow_elspeth.audit.engine import engine_for_url

from .support import run_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TESTS_DIR = Path(__file__).resolve().parents[1]
ROOT = TESTS_DIR.parent
# require_all over branches a, b and c of rows r0..r5; a's callable raises on r1 and r4 (tolerated).
DAG_ID = "elspeth_it_require_all_row_errors"
RUN_DAG = f"""
from integration.support import dag_module

module = dag_module()
dag_run = module.build_dag(module.SCENARIOS[{DAG_ID!r}]).test()
print("STATE", dag_run.state)
"""
PACKET_WAIT_SECONDS = 30.0
EXPECTED = {
    "fork.rows",
    "branch.rows_completed",
    "branch.rows_lost",
    "coalesce.rows_merged",
    "coalesce.rows_failed",
    "coalesce.decision_latency",
    "coalesce.rows_undecided",
}


@pytest.fixture
def statsd() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()


def totals(found: list[Metric], kind: str) -> dict[tuple[str, str], float]:
    """Summed values of one metric type per (name, reason tag or else task_id tag)."""
    summed: dict[tuple[str, str], float] = {}
    for metric in found:
        if metric.kind == kind:
            key = (metric.name, metric.tags.get("reason") or metric.tags["task_id"])
            summed[key] = summed.get(key, 0) + metric.value
    return summed


# One backend: what is sent does not depend on the audit store's (tests/unit/test_metrics.py runs
# the passes themselves).
def test_a_dag_run_sends_its_decisions_losses_and_rows_to_statsd(
    airflow_metadata: str, sqlite_url: str, statsd: StatsdListener
) -> None:
    env = {
        **os.environ,
        **run_env(DAG_ID, sqlite_url),
        **statsd.airflow_env(allow=r"^elspeth\."),  # Airflow sends only the provider's metrics
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS_DIR)]),
    }
    done = subprocess.run(
        [sys.executable, "-c", RUN_DAG], env=env, capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert "STATE success" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]

    # the sender has ended: what it sent is here (or lost, which fails the test)
    found = statsd.wait_for(
        f"{sorted(EXPECTED)}", lambda got: {m.name for m in got} >= EXPECTED, timeout=PACKET_WAIT_SECONDS
    )
    counted = totals(found, "c")
    # Late arrivals (b and c answering r1 or r4 after a's loss failed it) and skips (b and c reaching
    # a row already decided) depend on the order dag.test() runs the branches in: the late ones
    # counted, by the pass that recorded them or the branch that wrote them, are the stored ones.
    with engine_for_url(sqlite_url).connect() as conn:
        stored_late = conn.execute(
            text("SELECT count(*) FROM token_outcomes WHERE outcome = 'late' AND is_terminal")
        ).scalar_one()
    late = counted.pop(("coalesce.late_arrivals", "coalesce"), 0)
    late += sum(counted.pop(("branch.rows_late", step), 0) for step in ("ask_a", "ask_b", "ask_c"))
    assert late == stored_late
    for step in ("ask_b", "ask_c"):
        done_rows = counted.pop(("branch.rows_completed", step)) + counted.pop(
            ("branch.rows_skipped", step), 0
        )
        assert done_rows == 6, step
    assert counted == {
        ("fork.rows", "fork"): 6,
        ("branch.rows_completed", "ask_a"): 4,
        ("branch.rows_lost", "error_ValueError"): 2,
        ("coalesce.rows_merged", "coalesce"): 4,
        ("coalesce.rows_failed", "branch_lost"): 2,
    }
    coalesce_tags = {"dag_id": DAG_ID, "task_id": "coalesce", "policy": "require_all"}
    for metric in found:
        if metric.name.startswith("coalesce."):
            assert {k: v for k, v in metric.tags.items() if k != "reason"} == coalesce_tags, metric
    # one latency per decided row with an arrival before its decision (a failed row may have none)
    with engine_for_url(sqlite_url).connect() as conn:
        arrived = conn.execute(
            text("SELECT count(wait_from_first_arrival_ms) FROM coalesce_decisions")
        ).scalar_one()
    assert [m.kind for m in found if m.name == "coalesce.decision_latency"] == ["ms"] * arrived
    assert arrived >= 4  # the merged rows
    # the last pass (the finalizer's) left none open
    undecided = [m.value for m in found if m.name == "coalesce.rows_undecided"]
    assert undecided[-1] == 0
