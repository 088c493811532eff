"""OpenLineage run facets of the fork and the coalesce, for ``apache-airflow-providers-openlineage``.

The provider's listener calls ``get_openlineage_facets_on_complete`` / ``_on_failure`` on an operator
once its task ended (airflow/providers/openlineage/extractors/base.py). The coalesce answers with a
run facet ``elspeth_coalesce`` (decision counts, failure reasons, missing branches and why), the fork
with ``elspeth_fork`` (its audit run, rows and branches), so a lineage backend shows per run what a
join lost without opening the audit store. Imported only from those methods: the provider is
optional.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.providers.openlineage.extractors import OperatorLineage
from attrs import define
from openlineage.client.facet_v2 import RunFacet

COALESCE_FACET = "elspeth_coalesce"
FORK_FACET = "elspeth_fork"


@define
class ElspethCoalesceRunFacet(RunFacet):
    """What a coalesce decided, from its ``coalesce_summary``."""

    auditRunId: str
    coalesce: str
    policy: str
    merge: str
    rowsTotal: int
    rowsMerged: int
    rowsFailed: int
    rowsUndecided: int
    lateArrivals: int
    failureReasons: dict[str, int]
    missingBranches: dict[str, Any]


@define
class ElspethForkRunFacet(RunFacet):
    """What a fork recorded, from its ``audit_run`` reference."""

    auditRunId: str
    branches: list[str]
    rowsTotal: int
    chunksTotal: int


def coalesce_lineage(summary: Mapping[str, Any] | None) -> OperatorLineage:
    """The coalesce's lineage: its run facet, or nothing when it wrote no summary (it never decided)."""
    if not summary:
        return OperatorLineage()
    facet = ElspethCoalesceRunFacet(
        auditRunId=summary["audit_run_id"],
        coalesce=summary["coalesce"],
        policy=summary["policy"],
        merge=summary["merge"],
        rowsTotal=summary["rows_total"],
        rowsMerged=summary["rows_merged"],
        rowsFailed=summary["rows_failed"],
        rowsUndecided=summary["rows_undecided"],
        lateArrivals=summary["late_arrivals"],
        failureReasons=dict(summary["failure_reasons"]),
        missingBranches=dict(summary["missing_branches"]),
    )
    return OperatorLineage(run_facets={COALESCE_FACET: facet})


def fork_lineage(ref: Mapping[str, Any] | None) -> OperatorLineage:
    """The fork's lineage: its run facet, or nothing when the try recorded no audit run."""
    if not ref:
        return OperatorLineage()
    facet = ElspethForkRunFacet(
        auditRunId=ref["audit_run_id"],
        branches=list(ref["branches"]),
        rowsTotal=ref["rows_total"],
        chunksTotal=ref["chunks_total"],
    )
    return OperatorLineage(run_facets={FORK_FACET: facet})
