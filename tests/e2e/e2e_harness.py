"""A real Airflow deployment for the end-to-end tests: scheduler, triggerer, dag-processor, api-server.

Everything lives in a temporary ``AIRFLOW_HOME``; the metadata database and the Elspeth audit
database are two databases on the PostgreSQL server the suite starts (``pg_proc``). The executor is
the LocalExecutor, the DAGs folder is ``tests/e2e/dags``. Tests drive it the way an operator would:
the ``airflow`` CLI where the CLI is what is tested (``backfill create``) and otherwise the public
REST API v2, as the UI does (unpause a DAG, add the audit connection and a pool, trigger a run, read
task-instance states), with ``[core] simple_auth_manager_all_admins`` so no login is needed.

Every process runs in its own process group with its output in ``<home>/proc/<name>.log``; task
processes (own process groups too) are found through the process tree and by their AIRFLOW_HOME, so
``stop()`` leaves nothing behind even when a task was sleeping.

With ``celery_workers`` and a ``broker_url`` (a ``RedisServer``), the executors are the CeleryExecutor
(default) and the LocalExecutor (for tasks that name it), and ``start()`` adds that many ``airflow
celery worker`` processes; each reports its own name as the task instances' ``hostname``
(``worker_hostname``), since they all run on this machine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import make_url

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = Path(__file__).resolve().parent / "dags"
VENV_BIN = Path(sys.executable).parent
PROCESSES = ("api-server", "scheduler", "dag-processor", "triggerer")
STATE_ENV = "ELSPETH_E2E_STATE"
WORKER_NAME_ENV = "ELSPETH_E2E_WORKER_NAME"
TERMINAL_RUN_STATES = ("success", "failed")
TRIGGERER_STALL_WARNING_SECONDS = 1.0
# The deployment's Airflow settings, the file the README's "Running it for real" shows.
DEPLOY_ENV = REPO / "deploy" / "airflow.env"


class E2EError(AssertionError):
    """Something in the deployment did not happen in time (the message says what, logs are attached)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], Any], *, timeout: float, interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; E2EError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
        except Exception as err:  # the thing polled may not be up yet
            result, last_error = None, err
        if result:
            return result
        if time.monotonic() > deadline:
            detail = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise E2EError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def deployment_settings(values: dict[str, str]) -> dict[str, str]:
    """The settings of ``deploy/airflow.env``, each ``${NAME}`` filled from ``values`` (all needed).

    :param values: ``AIRFLOW_DB_URL``, ``API_URL``, ``SECRET``, ``FERNET_KEY``, ``DAGS_FOLDER``.
    """
    settings: dict[str, str] = {}
    for line in DEPLOY_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings[name] = string.Template(value).substitute(values)
    return settings


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the Celery workers: the worker's Celery hostname, which the
    harness puts in its environment (every worker runs on this machine, so the FQDN is the same)."""
    return os.environ.get(WORKER_NAME_ENV) or socket.getfqdn()


@dataclass
class RedisServer:
    """A Redis broker of our own: ``redis-server`` on a free loopback port, no persistence, its files
    in ``home``; ``start()`` it, ``stop()`` it (idempotent)."""

    home: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.home / "redis.log"

    def start(self, *, timeout: float = 30) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise E2EError("redis-server not found on PATH (install the redis-server OS package)")
        self.home.mkdir(parents=True, exist_ok=True)
        command = [executable, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.home)]
        command += ["--daemonize", "no", "--save", "", "--appendonly", "no", "--protected-mode", "yes"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(
            f"redis-server on port {self.port} to answer PING", self.ping, timeout=timeout, interval=0.2
        )

    def ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise E2EError(f"redis-server exited with {self.process.returncode}\n{tail(self.log)}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"<{path}: {err}>"
    return "\n".join(text.splitlines()[-lines:])


def task_log_tail(path: Path, lines: int) -> str:
    """A task log's last lines, one ``time level event`` per JSON line (errors with their type)."""
    out = []
    for raw in tail(path, lines * 3).splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            out.append(raw)
            continue
        event = str(entry.get("event", ""))
        if "Failed to import plugin" in event:
            continue  # a plugin of the checkout that is not there yet: noise in every task log
        errors = "; ".join(
            f"{e.get('exc_type')}: {e.get('exc_value')}" for e in entry.get("error_detail") or []
        )
        out.append(
            f"{str(entry.get('timestamp', ''))[11:23]} {entry.get('level', '')} {event} {errors}".rstrip()
        )
    return "\n".join(out[-lines:])


