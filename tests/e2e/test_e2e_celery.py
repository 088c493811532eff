"""Scale-out on the CeleryExecutor: a fork of 2,000 rows in chunks of 400, three branches each mapped
over the fork's chunks (15 task instances) spread over two Celery workers, a deferrable coalesce in
the triggerer, the PostgreSQL audit store; then the same DAG on the same deployment's LocalExecutor.

2,000 rows keep the test short: the coalesce's summary can take a minute at 5,000 rows when it runs
before PostgreSQL has analyzed the run's new rows (benchmarks/RESULTS.md, "Scale-out"); the number of
task instances, what the executors are tested on, is the same as with 5,000 rows in chunks of 1,000.

Asserts what must hold (the runs succeed, the mapped branch tasks ran on both workers, every row is
decided, ``airflow-elspeth verify`` is clean); the throughput of both runs is only printed (in the
run's summary, tests/e2e/conftest.py): this machine's speed is not under test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_harness import AirflowStack, AuditDB, run_scale_dag, verify_clean

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(480)]

# tests/e2e/dags/e2e_scale.py's defaults (ELSPETH_SCALE_ROWS, ELSPETH_SCALE_CHUNK)
ROWS = 2000
CHUNK = 400
BRANCHES = ("alpha", "beta", "gamma")


@pytest.fixture
def audit(celery_stack: AirflowStack) -> Iterator[AuditDB]:
    db = AuditDB(celery_stack.audit_url)
    yield db
    db.dispose()


def _check_run(stack: AirflowStack, audit: AuditDB, run: dict[str, Any]) -> None:
    assert run["state"] == "success", run
    assert run["mapped_task_instances"] == len(BRANCHES) * ROWS // CHUNK, run
    audit_run = audit.run_of(run["dag_id"], run["run_id"])
    assert audit_run["status"] == "completed", audit_run
    decisions = audit.all(
        "SELECT decision, count(*) AS n FROM coalesce_decisions WHERE run_id = :run GROUP BY decision",
        run=audit_run["run_id"],
    )
    assert {d["decision"]: d["n"] for d in decisions} == {"merged": ROWS}
    verify_clean(stack, audit, "--run-id", audit_run["run_id"])


def test_branches_mapped_over_chunks_run_on_both_celery_workers_and_verify_clean(
    celery_stack: AirflowStack, audit: AuditDB, record_property: pytest.RecordProperty
) -> None:
    stack = celery_stack
    celery = run_scale_dag(stack, "celery", ROWS, timeout=360)
    _check_run(stack, audit, celery)
    # Each worker reports its own name as the hostname of the task instances it ran.
    assert set(celery["hosts"]) == set(stack.worker_names), celery["hosts"]

    local = run_scale_dag(stack, "local", ROWS, timeout=360)
    _check_run(stack, audit, local)
    assert not set(local["hosts"]) & set(stack.worker_names), local["hosts"]  # not on a Celery worker

    lines = [
        f"{run['executor']:>6}: {run['rows_per_second']:7.1f} rows/s, {run['wall_seconds']:.1f} s wall, "
        f"phases {json.dumps(run['phases'])}, mapped TIs per host {json.dumps(run['hosts'])}"
        for run in (celery, local)
    ]
    figures = f"{ROWS} rows in chunks of {CHUNK}, 3 mapped branches, deferrable coalesce:\n" + "\n".join(
        lines
    )
    print(figures)
    record_property("figures", figures)
