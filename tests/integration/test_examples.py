"""The examples of dags/ whose rows fail for a reason worth reading, as they are, through
``dag.test()`` on SQLite and PostgreSQL.

* An ordinary day: 38 of 40 customers merge; C0010 and C0030 fail ``branch_lost`` on
  ``address: error:AddressNotFound`` (within the tolerance), so the run succeeds and ``publish`` reads 38.
* An outage day: every address lookup times out, every row fails ``branch_lost`` on ``address:
  error:TimeoutError``, the coalesce fails and so does the DAG run. Cleared in place (what
  ``airflow backfill create --reprocess-behavior failed`` does to a failed run: ``clear_number`` + 1),
  the date runs again as a new audit run linked to the failed one, and succeeds; the failed run's
  record is unchanged and ``verify`` finds nothing.
* The mirrors: every package merges from the first mirror that has it; the one both lost fails
  ``all_branches_lost`` with both mirrors' errors (tolerated).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner

from airflow_elspeth import cli
from airflow_elspeth.audit.engine import engine_for_url

from .checks import audit_runs, check_coalesce, check_run_integrity, only_run, q, snapshot, ti_states, xcom
from .support import clear_and_drive, patched_env, run_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXAMPLES = Path(__file__).resolve().parents[2] / "dags"
BUNDLE = "elspeth-example-dags"
ENRICHMENT = "example_enrichment_require_all"
CUSTOMERS = [f"C{n:04d}" for n in range(1, 41)]
NOT_FOUND = ["C0010", "C0030"]


def example(dag_id: str) -> ModuleType:
    """The example's module, imported from its file once."""
    name = f"elspeth_example__{dag_id}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{dag_id}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def env(dag_id: str, audit_url: str) -> dict[str, str]:
    return run_env(dag_id, audit_url, folder=EXAMPLES, bundle=BUNDLE)


def verify(audit_url: str, dag_run: Any) -> str:
    """``airflow-elspeth verify`` of the DAG run; it must exit 0."""
    result = CliRunner().invoke(
        cli.main,
        ["--url", audit_url, "verify", "--dag-id", dag_run.dag_id, "--airflow-run-id", dag_run.run_id],
    )
    assert result.exit_code == 0, result.output
    return result.output


def day(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def decisions_of(engine: Any, run: dict[str, Any], coalesce: str = "enriched") -> dict[str, dict[str, Any]]:
    """The coalesce's decisions, once the run's invariants and the decisions' replay were checked."""
    check_run_integrity(engine, run["run_id"])
    return check_coalesce(engine, run, coalesce).decisions


def test_enrichment_an_ordinary_day_merges_all_but_two_unknown_addresses(
    audit_url: str, airflow_metadata: str
) -> None:
    dag = example(ENRICHMENT).dag
    with patched_env(**env(ENRICHMENT, audit_url)):
        dag_run = dag.test(logical_date=day("2026-11-02"))
    states = ti_states(dag_run)
    assert str(dag_run.state) == "success", states
    assert states["enriched"] == states["publish"] == "success", states

    engine = engine_for_url(audit_url)
    decisions = decisions_of(engine, only_run(engine, dag_run))
    assert sorted(decisions) == CUSTOMERS
    failed = {k: d for k, d in decisions.items() if d["decision"] != "merged"}
    assert sorted(failed) == NOT_FOUND
    for d in failed.values():
        assert (d["decision"], d["failure_reason"]) == ("failed", "branch_lost")
        # credit and churn arrived before the loss, or late after it: the order is the machine's
        assert dict(d["missing"])["address"] == "error:AddressNotFound", d
    assert xcom(dag_run, "publish") == 38
    summary = xcom(dag_run, "enriched", "coalesce_summary")
    assert summary["failure_reasons"] == {"branch_lost": 2}
    verify(audit_url, dag_run)


def test_enrichment_an_outage_day_fails_then_its_reprocessing_succeeds(
    audit_url: str, airflow_metadata: str
) -> None:
    module = example(ENRICHMENT)
    dag = module.dag
    outage = sorted(module.OUTAGE_DAYS)[0]
    with patched_env(**env(ENRICHMENT, audit_url)):
        dag_run = dag.test(logical_date=day(outage))
        states = ti_states(dag_run)
        assert str(dag_run.state) == "failed", states
        assert (states["enriched"], states["publish"]) == ("failed", "upstream_failed"), states
        assert states["enriched_finalize"] == "success", states

        engine = engine_for_url(audit_url)
        first = only_run(engine, dag_run)
        assert (first["clear_number"], first["status"]) == (0, "completed")
        decisions = decisions_of(engine, first)
        assert sorted(decisions) == CUSTOMERS
        for d in decisions.values():  # the readable reason, on every row
            assert (d["decision"], d["failure_reason"]) == ("failed", "branch_lost"), d
            assert dict(d["missing"])["address"] == "error:TimeoutError", d
        errors = q(
            engine,
            "SELECT error_json FROM node_states WHERE run_id = :r AND node_id = 'lookup_address'",
            r=first["run_id"],
        )
        messages = {(e["type"], e["message"]) for e in (json.loads(r["error_json"]) for r in errors)}
        assert messages == {("TimeoutError", "address-service: read timed out after 5 s")}, messages
        verify(audit_url, dag_run)
        before = snapshot(engine, first["run_id"])

        # What --reprocess-behavior failed does to this run: every task cleared, clear_number + 1.
        dag_run = clear_and_drive(dag, dag_run, ["load_customers"], downstream=True)
    states = ti_states(dag_run)
    assert str(dag_run.state) == "success", states
    assert states["enriched"] == states["publish"] == "success", states

    runs = audit_runs(engine, dag_run.dag_id, dag_run.run_id)
    assert [r["run_id"] for r in runs[:1]] == [first["run_id"]] and len(runs) == 2
    latest = runs[1]
    assert latest["previous_run_id"] == first["run_id"]
    assert (latest["try_number"], latest["clear_number"], latest["status"]) == (2, 1, "completed")
    decisions = decisions_of(engine, latest)
    assert sorted(k for k, d in decisions.items() if d["decision"] != "merged") == NOT_FOUND
    assert xcom(dag_run, "publish") == 38
    assert snapshot(engine, first["run_id"]) == before  # the failed try's record, as it was
    output = verify(audit_url, dag_run)
    assert "verified 2 audit runs" in output, output


def test_first_mirror_merges_every_package_a_mirror_still_has(audit_url: str, airflow_metadata: str) -> None:
    """19 packages merge from the first mirror that answered; pkg-15, lost on both, fails (tolerated)."""
    dag = example("example_first_mirror").dag
    with patched_env(**env(dag.dag_id, audit_url)):
        dag_run = dag.test()
    states = ti_states(dag_run)
    assert str(dag_run.state) == "success" and states["fetched"] == "success", states

    engine = engine_for_url(audit_url)
    decisions = decisions_of(engine, only_run(engine, dag_run), "fetched")
    assert len(decisions) == 20
    failed = {k: d for k, d in decisions.items() if d["decision"] != "merged"}
    assert sorted(failed) == ["pkg-15"]
    assert failed["pkg-15"]["failure_reason"] == "all_branches_lost"
    assert dict(failed["pkg-15"]["missing"]) == {
        "us": "error:FileNotFoundError",
        "eu": "error:FileNotFoundError",
    }
    verify(audit_url, dag_run)
