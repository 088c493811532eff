"""Fixtures of the end-to-end suite: real Airflow deployments shared by the e2e tests.

``airflow_stack`` starts the scheduler, triggerer, dag-processor and api-server on the suite's
PostgreSQL server (``pg_proc``) for the first test that needs it, shares it with the tests after it,
and stops it after the last one (``Deployment``); it sends the provider's metrics to
``statsd_listener`` (session), a StatsD server on loopback. ``celery_stack`` is a second deployment whose
default executor is the CeleryExecutor, with two ``airflow celery worker`` processes and a Redis
broker of its own (``redis_server``; without ``redis-server`` its tests are skipped, or fail when
``CI=true``). When an e2e test fails, the tail of every process log and of the
newest task logs is attached to its report; figures a test records with ``record_property("figures",
...)`` are printed in the run's summary.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_harness import AirflowStack, AuditDB, RedisServer
from statsd_listener import StatsdListener

STACK_FIXTURES = ("airflow_stack", "celery_stack")
ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


class Deployment:
    """One kind of deployment (``airflow_stack`` or ``celery_stack``) of this pytest process: started
    when a test first needs it, stopped after the last test that needs it (``pytest_runtest_teardown``
    below) rather than at the end of the session. Under pytest-xdist the e2e groups end minutes before
    the rest of the suite, and an idle deployment's scheduler, triggerer and dag-processor keep
    burning CPU the other tests need (two cores). A test that needs it after that (a second group on
    the same worker) gets a fresh one."""

    def __init__(self) -> None:
        self.stack: AirflowStack | None = None
        self.failure: str | None = None

    def get(self, make: Callable[[], AirflowStack]) -> AirflowStack:
        """The running deployment, or ``make()`` started; a start that failed fails every test that
        needs it (with its diagnostics), as a session fixture's error would."""
        if self.failure is not None:
            pytest.fail(self.failure)
        if self.stack is None:
            stack = make()
            try:
                stack.start()
            except BaseException:
                diagnostics = stack.diagnostics()
                stack.stop()
                self.failure = f"the Airflow deployment did not start\n{diagnostics}"
                pytest.fail(self.failure)
            self.stack = stack
        return self.stack

    def stop(self) -> None:
        if self.stack is not None:
            stack, self.stack = self.stack, None
            stack.stop()


DEPLOYMENTS = pytest.StashKey[dict[str, Deployment]]()
LAST_USERS = pytest.StashKey[dict[str, set[str]]]()


@pytest.fixture(scope="session")
def statsd_listener() -> Iterator[StatsdListener]:
    """The StatsD server of the ``airflow_stack`` deployment (tests/e2e/test_e2e_metrics.py)."""
    listener = StatsdListener()
    yield listener
    listener.close()


@pytest.fixture(scope="session")
def _deployments(pg_proc: object, request: pytest.FixtureRequest) -> Iterator[dict[str, Deployment]]:
    """The deployments of this pytest process by fixture name, stopped at the end at the latest."""
    deployments = {name: Deployment() for name in STACK_FIXTURES}
    request.config.stash[DEPLOYMENTS] = deployments
    try:
        yield deployments
    finally:
        for deployment in deployments.values():
            deployment.stop()


@pytest.fixture
def airflow_stack(
    pg_proc: object,
    tmp_path_factory: pytest.TempPathFactory,
    _deployments: dict[str, Deployment],
    statsd_listener: StatsdListener,
) -> AirflowStack:
    """The LocalExecutor deployment (scheduler, triggerer, dag-processor, api-server) shared by the
    tests of this process's e2e group."""
    # Airflow's own metrics are left out by its allow list: only the provider's are sent.
    metrics = statsd_listener.airflow_env(allow=r"^elspeth\.")
    return _deployments["airflow_stack"].get(
        lambda: AirflowStack(pg=pg_proc, home=Path(tmp_path_factory.mktemp("airflow-e2e")), extra_env=metrics)
    )


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


@pytest.fixture
def celery_stack(
    redis_server: RedisServer,
    pg_proc: object,
    tmp_path_factory: pytest.TempPathFactory,
    _deployments: dict[str, Deployment],
) -> AirflowStack:
    """CeleryExecutor (default) and LocalExecutor, two Celery workers of two task slots each; the
    LocalExecutor has as many (``parallelism``)."""
    return _deployments["celery_stack"].get(
        lambda: AirflowStack(
            pg=pg_proc,
            home=Path(tmp_path_factory.mktemp("airflow-e2e-celery")),
            parallelism=4,
            broker_url=redis_server.url,
            celery_workers=2,
            worker_concurrency=2,
        )
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """For each deployment, the tests after which no test of this process needs it any more: the last
    one of each xdist group (tests/conftest.py ``xdist_scope``: a group runs on one worker, in
    collection order) under ``--dist load``, the last one overall without xdist. Under another xdist
    distribution nothing is known about what comes next: deployments live until the session ends."""
    root = session.config.pluginmanager.get_plugin(str(ROOT_CONFTEST))
    workerinput = getattr(session.config, "workerinput", None)
    worker = workerinput is not None
    if worker and not workerinput.get(root.XDIST_GROUPED):
        return
    scope_of = root.xdist_scope
    last: dict[tuple[str, str], str] = {}
    for item in session.items:
        for name in STACK_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                last[(name, scope_of(item.nodeid) if worker else "")] = item.nodeid
    users: dict[str, set[str]] = {}
    for (name, _), nodeid in last.items():
        users.setdefault(nodeid, set()).add(name)
    session.config.stash[LAST_USERS] = users


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """After the last test that needs a deployment (``pytest_collection_finish``), stop it."""
    result = yield
    names = item.config.stash.get(LAST_USERS, {}).get(item.nodeid, set())
    deployments = item.config.stash.get(DEPLOYMENTS, {})
    for name in sorted(names):
        if name in deployments:
            deployments[name].stop()
    return result


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
