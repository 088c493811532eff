"""A throwaway PostgreSQL server for the benchmark: initdb in a temp dir, a free port, stopped after.

PostgreSQL refuses to run as root. When we are root the server runs as the ``postgres`` OS user (else
``nobody``), the same approach as ``tests/conftest.py``, but without pytest-postgresql: plain
``initdb`` / ``pg_ctl`` run through ``subprocess`` with ``user=``/``group=``.

The server keeps PostgreSQL's default durability settings (fsync, synchronous_commit, full page
writes on): the benchmark measures what a deployment would see, and the floor runs on the same server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL


def find_bindir() -> Path:
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: float(Path(p).parents[1].name)
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found (pg_ctl on PATH or /usr/lib/postgresql/*/bin)"
        )
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TempPostgres:
    """``with TempPostgres() as pg: pg.create_database("x"); pg.url("x")``."""

    user = "postgres"  # the database superuser created by initdb

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="elspeth-bench-pg-"))
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.log = self.base / "postgresql.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = None
            for name in ("postgres", "nobody"):
                try:
                    account = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if account is None:
                raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' account exists")
            self._run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [], "cwd": "/"}
            os.chown(self.base, account.pw_uid, account.pw_gid)
        self.sock.mkdir()
        if self._run_as:
            os.chown(self.sock, self._run_as["user"], self._run_as["group"])

    def _pg(self, tool: str, *args: str) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        subprocess.run(
            [str(self.bindir / tool), *args],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **self._run_as,
        )

    def start(self) -> TempPostgres:
        self._pg("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.sock} -c listen_addresses={self.host}"
        try:
            self._pg(
                "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60", "start"
            )
        except subprocess.CalledProcessError:
            if self.log.exists():
                print(self.log.read_text(errors="replace")[-4000:])
            raise
        return self

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def admin(self) -> Any:
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname="postgres")
        conn.autocommit = True
        return conn

    def create_database(self, name: str) -> str:
        conn = self.admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def drop_database(self, name: str) -> None:
        conn = self.admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()

    def url(self, database: str) -> str:
        return URL.create(
            "postgresql+psycopg2", username=self.user, host=self.host, port=self.port, database=database
        ).render_as_string(hide_password=False)

    def version(self) -> str:
        conn = self.admin()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                return str(cur.fetchone()[0])
        finally:
            conn.close()
