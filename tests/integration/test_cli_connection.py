"""``airflow-elspeth`` without ``--url`` reads the audit store of the connection defined in Airflow's
metadata DB (``airflow connections add``), as the tasks do, never the embedded default instead.

Airflow 3 consults the metadata DB for connections only in a process that declares itself a server
(``airflow connections get`` does so); the CLI does the same. Run as a fresh process against the
suite's migrated metadata DB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).with_name("airflow-elspeth")


def _env() -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k not in ("ELSPETH_AUDIT_URL", "_AIRFLOW_PROCESS_CONTEXT")},
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "COLUMNS": "200",
    }


@pytest.fixture
def audit_connection(airflow_metadata: str, tmp_path: Path) -> Iterator[Path]:
    """``elspeth_audit_default`` in the metadata DB, pointing at a SQLite file of this test."""
    path = tmp_path / "defined-in-airflow.db"
    airflow = [sys.executable, "-m", "airflow", "connections"]
    extra = json.dumps({"sqlalchemy_url": f"sqlite:///{path}"})
    subprocess.run(
        [*airflow, "add", "elspeth_audit_default", "--conn-type", "elspeth_audit", "--conn-extra", extra],
        env=_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    try:
        yield path
    finally:
        subprocess.run(
            [*airflow, "delete", "elspeth_audit_default"],
            env=_env(),
            check=True,
            capture_output=True,
            timeout=300,
        )


def test_the_cli_reads_the_connection_defined_in_the_metadata_db(audit_connection: Path) -> None:
    done = subprocess.run(
        [str(CLI), "verify", "--no-airflow-states"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sqlite:///{audit_connection} (connection elspeth_audit_default)" in done.stdout, done.stdout
    assert audit_connection.exists()  # its schema was created there, not in the embedded default
    report = subprocess.run(
        [str(CLI), "report", "--dag-id", "nothing_yet"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert f"No audit runs found in sqlite:///{audit_connection} (connection elspeth_audit_default)." in (
        report.stdout
    ), report.stdout
