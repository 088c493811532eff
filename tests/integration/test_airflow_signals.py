"""Airflow-native signals of a coalesce, with a real ``dag.test()`` run:

* the OpenLineage provider (apache-airflow-providers-openlineage, its listener enabled by a file
  transport) emits the coalesce's COMPLETE event (FAIL, when its failed rows are beyond the
  tolerance) with the run facet ``elspeth_coalesce`` (decision counts, failure reasons, missing
  branches) and the fork's with ``elspeth_fork``;
* the Asset event of the coalesce's outlet carries the summary in its extra (``elspeth_coalesce``),
  and ``read_merged_rows`` of that extra streams the merged rows, as an asset-scheduled DAG would;
  a failed coalesce emits no Asset event (Airflow emits them on success only).

The provider registers its listener when its plugin is imported, and only if a transport is
configured then, so the run happens in a fresh interpreter with the transport in its environment.
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
from airflow_elspeth.merged_rows import read_merged_rows

from .dags import elspeth_it_signals_dags as D

pytestmark = pytest.mark.integration

TESTS_DIR = Path(__file__).resolve().parents[1]

RUNNER = """
import json, sys
sys.path.insert(0, {tests_dir!r})
from airflow.models.asset import AssetEvent, AssetModel
from airflow.utils.session import create_session
from integration.dags import elspeth_it_signals_dags as D
from integration.support import patched_env, run_env

dag = D.build_dag({dag_id!r})
with patched_env(**run_env(dag.dag_id, {audit_url!r})):
    dag_run = dag.test()
states = {{ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}}
with create_session() as session:
    extras = [
        event.extra
        for event in session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
        .filter(AssetModel.uri == D.ASSET_URI, AssetEvent.source_run_id == dag_run.run_id)
    ]
# A file, not stdout: OpenLineage's adapter logs to stdout from its own thread, mid-line at times.
with open({result_path!r}, "w") as result:
    json.dump({{"states": states, "asset_extras": extras}}, result, default=str)
"""


def run_with_openlineage(
    tmp_path: Path, audit_url: str, dag_id: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the signals DAG with OpenLineage writing to a file; its result and the emitted events."""
    events_file = tmp_path / "openlineage.jsonl"
    env = {
        **os.environ,
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "elspeth-tests",
    }
    result_file = tmp_path / "result.json"
    script = RUNNER.format(
        tests_dir=str(TESTS_DIR), audit_url=audit_url, dag_id=dag_id, result_path=str(result_file)
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=TESTS_DIR
    )
    assert done.returncode == 0, done.stderr[-4000:]
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    return json.loads(result_file.read_text()), events


def task_end_event(events: list[dict[str, Any]], dag_id: str, task_id: str, kind: str) -> dict[str, Any]:
    found = [e for e in events if e["eventType"] == kind and e["job"]["name"] == f"{dag_id}.{task_id}"]
    assert len(found) == 1, [(e["eventType"], e["job"]["name"]) for e in events]
    return found[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("dag_id", "coalesce_state", "event_kind"),
    [(D.DAG_ID, "success", "COMPLETE"), (D.FAILING_DAG_ID, "failed", "FAIL")],
    ids=["tolerated", "beyond_tolerance"],
)
def test_openlineage_facets_and_asset_event_carry_what_the_coalesce_decided(
    airflow_metadata: str, sqlite_url: str, tmp_path: Path, dag_id: str, coalesce_state: str, event_kind: str
) -> None:
    result, events = run_with_openlineage(tmp_path, sqlite_url, dag_id)
    assert result["states"]["coalesce"] == coalesce_state, result["states"]

    coalesce_end = task_end_event(events, dag_id, "coalesce", event_kind)
    coalesce_facet = coalesce_end["run"]["facets"]["elspeth_coalesce"]
    failed = len(D.FAILING_ROWS)
    assert coalesce_facet["coalesce"] == "coalesce" and coalesce_facet["policy"] == "require_all"
    assert (coalesce_facet["rowsTotal"], coalesce_facet["rowsMerged"], coalesce_facet["rowsFailed"]) == (
        D.ROW_COUNT,
        D.ROW_COUNT - failed,
        failed,
    )
    assert coalesce_facet["rowsUndecided"] == 0
    assert coalesce_facet["failureReasons"] == {"branch_lost": failed}
    assert coalesce_facet["missingBranches"]["a"]["reasons"] == {"error:ValueError": failed}

    fork_facet = task_end_event(events, dag_id, "fork", "COMPLETE")["run"]["facets"]["elspeth_fork"]
    assert fork_facet["auditRunId"] == coalesce_facet["auditRunId"]
    assert (fork_facet["rowsTotal"], fork_facet["branches"]) == (D.ROW_COUNT, list(D.BRANCHES))

    if coalesce_state != "success":
        assert result["asset_extras"] == []
        return
    (extra,) = result["asset_extras"]
    summary = extra["elspeth_coalesce"]
    assert summary["audit_run_id"] == coalesce_facet["auditRunId"]
    assert (summary["rows_merged"], summary["rows_failed"]) == (D.ROW_COUNT - failed, failed)
    assert sorted(row["row_key"] for row in summary["failed_rows"]) == [f"r{n}" for n in D.FAILING_ROWS]
    merged = list(read_merged_rows(summary, engine=engine_for_url(sqlite_url)))
    assert sorted(row["a_value"] for row in merged) == [
        n for n in range(D.ROW_COUNT) if n not in D.FAILING_ROWS
    ]
