"""The pure core, the audit store and the task runtimes never import Airflow; neither does the CLI
unless it must.

Each check runs in a fresh interpreter (this test process has long since imported Airflow) and
reports which ``airflow`` modules ended up in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

_REPORT = textwrap.dedent(
    """
    import json, os, sys
    print(json.dumps({
        "airflow": sorted(m for m in sys.modules if m == "airflow" or m.startswith("airflow.")),
        "logging_level_set": "AIRFLOW__LOGGING__LOGGING_LEVEL" in os.environ,
        "imported": sorted(m for m in sys.modules if m.startswith("airflow_elspeth")),
    }))
    """
)


def _run(code: str, tmp_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW__LOGGING__LOGGING_LEVEL"}
    env["AIRFLOW_HOME"] = str(tmp_path / "airflow_home")  # never the developer's own
    proc = subprocess.run(
        [sys.executable, "-c", code + _REPORT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def test_core_audit_and_runtime_modules_import_without_airflow(tmp_path: Path) -> None:
    report = _run(
        textwrap.dedent(
            """
            import importlib, pkgutil
            import airflow_elspeth.audit, airflow_elspeth.core, airflow_elspeth.runtime
            for package in (airflow_elspeth.core, airflow_elspeth.audit, airflow_elspeth.runtime):
                for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                    importlib.import_module(info.name)
            """
        ),
        tmp_path,
    )
    assert "airflow_elspeth.audit.engine" in report["imported"]
    assert "airflow_elspeth.core.policy" in report["imported"]
    assert "airflow_elspeth.core.vocabulary" in report["imported"]
    assert "airflow_elspeth.runtime.branch" in report["imported"]
    for read_model in (
        "cache",
        "decisions",
        "errors",
        "index",
        "limbo",
        "lineage",
        "rows",
        "runs",
        "sql",
        "tasks",
        "verify",
        "work",
    ):
        assert f"airflow_elspeth.audit.read.{read_model}" in report["imported"]
    assert report["airflow"] == [], "airflow_elspeth.core / .audit / .runtime imported Airflow"


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--url", "{url}", "report"],
        ["--url", "{url}", "verify", "--no-airflow-states"],
        # Airflow states by default, but no audit run to look them up for: Airflow stays unimported.
        ["--url", "{url}", "verify"],
        ["--url", "{url}", "explain", "no-such-row"],
        ["--url", "{url}", "db", "upgrade"],
    ],
    ids=["help", "report", "verify", "verify-nothing-to-look-up", "explain", "db-upgrade"],
)
def test_cli_with_url_runs_without_airflow(tmp_path: Path, args: list[str]) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    argv = ["airflow-elspeth", *(a.format(url=url) for a in args)]
    report = _run(
        textwrap.dedent(
            f"""
            import runpy, sys
            sys.argv = {argv!r}
            try:
                runpy.run_module("airflow_elspeth.cli", run_name="__main__")  # python -m
            except SystemExit as exit:
                if exit.code not in (0, None) and "explain" not in sys.argv:  # no such row: exit 1
                    raise
            """
        ),
        tmp_path,
    )
    assert "airflow_elspeth.audit.read.verify" in report["imported"]  # the CLI did load
    assert "airflow_elspeth.airflow_states" not in report["imported"]
    assert report["airflow"] == [], f"airflow-elspeth {' '.join(args)} imported Airflow"
    assert report["logging_level_set"] is False  # no os.environ mutation on import