@dataclass
class AirflowStack:
    """One Airflow deployment; ``start()`` it, use it, ``stop()`` it (idempotent)."""

    pg: Any  # tests.conftest.PostgresServer
    home: Path
    dags_folder: Path = DAGS_FOLDER
    parallelism: int = 8
    broker_url: str | None = None  # with celery_workers: the CeleryExecutor's broker
    celery_workers: int = 0
    worker_concurrency: int = 2
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    databases: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.meta_db = f"e2e_airflow_{suffix}"
        self.audit_db = f"e2e_audit_{suffix}"
        self.state_dir = self.home / "state"
        self.proc_dir = self.home / "proc"
        self.base_url = f"http://127.0.0.1:{self.port}"
        if self.celery_workers and not self.broker_url:
            raise ValueError("celery_workers need a broker_url")
        self.worker_names = [f"worker{n}@e2e-{suffix}" for n in range(1, self.celery_workers + 1)]

    # -- configuration ----------------------------------------------------------------------------

    @property
    def meta_url(self) -> str:
        return str(self.pg.url(self.meta_db))

    @property
    def audit_url(self) -> str:
        return str(self.pg.url(self.audit_db))

    def env(self) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW", "PYTEST", "_AIRFLOW")) and k != "ELSPETH_AUDIT_URL"
        }
        return {
            **base,
            "PATH": f"{VENV_BIN}:{base.get('PATH', '/usr/bin:/bin')}",
            "AIRFLOW_HOME": str(self.home),
            STATE_ENV: str(self.state_dir),
            # What a deployment sets (the README's recipe), then what only the tests need.
            **deployment_settings(
                {
                    "AIRFLOW_DB_URL": self.meta_url,
                    "API_URL": self.base_url,
                    "SECRET": self._secret,
                    "FERNET_KEY": self._fernet_key,
                    "DAGS_FOLDER": str(self.dags_folder),
                }
            ),
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # the REST API without a login
            "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "2",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            # The triggerer logs its event loop blocked beyond this (default 0.2 s). On a loaded
            # two-core machine CPU starvation alone stalls an idle triggerer's loop 0.2-0.3 s (seen
            # with no trigger running); a trigger's own blocking call is what test_coalesce_trigger.py's
            # loop-lag test measures, with each such call made slow.
            "AIRFLOW__TRIGGERER__BLOCKED_MAIN_THREAD_WARNING_THRESHOLD": str(TRIGGERER_STALL_WARNING_SECONDS),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "600",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # Log servers of the scheduler (LocalExecutor tasks) and triggerer: fixed ports by default.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self._log_ports[0]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self._log_ports[1]),
            "AIRFLOW__ELSPETH__CHUNK_SIZE": "1000",
            "PYTHONUNBUFFERED": "1",
            **self._celery_env(),
            **self.extra_env,
        }

    def _celery_env(self) -> dict[str, str]:
        if not self.celery_workers:
            return {}
        return {
            # A deployment needs only CeleryExecutor; LocalExecutor too for the comparison's tasks.
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor,LocalExecutor",
            "AIRFLOW__CELERY__BROKER_URL": str(self.broker_url),
            # Task states through the metadata DB (the provider's default, spelled out).
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.meta_url}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
        }

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, *, ready_timeout: float = 240) -> None:
        started = time.monotonic()
        self._fernet_key = base64.urlsafe_b64encode(os.urandom(32)).decode()
        self._secret = secrets.token_urlsafe(64)
        self._log_ports = (free_port(), free_port())
        for path in (self.home, self.state_dir, self.proc_dir):
            path.mkdir(parents=True, exist_ok=True)
        # A loaded machine may still be starting the server ("the database system is starting up").
        admin = wait_until("PostgreSQL to accept connections", self.pg.admin_connection, timeout=60)
        try:
            with admin.cursor() as cursor:
                for name in (self.meta_db, self.audit_db):
                    cursor.execute(f'CREATE DATABASE "{name}"')
                    self.databases.append(name)
        finally:
            admin.close()
        self.cli("db", "migrate", timeout=300)
        self.timings["db_migrate"] = time.monotonic() - started
        # Schema of the audit store at head before any task runs (tasks would do it on first use).
        self.run([str(VENV_BIN / "airflow-elspeth"), "--url", self.audit_url, "db", "upgrade"], timeout=120)
        for name in PROCESSES:
            self._spawn(name, [name])
        for name in self.worker_names:
            self._spawn(
                name,
                # --skip-serve-logs: every worker on this machine would serve its logs on the same port
                [
                    "celery",
                    "worker",
                    "--celery-hostname",
                    name,
                    "--concurrency",
                    str(self.worker_concurrency),
                    "--skip-serve-logs",
                ],
                {
                    WORKER_NAME_ENV: name,
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{Path(__file__).stem}.worker_hostname",
                    "PYTHONPATH": os.pathsep.join(
                        filter(None, [str(Path(__file__).parent), self.env().get("PYTHONPATH")])
                    ),
                },
            )
        wait_until("every Airflow process to report healthy", self.healthy, timeout=ready_timeout, interval=1)
        # The audit store's connection in the metadata DB, in the fields README's "Running it for
        # real" adds it with (not a URL in the extra, which `airflow connections add` prints back,
        # password included); tasks read it through the execution API. Through the REST API rather
        # than ``airflow connections add``: no task runs before a test triggers one, and each
        # ``airflow`` CLI call costs seconds of CPU (importing Airflow), which the suite runs short
        # of on two cores.
        audit = make_url(self.audit_url)
        self.api(
            "POST",
            "/api/v2/connections",
            {
                "connection_id": "elspeth_audit_default",
                "conn_type": "elspeth",
                "host": audit.host,
                "port": audit.port,
                "login": audit.username,
                "password": audit.password,
                "schema": audit.database,
                "extra": json.dumps({"drivername": audit.drivername}),
            },
        )
        self.timings["ready"] = time.monotonic() - started

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.proc_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        try:
            self.processes[name] = subprocess.Popen(
                [str(VENV_BIN / "airflow"), *args],
                cwd=self.home,
                env={**self.env(), **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def healthy(self) -> bool:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise E2EError(
                    f"airflow {name} exited with {proc.returncode}\n{tail(self.proc_dir / f'{name}.log')}"
                )
        health = self.api("GET", "/api/v2/monitor/health")
        return all(
            (health.get(part) or {}).get("status") == "healthy"
            for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
        ) and all(self.worker_ready(name) for name in self.worker_names)

    def worker_ready(self, name: str) -> bool:
        """Whether Celery worker ``name`` logged that it is ready (connected, consuming its queue)."""
        return f"{name} ready." in (self.proc_dir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        """Stop every process of this deployment (and every task process it started), drop the DBs."""
        victims = self._our_processes()
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(victims, timeout=15)
        for proc in alive + self._our_processes():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        for popen in self.processes.values():
            with contextlib.suppress(Exception):
                popen.wait(timeout=5)
        self.processes.clear()
        self._drop_databases()

    def _our_processes(self) -> list[psutil.Process]:
        """The processes we started, their descendants, and anything else running with our home."""
        found: dict[int, psutil.Process] = {}
        for popen in self.processes.values():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(popen.pid)
                found[root.pid] = root
                for child in root.children(recursive=True):
                    found[child.pid] = child
        for proc in psutil.process_iter(["pid"]):
            if proc.pid in found or proc.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if self._marked_ours(proc):
                    found[proc.pid] = proc
        return list(found.values())

    def _marked_ours(self, proc: psutil.Process) -> bool:
        """Started with our AIRFLOW_HOME, or running in it (task processes retitle themselves with
        setproctitle, which blanks /proc/<pid>/environ, but keep the working directory)."""
        home = str(self.home)
        return proc.environ().get("AIRFLOW_HOME") == home or proc.cwd() == home

    def owns(self, proc: psutil.Process) -> bool:
        """Whether ``proc`` belongs to this deployment (a descendant of one of its processes)."""
        with contextlib.suppress(psutil.Error):
            ancestors = {parent.pid for parent in proc.parents()}
            if ancestors & {popen.pid for popen in self.processes.values()}:
                return True
            return self._marked_ours(proc)
        return False

    def _drop_databases(self) -> None:
        from airflow_elspeth.audit.engine import dispose_engine

        dispose_engine(self.audit_url)
        if not self.databases:
            return
        admin = self.pg.admin_connection()
        try:
            with admin.cursor() as cursor:
                for name in self.databases:
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            admin.close()
        self.databases.clear()

    # -- talking to it ----------------------------------------------------------------------------

    def run(
        self, command: list[str], *, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            command, env=self.env(), cwd=self.home, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise E2EError(
                f"{' '.join(command)} exited {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
                f"stderr:\n{done.stderr[-3000:]}"
            )
        return done

    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``airflow <args>`` against this deployment."""
        return self.run([str(VENV_BIN / "airflow"), *args], timeout=timeout, check=check)

    def elspeth(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """``airflow-elspeth --url <audit db> <args>``."""
        return self.run([str(VENV_BIN / "airflow-elspeth"), "--url", self.audit_url, *args], check=check)

    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            raise E2EError(f"{method} {path} -> {err.code}: {err.read()[:2000]!r}") from err
        return json.loads(raw) if raw else None

    def wait_dag(self, dag_id: str, *, timeout: float = 120) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id``; fail early on its import error."""

        def parsed() -> Any:
            errors = self.api("GET", "/api/v2/importErrors").get("import_errors", [])
            mine = [e for e in errors if Path(e.get("filename", "")).stem == dag_id]
            if mine:
                raise E2EError(f"import error in {dag_id}: {mine[0].get('stack_trace')}")
            try:
                return self.api("GET", f"/api/v2/dags/{dag_id}")
            except E2EError:
                return None

        return wait_until(f"DAG {dag_id} to be parsed", parsed, timeout=timeout, interval=1)

    def unpause(self, dag_id: str) -> None:
        """Unpause ``dag_id`` as the UI's toggle does (``PATCH is_paused``; not ``airflow dags
        unpause``, a CLI start-up of seconds of CPU each time)."""
        self.api("PATCH", f"/api/v2/dags/{dag_id}?update_mask=is_paused", {"is_paused": False})

    def set_pool(self, name: str, slots: int, description: str) -> None:
        """Create pool ``name`` with ``slots`` slots through the REST API (as the UI's pool form)."""
        self.api("POST", "/api/v2/pools", {"name": name, "slots": slots, "description": description})

    def trigger(self, dag_id: str, *, conf: dict[str, Any] | None = None) -> str:
        """A manual DAG run through the REST API; returns its run_id."""
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        return str(self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)["dag_run_id"])

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"))

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return list(self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"])

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances?limit=1000"
        return list(self.api("GET", path)["task_instances"])

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """{task_id or task_id[map_index]: state} of one DAG run."""
        return {
            ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""): ti["state"]
            for ti in self.task_instances(dag_id, run_id)
        }

    def wait_run(
        self,
        dag_id: str,
        run_id: str,
        *,
        timeout: float,
        states: Iterable[str] = TERMINAL_RUN_STATES,
        on_poll: Callable[[], None] | None = None,
        interval: float = 0.5,
    ) -> dict[str, Any]:
        wanted = set(states)

        def done() -> dict[str, Any] | None:
            if on_poll is not None:
                on_poll()
            run = self.dag_run(dag_id, run_id)
            return run if run["state"] in wanted else None

        return wait_until(
            f"DAG run {dag_id}/{run_id} to reach {sorted(wanted)}", done, timeout=timeout, interval=interval
        )

    def task_log_events(self, dag_id: str, run_id: str, task_id: str, attempt: int = 1) -> list[str]:
        """The ``event`` lines of one task try's log (JSON lines, as the task runner writes them)."""
        path = (
            self.home
            / "logs"
            / f"dag_id={dag_id}"
            / f"run_id={run_id}"
            / f"task_id={task_id}"
            / f"attempt={attempt}.log"
        )
        events = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                events.append(str(json.loads(line).get("event", "")))
            except ValueError:
                events.append(line)
        return events

    def restart_scheduler(self, env: dict[str, str] | None = None, *, timeout: float = 120) -> None:
        """Stop the scheduler (SIGTERM; its process group SIGKILLed after 60 s) and start it again
        with ``env`` over the deployment's environment (the task supervisors its LocalExecutor
        starts inherit it); return once the new scheduler heartbeats. Meant for a moment when no
        task runs: a graceful stop waits for the running ones."""
        old = self.processes.pop("scheduler")
        old.terminate()
        try:
            old.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(old.pid, signal.SIGKILL)
            old.wait(timeout=10)
        started = datetime.now(timezone.utc)
        self._spawn("scheduler", ["scheduler"], env)

        def heartbeating() -> bool:
            scheduler = self.processes["scheduler"]
            if scheduler.poll() is not None:
                raise E2EError(
                    f"the restarted scheduler exited with {scheduler.returncode}\n"
                    f"{tail(self.proc_dir / 'scheduler.log')}"
                )
            health = self.api("GET", "/api/v2/monitor/health").get("scheduler") or {}
            beat = health.get("latest_scheduler_heartbeat")
            return bool(beat) and datetime.fromisoformat(beat) > started

        wait_until("the restarted scheduler to heartbeat", heartbeating, timeout=timeout, interval=1)

    # -- diagnostics ------------------------------------------------------------------------------

    def diagnostics(self, lines: int = 60) -> str:
        """The tail of every process log and of the newest task logs (attached to failed tests)."""
        parts = []
        for name in (*PROCESSES, *self.worker_names):
            proc = self.processes.get(name)
            status = (
                "not started"
                if proc is None
                else ("running" if proc.poll() is None else f"exited {proc.returncode}")
            )
            log = self.proc_dir / f"{name}.log"
            parts.append(f"===== airflow {name} ({status}): {log}\n{tail(log, lines)}")
        task_logs = sorted((self.home / "logs").glob("dag_id=*/**/*.log"), key=lambda p: p.stat().st_mtime)
        for path in task_logs[-12:]:
            parts.append(f"===== task log {path.relative_to(self.home)}\n{task_log_tail(path, 30)}")
        return "\n".join(parts)


class AuditDB:
    """Read-only SQL on the deployment's audit database, for assertions."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.engine = create_engine(url, poolclass=NullPool)

    def all(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(text(sql), params).mappings()]

    def one(self, sql: str, **params: Any) -> dict[str, Any]:
        rows = self.all(sql, **params)
        assert len(rows) == 1, f"expected one row, got {len(rows)}: {sql} {params}"
        return rows[0]

    def scalar(self, sql: str, **params: Any) -> Any:
        return next(iter(self.one(sql, **params).values()))

    def runs_of(self, dag_id: str) -> list[dict[str, Any]]:
        return self.all(
            "SELECT * FROM runs WHERE dag_id = :dag_id ORDER BY logical_date, try_number", dag_id=dag_id
        )

    def run_of(self, dag_id: str, airflow_run_id: str) -> dict[str, Any]:
        return self.one(
            "SELECT * FROM runs WHERE dag_id = :d AND airflow_run_id = :r ORDER BY try_number DESC LIMIT 1",
            d=dag_id,
            r=airflow_run_id,
        )

    def decisions(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.all(
            "SELECT d.*, r.row_key AS key FROM coalesce_decisions d JOIN rows r "
            "ON r.run_id = d.run_id AND r.row_id = d.row_id WHERE d.run_id = :run ORDER BY r.row_index",
            run=run_id,
        )
        for row in rows:
            for column in ("consumed", "missing_json", "details_json", "late_json"):
                if row.get(column):
                    row[column] = json.loads(row[column])
        return rows

    def dispose(self) -> None:
        self.engine.dispose()


def verify_clean(stack: AirflowStack, audit: AuditDB, *args: str) -> None:
    """``airflow-elspeth verify <args>`` exits 0; otherwise fail with the findings explained."""
    done = stack.elspeth("verify", *args)
    if done.returncode == 0:
        return
    try:
        findings = json.loads(stack.elspeth("verify", "--json", *args).stdout)
    except ValueError:
        findings = []
    if isinstance(findings, dict):
        findings = findings.get("findings", [])
    tokens = [f["token_id"] for f in findings if f.get("token_id")][:200]
    detail = (
        audit.all(
            "SELECT t.run_id, t.token_kind, t.branch_name, r.row_key, "
            "string_agg(o.outcome || ':' || coalesce(o.reason, '') || ':' || o.is_terminal::text, ',') "
            "AS outcomes "
            "FROM tokens t JOIN rows r ON r.run_id = t.run_id AND r.row_id = t.row_id "
            "LEFT JOIN token_outcomes o ON o.token_id = t.token_id WHERE t.token_id = ANY(:ids) "
            "GROUP BY t.run_id, t.token_kind, t.branch_name, r.row_key ORDER BY 1, 2, 3, 4",
            ids=tokens,
        )
        if tokens
        else []
    )
    checks: dict[tuple[str, str], int] = {}
    for f in findings:
        key = (str(f.get("run_id")), str(f.get("check")))
        checks[key] = checks.get(key, 0) + 1
    raise AssertionError(
        f"airflow-elspeth verify {' '.join(args)} exited {done.returncode}: {len(findings)} findings "
        f"{checks}\nexamples: {findings[:5]}\ntokens: {detail[:40]}"
    )


# -- scale runs (tests/e2e/test_e2e_celery.py, benchmarks/scale.py) ----------------------------------

# tests/e2e/dags/e2e_scale.py: the same DAG on each executor of a deployment with Celery workers.
SCALE_DAGS = {"celery": "e2e_scale_celery", "local": "e2e_scale_local"}


def _moment(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def run_scale_dag(stack: AirflowStack, executor: str, rows: int, *, timeout: float) -> dict[str, Any]:
    """Trigger tests/e2e/dags/e2e_scale.py's DAG for ``executor``, wait for the run to end, return its
    figures: state, wall seconds (DAG run start..end) and rows/s, seconds per phase (from the task
    instances' start and end: ``queued`` run start..fork start, ``fork``, ``branches`` first branch
    start..last branch end, ``join_after_branches`` last branch end..coalesce end), the mapped task
    instances and how many ran on each host."""
    dag_id = SCALE_DAGS[executor]
    stack.wait_dag(dag_id)
    run_id = stack.trigger(dag_id)
    run = stack.wait_run(dag_id, run_id, timeout=timeout, interval=1)
    tis = stack.task_instances(dag_id, run_id)
    fork = next(ti for ti in tis if ti["task_id"] == "fork")
    join = next(ti for ti in tis if ti["task_id"] == "join")
    mapped = [ti for ti in tis if ti["map_index"] >= 0]
    timed = all(ti["start_date"] and ti["end_date"] for ti in [fork, join, *mapped])
    if run["state"] != "success" or not mapped or not timed:
        states = stack.task_states(dag_id, run_id)
        return {
            "executor": executor,
            "dag_id": dag_id,
            "run_id": run_id,
            "state": run["state"],
            "tasks": states,
        }
    wall = _moment(run["end_date"]) - _moment(run["start_date"])
    branches_start = min(_moment(ti["start_date"]) for ti in mapped)
    branches_end = max(_moment(ti["end_date"]) for ti in mapped)
    hosts: dict[str, int] = {}
    for ti in mapped:
        hosts[str(ti["hostname"])] = hosts.get(str(ti["hostname"]), 0) + 1
    return {
        "executor": executor,
        "dag_id": dag_id,
        "run_id": run_id,
        "state": run["state"],
        "rows": rows,
        "wall_seconds": round(wall, 1),
        "rows_per_second": round(rows / wall, 1),
        "phases": {
            "queued": round(_moment(fork["start_date"]) - _moment(run["start_date"]), 1),
            "fork": round(_moment(fork["end_date"]) - _moment(fork["start_date"]), 1),
            "branches": round(branches_end - branches_start, 1),
            "join_after_branches": round(_moment(join["end_date"]) - branches_end, 1),
        },
        "mapped_task_instances": len(mapped),
        "hosts": dict(sorted(hosts.items())),
    }


# -- fault injection and end-state checks (tests/e2e/test_e2e_faults.py) ------------------------------


def _ti_path(dag_id: str, run_id: str, task_id: str) -> str:
    return (
        f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
        f"/taskInstances/{urllib.parse.quote(task_id, safe='')}"
    )


def task_instance(stack: AirflowStack, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    """One (unmapped) task instance through the REST API."""
    return dict(stack.api("GET", _ti_path(dag_id, run_id, task_id)))


def set_task_state(stack: AirflowStack, dag_id: str, run_id: str, task_id: str, state: str) -> Any:
    """What a person does in the UI: mark a task instance ``state`` (PATCH ``new_state``)."""
    return stack.api("PATCH", _ti_path(dag_id, run_id, task_id), {"new_state": state})


def clear_tasks(
    stack: AirflowStack, dag_id: str, run_id: str, task_ids: list[str], *, include_downstream: bool = True
) -> list[dict[str, Any]]:
    """``POST /dags/{dag_id}/clearTaskInstances`` for one DAG run, whatever the tasks' states."""
    body = {
        "dry_run": False,
        "task_ids": task_ids,
        "dag_run_id": run_id,
        "include_downstream": include_downstream,
        "only_failed": False,
    }
    done = stack.api("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances", body)
    return list((done or {}).get("task_instances", []))


def xcom_value(stack: AirflowStack, dag_id: str, run_id: str, task_id: str, key: str) -> Any:
    entry = stack.api("GET", _ti_path(dag_id, run_id, task_id) + f"/xcomEntries/{urllib.parse.quote(key)}")
    value = entry.get("value")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def task_process(stack: AirflowStack, ti: dict[str, Any]) -> psutil.Process:
    """The process running task instance ``ti`` (its runner retitles itself ``airflow worker -- <ti id>``)."""
    title = f"airflow worker -- {ti['id']}"
    candidates = []
    if ti.get("pid"):
        with contextlib.suppress(psutil.Error):
            candidates.append(psutil.Process(int(ti["pid"])))
    candidates += stack._our_processes()
    for proc in candidates:
        with contextlib.suppress(psutil.Error):
            if title in " ".join(proc.cmdline()) and stack.owns(proc):
                return proc
    raise E2EError(f"no process of this deployment runs {title!r} (pid {ti.get('pid')})")


def kill_task(stack: AirflowStack, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    """SIGKILL the process of the running try of a task (as the OOM killer would); returns that try."""

    def running() -> dict[str, Any] | None:
        ti = task_instance(stack, dag_id, run_id, task_id)
        return ti if ti["state"] == "running" else None

    ti = wait_until(f"{task_id} to be running", running, timeout=120)
    proc = wait_until(f"the process of {task_id}", lambda: task_process(stack, ti), timeout=30)
    proc.send_signal(signal.SIGKILL)
    psutil.wait_procs([proc], timeout=10)
    return ti


@contextlib.contextmanager
def audit_db_unreachable(stack: AirflowStack) -> Iterator[None]:
    """The audit database refuses connections and drops the open ones; the metadata DB stays up."""
    admin = stack.pg.admin_connection()
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{stack.audit_db}" ALLOW_CONNECTIONS false')
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (stack.audit_db,),
            )
        yield
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{stack.audit_db}" ALLOW_CONNECTIONS true')
        admin.close()


def _pg_tool(name: str) -> str:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise E2EError(f"{name} not found")
    return candidates[-1]


def copy_audit_db(stack: AirflowStack) -> str:
    """A copy of the audit database (pg_dump | psql, while the deployment runs); its URL.

    Dropped with the deployment's databases.
    """
    name = f"{stack.audit_db}_copy_{uuid.uuid4().hex[:6]}"
    admin = stack.pg.admin_connection()
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
            stack.databases.append(name)
    finally:
        admin.close()
    server = ["-h", str(stack.pg.host), "-p", str(stack.pg.port), "-U", str(stack.pg.user)]
    dump = subprocess.run(
        [_pg_tool("pg_dump"), *server, "--no-owner", "-d", stack.audit_db],
        capture_output=True,
        check=True,
        timeout=120,
    )
    subprocess.run(
        [_pg_tool("psql"), *server, "-q", "-v", "ON_ERROR_STOP=1", "-d", name],
        input=dump.stdout,
        capture_output=True,
        check=True,
        timeout=120,
    )
    return str(stack.pg.url(name))


def branch_token_outcomes(audit: AuditDB, run_id: str) -> list[dict[str, Any]]:
    """Every branch token of an audit run with its number of terminal outcomes and the terminal one."""
    return audit.all(
        "SELECT t.token_id, t.branch_name, r.row_key, "
        "count(o.token_id) FILTER (WHERE o.is_terminal) AS terminal, "
        "max(o.outcome) FILTER (WHERE o.is_terminal) AS outcome, "
        "max(o.reason) FILTER (WHERE o.is_terminal) AS reason, "
        "count(o.token_id) FILTER (WHERE NOT o.is_terminal) AS superseded "
        "FROM tokens t JOIN rows r ON r.run_id = t.run_id AND r.row_id = t.row_id "
        "LEFT JOIN token_outcomes o ON o.token_id = t.token_id "
        "WHERE t.run_id = :run AND t.token_kind = 'branch' "
        "GROUP BY t.token_id, t.branch_name, r.row_key ORDER BY r.row_key, t.branch_name",
        run=run_id,
    )


def assert_closed(
    stack: AirflowStack, audit: AuditDB, dag_id: str, airflow_run_id: str, *, rows: int, branches: int
) -> list[dict[str, Any]]:
    """Nothing left open by a DAG run: no audit run ``running``; in each completed audit run every
    branch token has exactly one terminal outcome; ``verify --run-id`` exits 0 for each. Returns the
    audit runs."""
    runs = audit.all(
        "SELECT * FROM runs WHERE dag_id = :d AND airflow_run_id = :r ORDER BY try_number",
        d=dag_id,
        r=airflow_run_id,
    )
    assert runs, f"no audit run for {dag_id}/{airflow_run_id}"
    running = [r["run_id"] for r in runs if r["status"] == "running"]
    assert not running, f"audit runs still running: {running}"
    for run in runs:
        if run["status"] == "completed":
            tokens = branch_token_outcomes(audit, run["run_id"])
            assert len(tokens) == rows * branches, (run["run_id"], len(tokens))
            wrong = [tok for tok in tokens if tok["terminal"] != 1]
            assert not wrong, f"tokens without exactly one terminal outcome: {wrong[:10]}"
        verify_clean(stack, audit, "--run-id", run["run_id"])
    return runs


def wait_task_process_gone(stack: AirflowStack, ti: dict[str, Any], *, timeout: float = 120) -> None:
    """Wait until no process of this deployment runs task instance try ``ti`` any more."""
    title = f"airflow worker -- {ti['id']}"

    def gone() -> bool:
        for proc in stack._our_processes():
            with contextlib.suppress(psutil.Error):
                if title in " ".join(proc.cmdline()):
                    return False
        return True

    wait_until(f"the process of {ti['task_id']} try {ti['try_number']} to end", gone, timeout=timeout)


def task_supervisor(stack: AirflowStack, proc: psutil.Process) -> psutil.Process:
    """The supervisor of task process ``proc``: its parent, the LocalExecutor worker that forked it,
    relays its calls to the API server and heartbeats for it (so Airflow tells the task through it
    that its try ended)."""
    parent = proc.parent()
    ours = {popen.pid for popen in stack.processes.values()}
    if parent is None or parent.pid in ours or not stack.owns(parent):
        raise E2EError(f"task process {proc.pid} has no supervisor of this deployment (parent {parent})")
    return parent


@contextlib.contextmanager
def scheduler_settings(stack: AirflowStack, settings: dict[str, str]) -> Iterator[None]:
    """Run the scheduler with ``settings`` (``AIRFLOW__...`` environment variables) for the duration:
    restarted with them, and restarted without them afterwards (also when the body fails)."""
    stack.restart_scheduler(settings)
    try:
        yield
    finally:
        stack.restart_scheduler()


def start_run(stack: AirflowStack, dag_id: str) -> tuple[str, Path]:
    """Unpause ``dag_id`` and trigger a run: its run id, and the DAG's state folder (created), where
    the test DAGs read the files the tests drive them with."""
    state = stack.state_dir / dag_id
    state.mkdir(parents=True, exist_ok=True)
    stack.wait_dag(dag_id)
    stack.unpause(dag_id)
    return stack.trigger(dag_id), state
