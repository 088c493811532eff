"""Fixtures of the dag.test() integration suite.

* ``airflow_metadata`` (session, from tests/conftest.py): the suite's metadata DB, migrated once.
* ``run_dag(dag, audit_url)``: points the audit store at ``audit_url`` (an ``elspeth``
  connection in ``AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT``), runs ``dag.test()``, returns the DagRun.
  The environment is restored afterwards, so other suites keep the embedded default.
* ``rerun(dag, dag_run, task_ids, audit_url, downstream=...)``: clears task instances of an existing
  DagRun the way the UI's "Clear" does (``clear_task_instances``: try numbers go on, XComs of the
  cleared tries are deleted, ``clear_number`` + 1) and drives the run again with ``dag.test()``'s
  own loop; ``dag.test()`` itself would delete the DagRun and start from scratch.

Audit databases come from the shared ``audit_url`` fixture (SQLite file or a fresh PostgreSQL
database per test, tests/conftest.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from .support import clear_and_drive, patched_env, run_env


@pytest.fixture
def run_dag(airflow_metadata: str) -> Any:
    """``run_dag(dag, audit_url, **test_kwargs)`` -> the DagRun of ``dag.test()``."""

    def run(dag: Any, audit_url: str, **kwargs: Any) -> Any:
        with patched_env(**run_env(dag.dag_id, audit_url)):
            return dag.test(**kwargs)

    return run


@pytest.fixture
def rerun(airflow_metadata: str) -> Any:
    """``rerun(dag, dag_run, task_ids, audit_url, downstream=False, first=())`` -> the DagRun, driven
    again (see :func:`support.clear_and_drive`)."""

    def run(
        dag: Any,
        dag_run: Any,
        task_ids: list[str],
        audit_url: str,
        *,
        downstream: bool = False,
        first: tuple[str, ...] = (),
    ) -> Any:
        with patched_env(**run_env(dag.dag_id, audit_url)):
            return clear_and_drive(dag, dag_run, task_ids, downstream=downstream, first=first)

    return run
