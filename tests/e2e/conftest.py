"""Fixtures of the end-to-end suite: one real Airflow deployment shared by the e2e tests.

``airflow_stack`` (session) starts the scheduler, triggerer, dag-processor and api-server on the
suite's PostgreSQL server (``pg_proc``) and stops them at the end. When an e2e test fails, the tail
of every process log and of the newest task logs is attached to its report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_harness import AirflowStack


@pytest.fixture(scope="session")
def airflow_stack(pg_proc: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowStack]:
    home = tmp_path_factory.mktemp("airflow-e2e")
    stack = AirflowStack(pg=pg_proc, home=Path(home))
    try:
        stack.start()
    except BaseException:
        diagnostics = stack.diagnostics()
        stack.stop()
        pytest.fail(f"the Airflow deployment did not start\n{diagnostics}")
    try:
        yield stack
    finally:
        stack.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.failed and call.when in ("call", "setup"):
        stack = getattr(item, "funcargs", {}).get("airflow_stack")
        if stack is not None:
            report.sections.append(("Airflow process and task logs", stack.diagnostics()))
    return report
