"""The provider's metrics from a real deployment (tests/e2e/conftest.py points its processes at a
StatsD server on loopback through ``AIRFLOW__METRICS__*``): the decisions of a deferred coalesce,
all made by its trigger, sent from the triggerer; the fork's rows and the branches' results sent
from their task processes (tests/e2e/dags/e2e_metrics.py)."""

from __future__ import annotations

import json
import re

import pytest
from e2e_harness import AirflowStack, start_run, wait_until
from statsd_listener import Metric, StatsdListener

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(420)]

DAG_ID = "e2e_metrics"
ROWS = 8
FAILED = 2  # the gated branch raises on two rows
DECIDED_IN_TRIGGERER = re.compile(r"rows decided in the triggerer \((\d+) now\)")


def counted(found: list[Metric]) -> dict[tuple[str, str], float]:
    """Counter totals of this DAG's metrics per (name, reason tag or else task_id tag)."""
    totals: dict[tuple[str, str], float] = {}
    for metric in found:
        if metric.kind == "c" and metric.tags.get("dag_id") == DAG_ID:
            key = (metric.name, metric.tags.get("reason") or metric.tags["task_id"])
            totals[key] = totals.get(key, 0) + metric.value
    return totals


def rows_decided_by_the_trigger(stack: AirflowStack, run_id: str) -> int:
    """What the coalesce's trigger logged it decided (its log beside the task's)."""
    decided = 0
    folder = stack.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=consensus"
    for path in folder.glob("*.trigger.*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{") and (found := DECIDED_IN_TRIGGERER.search(json.loads(line)["event"])):
                decided += int(found.group(1))
    return decided


def test_the_triggerer_and_the_task_processes_send_the_provider_metrics(
    airflow_stack: AirflowStack, statsd_listener: StatsdListener
) -> None:
    stack = airflow_stack
    run_id, state = start_run(stack, DAG_ID)

    def ready() -> bool:
        states = stack.task_states(DAG_ID, run_id)
        return states.get("consensus") == "deferred" and states.get("ok") == "success"

    # Released once the coalesce is deferred and ok has answered every row: every row is then decided
    # by the trigger, at gated's answer (no late arrival).
    wait_until("the coalesce to defer and ok to answer", ready, timeout=180)
    (state / "release").touch()
    run = stack.wait_run(DAG_ID, run_id, timeout=240)
    assert run["state"] == "success", stack.task_states(DAG_ID, run_id)
    assert wait_until(
        "the trigger's log of its decisions",
        lambda: rows_decided_by_the_trigger(stack, run_id) == ROWS,
        timeout=60,
    )

    expected = {
        ("fork.rows", "fork"): ROWS,
        ("branch.rows_completed", "ok"): ROWS,
        ("branch.rows_completed", "gated"): ROWS - FAILED,
        ("branch.rows_lost", "error_ValueError"): FAILED,
        # every row was decided by the trigger, so these came from the triggerer
        ("coalesce.rows_merged", "consensus"): ROWS - FAILED,
        ("coalesce.rows_failed", "branch_lost"): FAILED,
    }
    found = statsd_listener.wait_for(
        f"the metrics of {DAG_ID}", lambda got: counted(got) == expected, timeout=60
    )
    ours = [m for m in found if m.tags.get("dag_id") == DAG_ID]
    # every row had ok's arrival before its decision: one latency each
    assert [m.kind for m in ours if m.name == "coalesce.decision_latency"] == ["ms"] * ROWS
    assert {m.tags["policy"] for m in ours if m.name.startswith("coalesce.")} == {"require_all"}
    assert [m.value for m in ours if m.name == "coalesce.rows_undecided"][-1] == 0
