"""Metrics: what the provider's tasks and trigger decided, sent through Airflow's own metrics.

A shell: it turns the records the audit layer and the branch runtime return (a pass's
:class:`~airflow_elspeth.audit.coalesce.DecidedRows`, a branch try's
:class:`~airflow_elspeth.runtime.branch.StepTally`) into calls of Airflow's metrics facility,
``airflow.sdk.observability.stats``, the one the Task SDK's own ``ti.start`` / ``ti.finish`` go
through. Airflow configures it (``[metrics] statsd_on``, ``statsd_datadog_enabled`` or ``otel_on``,
the prefix, ``metrics_allow_list`` / ``metrics_block_list``, ``stat_name_handler``) and initialises
it in every process a metric can come from here: the task runner (a supervised task, and
``dag.test()``) and the triggerer (``airflow.sdk.serde``, which the triggerer imports before it
forks its trigger runner). With metrics off it is Airflow's ``NoStatsLogger``.

Counters count events once: a pass reports only the decisions it wrote (each row is decided once,
whichever process decides it and however often a pass runs), a branch try only the results it wrote
and kept. Names and tags: README, "Metrics"; why counters of deltas: docs/ARCHITECTURE.md, "Metrics".
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from airflow.sdk.observability import stats as airflow_stats

if TYPE_CHECKING:
    from airflow_elspeth.audit.service import PassResult
    from airflow_elspeth.runtime.branch import StepTally

# Every name, under Airflow's own prefix ([metrics] statsd_prefix / otel_prefix, "airflow").
COALESCE_ROWS_MERGED = "elspeth.coalesce.rows_merged"
COALESCE_ROWS_FAILED = "elspeth.coalesce.rows_failed"
COALESCE_ROWS_RESOLVED = "elspeth.coalesce.rows_resolved"
COALESCE_ROWS_REOPENED = "elspeth.coalesce.rows_reopened"
COALESCE_LATE_ARRIVALS = "elspeth.coalesce.late_arrivals"
COALESCE_DECISION_LATENCY = "elspeth.coalesce.decision_latency"
COALESCE_ROWS_UNDECIDED = "elspeth.coalesce.rows_undecided"
BRANCH_ROWS_COMPLETED = "elspeth.branch.rows_completed"
BRANCH_ROWS_LOST = "elspeth.branch.rows_lost"
BRANCH_ROWS_LATE = "elspeth.branch.rows_late"
BRANCH_ROWS_SKIPPED = "elspeth.branch.rows_skipped"
FORK_ROWS = "elspeth.fork.rows"

# A failure reason that is a resolution: the coalesce task ended with the row undecidable.
_RESOLUTION_PREFIX = "coalesce_task_"


class StatsSink(Protocol):
    """What the translation calls: Airflow's ``airflow.sdk.observability.stats`` (a test's fake)."""

    def incr(
        self, stat: str, count: int | None = None, rate: float | None = None, *, tags: Any = None
    ) -> None:
        """Add ``count`` to a counter."""

    def gauge(
        self,
        stat: str,
        value: float,
        rate: float | None = None,
        delta: bool | None = None,
        *,
        tags: Any = None,
    ) -> None:
        """Set a gauge."""

    def timing(self, stat: str, dt: Any, *, tags: Any = None) -> None:
        """Record one observation of a timer (a histogram under OpenTelemetry)."""


def _tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Tag values as Airflow normalises metric names: characters other than letters, digits and
    ``_ . -`` become ``_`` (``error:ValueError`` -> ``error_ValueError``). StatsD's line protocol,
    which carries the tags with ``statsd_influxdb_enabled``, ends a name at its first ``:``."""
    return {
        key: airflow_stats.normalize_name_for_stats(value, log_warning=False) for key, value in tags.items()
    }


def coalesce_tags(dag_id: str, task_id: str, policy: str) -> dict[str, str]:
    """The tags of every coalesce metric.

    :param dag_id: the coalesce's DAG.
    :param task_id: the coalesce task.
    :param policy: its policy (``require_all``, ``quorum``, ``best_effort``, ``first``).
    """
    return {"dag_id": dag_id, "task_id": task_id, "policy": policy}


def coalesce_pass(
    result: PassResult, tags: Mapping[str, str], *, reopened: int = 0, sink: StatsSink = airflow_stats
) -> None:
    """One coalesce pass: the rows it decided (merged; failed per reason; resolved per reason), the
    late arrivals its decisions recorded, each decided row's latency from its first arrival, the
    rows it reopened first, and the rows still undecided after it (a gauge).

    :param result: the pass (:meth:`~airflow_elspeth.audit.service.CoalesceService.decide`,
        ``poll`` or ``finalize``).
    :param tags: :func:`coalesce_tags`.
    :param reopened: rows an earlier try's end had resolved that this try reopened.
    :param sink: where the metrics go (Airflow's stats; a test's fake).
    """
    decided = result.decided
    base = _tags(tags)
    if decided.merged:
        sink.incr(COALESCE_ROWS_MERGED, decided.merged, tags=base)
    for reason, rows in decided.failed.items():
        tagged = {**base, **_tags({"reason": reason})}
        sink.incr(COALESCE_ROWS_FAILED, rows, tags=tagged)
        if reason.startswith(_RESOLUTION_PREFIX):
            sink.incr(COALESCE_ROWS_RESOLVED, rows, tags=tagged)
    if decided.late_arrivals:
        sink.incr(COALESCE_LATE_ARRIVALS, decided.late_arrivals, tags=base)
    if reopened:
        sink.incr(COALESCE_ROWS_REOPENED, reopened, tags=base)
    for wait_ms in decided.waits_from_first_arrival_ms:
        sink.timing(COALESCE_DECISION_LATENCY, timedelta(milliseconds=wait_ms), tags=base)
    sink.gauge(COALESCE_ROWS_UNDECIDED, max(0, result.rows_total - result.rows_decided), tags=base)


def branch_try(tally: StepTally, tags: Mapping[str, str], *, sink: StatsSink = airflow_stats) -> None:
    """One try of a branch step: the results it wrote and kept (a try that hit its failure threshold
    keeps none of its failures: its retry processes those rows again).

    :param tally: the try's :meth:`~airflow_elspeth.runtime.branch.BranchRuntime.tally`.
    :param tags: ``dag_id``, ``task_id`` (the step) and ``branch``.
    :param sink: where the metrics go.
    """
    base = _tags(tags)
    if tally.completed:
        sink.incr(BRANCH_ROWS_COMPLETED, tally.completed, tags=base)
    for reason, rows in tally.lost.items():
        sink.incr(BRANCH_ROWS_LOST, rows, tags={**base, **_tags({"reason": reason})})
    if tally.late:
        sink.incr(BRANCH_ROWS_LATE, tally.late, tags=base)
    if tally.skipped:
        sink.incr(BRANCH_ROWS_SKIPPED, tally.skipped, tags=base)


def fork_rows(rows: int, tags: Mapping[str, str], *, sink: StatsSink = airflow_stats) -> None:
    """A fork try that completed: the source rows it forked.

    :param rows: the audit run's ``rows_total``.
    :param tags: ``dag_id`` and ``task_id`` (the fork).
    :param sink: where the metrics go.
    """
    sink.incr(FORK_ROWS, rows, tags=_tags(tags))
