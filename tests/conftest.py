"""Shared fixtures of the whole suite.

Audit store fixtures:

* ``sqlite_url``: a fresh SQLite file per test.
* ``pg_proc`` (session): a throwaway PostgreSQL server started with pytest-postgresql's
  ``PostgreSQLExecutor`` (the executor behind its ``postgresql_proc`` factory).
* ``pg_url``: a fresh database on that server per test, dropped afterwards.
* ``audit_url``: parametrized over both backends (ids ``sqlite`` / ``postgresql``; the PostgreSQL
  case carries the ``postgres`` marker, so ``-m "not postgres"`` deselects it).
* ``audit_engine``: ``engine_for_url(audit_url)``, schema at head, disposed after the test.

PostgreSQL refuses to run as root (initdb, pg_ctl and postgres all check), and CI runs this suite
as root. When we are root, the server runs as an unprivileged OS user (``postgres`` if it exists,
else ``nobody``) through a tiny wrapper around pg_ctl that drops privileges before exec'ing it,
and its data, socket and log live in a directory owned by that user. pytest-postgresql's
``postgresql_proc`` factory cannot be used as is for this: it puts the data directory under
pytest's basetemp, whose ancestors are mode 0700 and owned by root, so no other user can reach it.
Nothing else differs from what the factory does (same executor, same pg_ctl invocations).

Without PostgreSQL binaries the PostgreSQL cases are skipped, or fail when ``CI=true``.
``--postgresql-exec=/path/to/pg_ctl`` (pytest-postgresql's option) picks a specific server.

Tiers (markers, pyproject.toml), marked here by place rather than on each test: ``quick``, every
test under tests/unit and tests/audit that is neither ``postgres`` nor ``heavy`` (the pure core, the
store on SQLite, the operator unit tests): ``-m quick`` is the fast loop; ``heavy``, the scale tests.
Under pytest-xdist each e2e group runs on one worker (``pytest_xdist_make_scheduler``), whose
deployment stops after the group's last test (tests/e2e/conftest.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# An Airflow home of the suite's own, set before anything imports Airflow (which reads it once), so
# tests never touch the developer's ~/airflow (its airflow.cfg, its elspeth_audit.db).
_SUITE_AIRFLOW_HOME = tempfile.mkdtemp(prefix="elspeth-tests-airflow-home-")
os.environ["AIRFLOW_HOME"] = _SUITE_AIRFLOW_HOME
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

PG_BINDIR_GLOB = "/usr/lib/postgresql/*/bin/pg_ctl"


TESTS_DIR = Path(__file__).resolve().parent
QUICK_DIRS = ("unit", "audit")
# Scale tests: minutes each, so not in the quick tier (the default run still runs them).
HEAVY = (
    "tests/audit/test_store.py::test_ten_times_the_rows_write_and_read_in_the_same_memory",
    "tests/ui/test_scale.py::",
)


# The tests that use the Airflow deployment of tests/e2e (session fixture ``airflow_stack``), in three
# groups of about the same length (six to seven minutes of test time each, from --durations; on two
# cores the whole suite is CPU-bound, so three deployments did not shorten it), each on one xdist
# worker with a deployment of its own: the fault matrix; the example
# DAGs' runs with the backfill and the killed-worker cases; the deferred cases with the waiting modes'
# labels and the fencing cases (branches marked failed while running, the paused branch failed by
# its heartbeat timeout). The Celery test (session fixture ``celery_stack``, a deployment of its own)
# is a fourth group.
E2E_STACK_TESTS = "tests/e2e/test_e2e_"
E2E_CELERY = "tests/e2e/test_e2e_celery.py::"
E2E_FAULT_MATRIX = "tests/e2e/test_e2e_faults.py::"
E2E_EXAMPLES = E2E_FAULT_MATRIX + "test_example_dags_"
E2E_DEFERRED = "tests/e2e/test_e2e_deferred.py::"
E2E_LABELS = "tests/e2e/test_e2e_labels_modes.py::"
E2E_FENCING = "tests/e2e/test_e2e_fencing.py::"
# The browser tests share one module fixture (a migrated Airflow, a dag.test run, an API server).
BROWSER_TESTS = "tests/ui/test_browser.py::"


def xdist_scope(nodeid: str) -> str:
    """The xdist scope of a test: the tests of one scope run on one worker, sharing its fixtures.
    The e2e tests form three groups of about the same length (each with a deployment of its own)
    and the Celery group, the browser tests one; every other test is its own scope."""
    if nodeid.startswith(BROWSER_TESTS):
        return "browser"
    if not nodeid.startswith(E2E_STACK_TESTS):
        return nodeid
    if nodeid.startswith(E2E_CELERY):
        return "e2e celery"
    if nodeid.startswith((E2E_DEFERRED, E2E_LABELS, E2E_FENCING)):
        return "e2e deferred, labels, fencing"
    if nodeid.startswith(E2E_FAULT_MATRIX) and not nodeid.startswith(E2E_EXAMPLES):
        return "e2e fault matrix"
    return "e2e examples, backfill, killed worker"


# Set by the xdist controller in each worker's ``workerinput``: whether the tests are handed out by
# ``xdist_scope`` (``--dist load``; a worker's own config always says ``dist == "no"``).
XDIST_GROUPED = "elspeth_grouped_by_xdist_scope"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """Tell each pytest-xdist worker whether its tests come in ``xdist_scope`` groups."""
    node.workerinput[XDIST_GROUPED] = node.config.getvalue("dist") == "load"  # type: ignore[attr-defined]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tiers by place: ``heavy`` (``HEAVY``); ``quick``: the tests under ``QUICK_DIRS``
    that are neither ``postgres`` nor ``heavy``."""
    for item in items:
        if item.nodeid.startswith(HEAVY):
            item.add_marker(pytest.mark.heavy)
        try:
            top = Path(item.path).resolve().relative_to(TESTS_DIR).parts[0]
        except ValueError:
            continue
        if (
            top in QUICK_DIRS
            and item.get_closest_marker("postgres") is None
            and item.get_closest_marker("heavy") is None
        ):
            item.add_marker(pytest.mark.quick)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under pytest-xdist (``--dist load``, scripts/test.sh): every test on its own, except the
    tests grouped by ``xdist_scope``: each e2e group goes to one worker, where its tests share that
    worker's Airflow deployment, and the browser tests to one. (The groups, the largest scopes, are
    handed out first, to different workers.)

    (xdist's ``--dist loadgroup`` would do this with an ``xdist_group`` marker, but xdist 3.8
    renames node ids through ``Item._nodeid``, which pytest 9 no longer reads.)
    """
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class E2EOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return E2EOnOneWorker(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SUITE_AIRFLOW_HOME, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# PostgreSQL server


def _find_pg_ctl(config: pytest.Config) -> tuple[str | None, str]:
    """pg_ctl to use, and where we looked (for the skip/fail message)."""
    looked: list[str] = []
    option = config.getoption("postgresql_exec", default=None)
    if option:
        looked.append(f"--postgresql-exec={option}")
        return (option if os.access(option, os.X_OK) else None), ", ".join(looked)
    found = shutil.which("pg_ctl")
    looked.append("pg_ctl on PATH")
    if found:
        return found, ", ".join(looked)

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.parent.name)
        except ValueError:
            return 0.0

    candidates = sorted(glob.glob(PG_BINDIR_GLOB), key=version, reverse=True)
    looked.append(PG_BINDIR_GLOB)
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate, ", ".join(looked)
    return None, ", ".join(looked)


def _unprivileged_account() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' account exists")


def _write_privilege_dropping_wrapper(directory: Path, pg_ctl: str, account: pwd.struct_passwd) -> str:
    """An executable that runs ``pg_ctl "$@"`` as ``account`` (root only)."""
    wrapper = directory / "pg_ctl_as_user"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"os.setgroups([])\n"
        f"os.setgid({account.pw_gid})\n"
        f"os.setuid({account.pw_uid})\n"
        f"os.environ['HOME'] = {account.pw_dir!r}\n"
        f"os.environ['USER'] = os.environ['LOGNAME'] = {account.pw_name!r}\n"
        # initdb/postgres complain when started from a directory they cannot read.
        "os.chdir('/')\n"
        f"os.execv({pg_ctl!r}, [{pg_ctl!r}, *sys.argv[1:]])\n"
    )
    wrapper.chmod(stat.S_IRWXU)  # root only: nobody else may run or rewrite it
    return str(wrapper)


class PostgresServer:
    """What tests need to know about the session's PostgreSQL server."""

    def __init__(self, executor: object, host: str, port: int, user: str) -> None:
        self.executor = executor
        self.host = host
        self.port = port
        self.user = user

    def admin_connection(self):  # type: ignore[no-untyped-def]
        import psycopg2

        connection = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname="postgres")
        connection.autocommit = True
        return connection

    def url(self, database: str) -> str:
        from sqlalchemy.engine import URL

        return URL.create(
            "postgresql+psycopg2", username=self.user, host=self.host, port=self.port, database=database
        ).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_proc(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostgresServer]:
    pg_ctl, looked = _find_pg_ctl(request.config)
    if pg_ctl is None:
        reason = f"PostgreSQL server binaries not found (looked at: {looked}); install postgresql"
        print(reason, file=sys.stderr)
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)

    from port_for import get_port
    from pytest_postgresql.executors import PostgreSQLExecutor

    base = Path(tempfile.mkdtemp(prefix="elspeth-pg-"))
    socket_dir = base / "sock"
    socket_dir.mkdir()
    executable = pg_ctl
    if os.geteuid() == 0:
        account = _unprivileged_account()
        for path in (base, socket_dir):
            os.chown(path, account.pw_uid, account.pw_gid)
        executable = _write_privilege_dropping_wrapper(tmp_path_factory.mktemp("pg-wrapper"), pg_ctl, account)

    host = "127.0.0.1"
    port = get_port(None)
    assert port is not None
    executor = PostgreSQLExecutor(
        executable=executable,
        host=host,
        port=port,
        datadir=str(base / "data"),
        unixsocketdir=str(socket_dir),
        logfile=str(base / "postgresql.log"),
        startparams="-w",
        dbname="tests",
        user="postgres",
        password=None,
        postgres_options="-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
    )
    try:
        executor.start()
    except BaseException:
        log = base / "postgresql.log"
        if log.exists():
            print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
        raise
    server = PostgresServer(executor, host, port, "postgres")
    # pg_ctl -w can return while the server still answers "the database system is starting up"
    # (seen on a loaded machine): wait for a connection, not for a fixed time.
    deadline = time.monotonic() + 120
    while True:
        try:
            server.admin_connection().close()
            break
        except Exception:
            if time.monotonic() > deadline:
                executor.stop()
                shutil.rmtree(base, ignore_errors=True)
                raise
            time.sleep(0.2)
    try:
        yield server
    finally:
        try:
            executor.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_proc: PostgresServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    from airflow_elspeth.audit.engine import dispose_engine

    name = f"elspeth_test_{uuid.uuid4().hex[:16]}"
    admin = pg_proc.admin_connection()
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    url = pg_proc.url(name)
    try:
        yield url
    finally:
        dispose_engine(url)
        admin = pg_proc.admin_connection()
        try:
            with admin.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            admin.close()


