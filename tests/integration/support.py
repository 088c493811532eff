"""Helpers of the dag.test() integration suite (fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
DAGS_DIR = HERE / "dags"
INVALID_DAGS_DIR = HERE / "invalid_dags"
DAG_MODULE_NAME = "elspeth_it_dags"
BUNDLE_NAME = "elspeth-integration-dags"
# The DAG files under dags/ build only the DAGs named here (comma-separated), all when it is unset:
# dag.test() re-parses the folder before each run, which then builds one DAG, not the whole suite.
ONLY_ENV = "ELSPETH_IT_DAGS"


def selected(dag_ids: Iterable[str]) -> list[str]:
    """The ``dag_ids`` a parse of a DAG file under dags/ builds (see ``ONLY_ENV``), in their order."""
    only = os.environ.get(ONLY_ENV)
    if only is None:
        return list(dag_ids)
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    return [dag_id for dag_id in dag_ids if dag_id in wanted]


def integration_dag(dag_id: str) -> Any:
    """The DAG the integration DAG files build their scenarios in: unscheduled, tagged, and no task
    retries unless a task sets its own."""
    from datetime import datetime

    from airflow.sdk import DAG

    return DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        tags=["elspeth", "integration-test"],
        default_args={"retries": 0},
    )


def dag_module() -> ModuleType:
    """The test DAG factory module (tests/integration/dags/elspeth_it_dags.py), imported once."""
    module = sys.modules.get(DAG_MODULE_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(DAG_MODULE_NAME, DAGS_DIR / f"{DAG_MODULE_NAME}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[DAG_MODULE_NAME] = module
        spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def patched_env(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class RssGrowth:
    """How far this process's resident memory rose above where it was when the block began.

    A daemon thread samples the RSS every few milliseconds; the kernel's high-water mark
    (``ru_maxrss``) catches a spike between samples whenever it sets a new peak for the process.
    """

    SAMPLE_SECONDS = 0.005

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.start = self._process.memory_info().rss
        self._peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        self.peak = self.start
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(self.SAMPLE_SECONDS):
            self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        """Bytes of the peak above the start."""
        high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = max(self.peak, high_water if high_water > self._peak_before else 0)
        return max(0, peak - self.start)

    def __enter__(self) -> RssGrowth:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _bundle_config(name: str, folder: Path) -> str:
    return json.dumps(
        [
            {
                "name": name,
                "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                "kwargs": {"path": str(folder), "refresh_interval": 0},
            }
        ]
    )


def run_env(
    dag_id: str, audit_url: str, *, folder: Path = DAGS_DIR, bundle: str = BUNDLE_NAME
) -> dict[str, str]:
    """The environment of one run: its DAG folder (one DAG parsed) and its audit store.

    :param folder: the DAGs folder (default the suite's dags/; the repository's dags/ for the examples),
        a bundle named ``bundle``.
    """
    return {
        "AIRFLOW__CORE__DAGS_FOLDER": str(folder),
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": _bundle_config(bundle, folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT": json.dumps(
            {"conn_type": "elspeth", "extra": {"sqlalchemy_url": audit_url}}
        ),
        ONLY_ENV: dag_id,
    }


def clear_and_drive(
    dag: Any, dag_run: Any, task_ids: list[str], *, downstream: bool, first: tuple[str, ...] = ()
) -> Any:
    """Clear ``task_ids`` (and their downstream tasks) of a finished DagRun, then run it again.

    The loop is ``DAG.test()``'s (airflow/sdk/definitions/dag.py) minus the part that deletes and
    re-creates the DagRun. Task instances scheduled together run in task id order, those named in
    ``first`` before the others (dag.test() runs them in set order, i.e. arbitrarily).
    """
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance, clear_task_instances
    from airflow.sdk import DagRunState, timezone
    from airflow.sdk.definitions.dag import FINISHED_STATES, _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    wanted = set(task_ids)
    if downstream:
        for task_id in task_ids:
            wanted |= {t.task_id for t in dag.get_task(task_id).get_flat_relatives(upstream=False)}
    session = settings.Session()
    try:
        tis = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == dag.dag_id,
                TaskInstance.run_id == dag_run.run_id,
                TaskInstance.task_id.in_(sorted(wanted)),
            )
        ).all()
        assert {ti.task_id for ti in tis} == wanted, f"task instances to clear: {wanted}"
        clear_task_instances(list(tis), session, dag_run_state=DagRunState.RUNNING)
        session.commit()

        scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
        dr = session.scalar(
            select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == dag_run.run_id)
        )
        assert dr is not None
        dr.dag = scheduler_dag
        deadline = time.monotonic() + 300
        while dr.state == DagRunState.RUNNING:
            assert time.monotonic() < deadline, "re-driven DagRun did not finish"
            session.expire_all()
            schedulable, _ = dr.update_state(session=session)
            for ti in schedulable:
                if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                    ti.try_number += 1
                ti.state = TaskInstanceState.SCHEDULED
                ti.scheduled_dttm = timezone.utcnow()
            session.commit()
            all_tis = set(dr.get_task_instances(session=session))
            scheduled = {ti for ti in all_tis if ti.state == TaskInstanceState.SCHEDULED}
            if not scheduled and {ti for ti in all_tis if ti.state not in FINISHED_STATES}:
                time.sleep(0.5)
            for ti in sorted(scheduled, key=lambda ti: (ti.task_id not in first, ti.task_id, ti.map_index)):
                # dag.test() logs a task's exception and goes on too: the TI's state says it failed.
                with contextlib.suppress(Exception):
                    _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
        return dr
    finally:
        session.close()
