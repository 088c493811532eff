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

from airflow_elspeth.hooks.audit import CONN_TYPE, LEGACY_CONN_TYPE

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).with_name("airflow-elspeth")


def _env() -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k not in ("ELSPETH_AUDIT_URL", "_AIRFLOW_PROCESS_CONTEXT")},
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "COLUMNS": "200",
    }


@pytest.fixture(params=[CONN_TYPE, LEGACY_CONN_TYPE])
def audit_connection(airflow_metadata: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """``elspeth_audit_default`` in the metadata DB, pointing at a SQLite file of this test: added as
    the README says, or of the type's former name, as a deployment of 0.1 has it (``--conn-json``:
    ``--conn-type`` takes only registered types, and turns others into ``generic``)."""
    path = tmp_path / "defined-in-airflow.db"
    airflow = [sys.executable, "-m", "airflow", "connections"]
    extra = {"sqlalchemy_url": f"sqlite:///{path}"}
    if request.param == CONN_TYPE:
        how = ["--conn-type", CONN_TYPE, "--conn-extra", json.dumps(extra)]
    else:
        how = ["--conn-json", json.dumps({"conn_type": request.param, "extra": extra})]
    subprocess.run(
        [*airflow, "add", "elspeth_audit_default", *how],
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


def test_the_cli_reads_the_connection_defined_in_the_metadata_db(
    audit_connection: Path, request: pytest.FixtureRequest
) -> None:
    done = subprocess.run(
        [str(CLI), "verify", "--no-airflow-states"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Airflow's warning about '_' in the connection's URI scheme, on every lookup: not for the
    # connection type; for its former name, with ours once saying how to end it.
    output = done.stdout + done.stderr
    former = request.node.callspec.params["audit_connection"] == LEGACY_CONN_TYPE
    assert ("shall not contain '_'" in output) is former, output
    assert output.count("has the type 'elspeth_audit', the former name of 'elspeth'") == int(former), output
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
