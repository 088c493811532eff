"""Under dag.test() (triggers run inline, blocking every other task) the deferrable coalesce still
merges arrivals of branches that run after it started, instead of reporting them missing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DAGS = Path(__file__).resolve().parent / "dag_test_dags"


@pytest.fixture
def inline_env(audit_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    bundle = [
        {
            "name": "elspeth-e2e-inline",
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
            "kwargs": {"path": str(DAGS), "refresh_interval": 0},
        }
    ]
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS))
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bundle))
    monkeypatch.setenv(
        "AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT",
        json.dumps({"conn_type": "elspeth", "extra": {"sqlalchemy_url": audit_url}}),
    )
    yield audit_url


def _load_dag(module_name: str = "e2e_inline_deferrable", name: str = "dag"):  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, DAGS / f"{module_name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def test_deferrable_coalesce_started_before_its_branches_merges_their_arrivals(
    airflow_metadata: str, inline_env: str
) -> None:
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskreschedule import TaskReschedule
    from sqlalchemy import select, text

    from airflow_elspeth.audit.engine import engine_for_url

    dag = _load_dag()
    dag_run = dag.test()
    assert str(dag_run.state) == "success"

    session = settings.Session()
    try:
        tis = {
            ti.task_id: ti
            for ti in session.scalars(
                select(TaskInstance).where(
                    TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == dag_run.run_id
                )
            )
        }
        looks = session.scalars(
            select(TaskReschedule)
            .where(TaskReschedule.ti_id == tis["consensus"].id)
            .order_by(TaskReschedule.id)
        ).all()
    finally:
        session.close()
    assert {task_id: str(ti.state) for task_id, ti in tis.items()} == dict.fromkeys(
        ("fork", "gate_1", "gate_2", "a", "b", "consensus", "consensus_finalize"), "success"
    )
    # It looked (and rescheduled, freeing the loop) after the fork completed and before any branch ran.
    branches_started = min(tis["a"].start_date, tis["b"].start_date)
    early = [r for r in looks if tis["fork"].end_date <= r.start_date < branches_started]
    timeline = {
        task_id: (ti.start_date.isoformat(), ti.end_date.isoformat()) for task_id, ti in sorted(tis.items())
    }
    assert early, (
        f"the coalesce never looked between the fork and the branches: looks "
        f"{[(r.start_date.isoformat(), r.end_date.isoformat()) for r in looks]}, tasks {timeline}"
    )

    engine = engine_for_url(inline_env)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT d.decision, d.failure_reason, d.consumed, d.missing_json FROM coalesce_decisions d "
                "JOIN runs r ON r.run_id = d.run_id WHERE r.dag_id = :dag AND r.airflow_run_id = :run"
            ),
            {"dag": dag.dag_id, "run": dag_run.run_id},
        ).all()
    assert len(rows) == 5
    for decision, reason, consumed, missing in rows:
        assert (decision, reason) == ("merged", None)
        assert sorted(json.loads(consumed)) == ["a", "b"] and json.loads(missing) == {}


@pytest.mark.parametrize(("name", "ended"), [("fork_wait", "failed"), ("fork_wait_soft", "skipped")])
def test_a_deferrable_coalesce_whose_fork_does_not_complete_ends_at_fork_wait_timeout(
    airflow_metadata: str, inline_env: str, name: str, ended: str
) -> None:
    """Failed with AirflowSensorTimeout (no retry although it has retries), or skipped with
    soft_fail; the fork completing afterwards leaves nothing open: its finalizer closes every row."""
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select, text

    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.read.records import AuditRun
    from airflow_elspeth.audit.read.verify import verify_run

    dag = _load_dag("e2e_inline_fork_wait", name)
    dag_run = dag.test()
    assert str(dag_run.state) == ("failed" if ended == "failed" else "success")
    session = settings.Session()
    try:
        tis = {
            ti.task_id: ti
            for ti in session.scalars(
                select(TaskInstance).where(
                    TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == dag_run.run_id
                )
            )
        }
    finally:
        session.close()
    states = {task_id: str(ti.state) for task_id, ti in tis.items()}
    assert states == {
        **dict.fromkeys(("fork_gate", "fork", "branch_gate", "a", "b", "consensus_finalize"), "success"),
        "consensus": ended,
    }
    assert tis["consensus"].try_number == 1 and tis["consensus"].max_tries == 2  # not retried
    # it gave up at fork_wait_timeout (3 s), not at Airflow's sensor timeout (3 s + 20 s + 10 min)
    waited = tis["consensus"].end_date - dag_run.start_date
    assert timedelta(seconds=3) <= waited < timedelta(minutes=10), waited

    engine = engine_for_url(inline_env)
    with engine.connect() as conn:
        run = (
            conn.execute(
                text("SELECT * FROM runs WHERE dag_id = :dag AND airflow_run_id = :run"),
                {"dag": dag.dag_id, "run": dag_run.run_id},
            )
            .mappings()
            .one()
        )
        decided = conn.execute(
            text("SELECT decision, failure_reason FROM coalesce_decisions WHERE run_id = :r"),
            {"r": run["run_id"]},
        ).all()
    # the finalizer closed every row before the branches answered (their answers recorded late)
    assert [tuple(d) for d in decided] == [("failed", f"coalesce_task_{ended}")] * 3
    assert verify_run(engine, AuditRun.from_row(run)) == []
