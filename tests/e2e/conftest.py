"""Fixtures of the end-to-end suite: real Airflow deployments shared by the e2e tests.

``airflow_stack`` (session) starts the scheduler, triggerer, dag-processor and api-server on the
suite's PostgreSQL server (``pg_proc``) and stops them at the end; they send the provider's metrics
to ``statsd_listener`` (session), a StatsD server on loopback. ``celery_stack`` (session) is a
second deployment whose default executor is the CeleryExecutor, with two ``airflow celery worker``
processes and a Redis broker of its own (``redis_server``; without ``redis-server`` its tests are
skipped, or fail when ``CI=true``). When an e2e test fails, the tail of every process log and of the
newest task logs is attached to its report; figures a test records with ``record_property("figures",
...)`` are printed in the run's summary.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_harness import AirflowStack, AuditDB, RedisServer
from statsd_listener import StatsdListener

STACK_FIXTURES = ("airflow_stack", "celery_stack")


def _running(stack: AirflowStack) -> Iterator[AirflowStack]:
    """Start ``stack``, yield it, stop it (also when it did not start: its diagnostics fail the test)."""
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


@pytest.fixture(scope="session")
def statsd_listener() -> Iterator[StatsdListener]:
    """The StatsD server of the ``airflow_stack`` deployment (tests/e2e/test_e2e_metrics.py)."""
    listener = StatsdListener()
    yield listener
    listener.close()


@pytest.fixture(scope="session")
def airflow_stack(
    pg_proc: object, tmp_path_factory: pytest.TempPathFactory, statsd_listener: StatsdListener
) -> Iterator[AirflowStack]:
    home = tmp_path_factory.mktemp("airflow-e2e")
    # Airflow's own metrics are left out by its allow list: only the provider's are sent.
    metrics = statsd_listener.airflow_env(allow=r"^elspeth\.")
    yield from _running(AirflowStack(pg=pg_proc, home=Path(home), extra_env=metrics))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis server on a free loopback port, in a directory of its own, stopped at the end."""
    if shutil.which("redis-server") is None:
        reason = "redis-server not found on PATH; install the redis-server OS package (.ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    server = RedisServer(home=Path(tmp_path_factory.mktemp("redis")))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def celery_stack(
    pg_proc: object, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowStack]:
    """CeleryExecutor (default) and LocalExecutor, two Celery workers of two task slots each; the
    LocalExecutor has as many (``parallelism``)."""
    home = tmp_path_factory.mktemp("airflow-e2e-celery")
    stack = AirflowStack(
        pg=pg_proc,
        home=Path(home),
        parallelism=4,
        broker_url=redis_server.url,
        celery_workers=2,
        worker_concurrency=2,
    )
    yield from _running(stack)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.failed and call.when in ("call", "setup"):
        for name in STACK_FIXTURES:
            stack = getattr(item, "funcargs", {}).get(name)
            if stack is not None:
                report.sections.append((f"Airflow process and task logs ({name})", stack.diagnostics()))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        f"{report.nodeid}\n{value}"
        for report in terminalreporter.getreports("passed")
        if report.when == "call"
        for name, value in report.user_properties
        if name == "figures"
    ]
    if lines:
        terminalreporter.write_sep("=", "e2e figures")
        terminalreporter.write_line("\n".join(lines))


@pytest.fixture
def audit(airflow_stack: AirflowStack) -> Iterator[AuditDB]:
    """The audit database of the shared deployment, read as the tests check it."""
    db = AuditDB(airflow_stack.audit_url)
    yield db
    db.dispose()