# --------------------------------------------------------------------------------------------------
# SQLite and both backends


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite file for this test (not created yet)."""
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.engine import dispose_engine

    url = URL.create("sqlite", database=str(tmp_path / "audit.db")).render_as_string()
    yield url
    dispose_engine(url)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def audit_url(request: pytest.FixtureRequest) -> str:
    """An empty audit database URL, once per backend."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def audit_engine(audit_url: str) -> Iterator[object]:
    """The cached Engine for ``audit_url``, schema at head; disposed and forgotten afterwards."""
    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url

    engine = engine_for_url(audit_url)
    yield engine
    dispose_engine(audit_url)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created if missing): one pytest-xdist worker at a time."""
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _migrated_metadata_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A metadata DB migrated by ``airflow db migrate`` once per run: by the first pytest-xdist worker
    that needs it (in the run's shared base temp directory, the others wait on a lock), or by the one
    process without xdist. Returns its ``airflow.db``."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the basetemp all workers of this run share
    home = base / "airflow-metadata-template"
    database = home / "airflow.db"
    with _exclusive(base / "airflow-metadata-template.lock"):
        if database.exists():
            return database
        home.mkdir(exist_ok=True)
        env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            database.unlink(missing_ok=True)
            raise RuntimeError(f"airflow db migrate failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        print(f"metadata DB migrated in {time.monotonic() - started:.1f}s ({home})", file=sys.stderr)
    return database


@pytest.fixture(scope="session")
def airflow_metadata(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The suite's AIRFLOW_HOME with its metadata DB at head: a copy of the DB ``airflow db migrate``
    migrated once for the whole run (:func:`_migrated_metadata_template`; each pytest-xdist worker
    has an AIRFLOW_HOME of its own and would otherwise start Airflow's CLI to migrate it again)."""
    home = os.environ["AIRFLOW_HOME"]
    # In place, as the migration itself would write it (a connection opened earlier sees the copy).
    shutil.copyfile(_migrated_metadata_template(tmp_path_factory), Path(home) / "airflow.db")
    return home
