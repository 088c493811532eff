"""One audit store per fork, under ``dag.test()``: a fork that names its audit connection while the
default connection points elsewhere. Its branch steps (one mapped), its coalesce and its finalizer
name none, so they use the fork's store: the run succeeds, every row is decided there, and the
default store is never touched. ``airflow-elspeth verify`` finds the run in the fork's store when
told which (``--conn-id``), and says which store it read when it finds nothing in the default one.

The fork's store is the parametrized ``audit_url`` (SQLite or PostgreSQL); the default is a SQLite
file of the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from airflow_elspeth.audit.engine import engine_for_url

from .checks import check_coalesce, check_run_integrity, only_run, ti_states
from .dags import elspeth_it_store_dags as D
from .support import patched_env, run_env

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).with_name("airflow-elspeth")


def connection_env(conn_id: str, url: str) -> dict[str, str]:
    """An Airflow connection of type ``elspeth``, defined the way deployments do: AIRFLOW_CONN_<ID>."""
    value = json.dumps({"conn_type": "elspeth", "extra": {"sqlalchemy_url": url}})
    return {f"AIRFLOW_CONN_{conn_id.upper()}": value}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``airflow-elspeth ARGS`` as an operator runs it, with the run's connections defined."""
    full = {**os.environ, **env, "COLUMNS": "300"}
    full.pop("ELSPETH_AUDIT_URL", None)
    return subprocess.run([str(CLI), *args], env=full, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(300)
def test_only_the_forks_store_is_written_when_only_the_fork_names_it(
    audit_url: str, run_dag: Any, tmp_path: Path
) -> None:
    default = tmp_path / "default-store.db"
    default_url = f"sqlite:///{default}"
    store = connection_env(D.STORE_CONN, audit_url)
    with patched_env(**store):
        dag_run = run_dag(D.build_dag(), default_url)

    states = ti_states(dag_run)
    assert str(dag_run.state) == "success", states
    assert set(states.values()) == {"success"}, states
    assert {k for k in states if k.startswith("ask_b[")} == {"ask_b[0]", "ask_b[1]", "ask_b[2]"}

    engine = engine_for_url(audit_url)
    run = only_run(engine, dag_run)
    assert run["status"] == "completed" and run["rows_total"] == D.ROW_COUNT, run
    check_run_integrity(engine, run["run_id"])  # every token one terminal outcome
    view = check_coalesce(engine, run)  # every row decided, each decision its log's replay
    assert view.per_row() == {f"r{n}": "merged" for n in range(D.ROW_COUNT)}
    # No task resolved the default store: its SQLite file was never even created.
    assert not default.exists(), "a task of the fork wrote to (or opened) the default audit store"

    # verify, per store: the fork's names its run; the default says which store it read, and that
    # it found nothing there.
    env = {**run_env(D.DAG_ID, default_url), **store}
    found = cli(env, "--conn-id", D.STORE_CONN, "verify", "--dag-id", D.DAG_ID)
    assert found.returncode == 0, found.stdout + found.stderr[-3000:]
    assert "verified 1 audit run: no findings" in found.stdout, found.stdout
    nothing = cli(env, "verify", "--dag-id", D.DAG_ID)
    assert nothing.returncode == 0, nothing.stdout + nothing.stderr[-3000:]
    assert (
        f"verified 0 audit runs in {default_url} (connection elspeth_audit_default): no findings"
        in nothing.stdout
    ), nothing.stdout
