"""``airflow-elspeth``: read the audit trail from a terminal.

``report`` (coalesce summaries), ``explain`` (one row's lineage and its decision replayed from the
event log), ``verify`` (integrity sweep, limbo included; exits non-zero on any finding) and
``db upgrade``. Every command reads the configured audit store (the embedded SQLite file when
nothing is configured), takes ``--json``, and writes nothing except ``db upgrade``.

``report`` and ``verify`` may also read the fork and coalesce task states from Airflow's metadata DB
(read-only, when Airflow is configured here; ``--airflow-states/--no-airflow-states``): the only read
of Airflow's own database anywhere in the provider. The checks themselves (audit layer) take those
states as a plain mapping.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from rich.tree import Tree
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.read.decisions import run_summaries
from airflow_elspeth.audit.read.errors import error_groups
from airflow_elspeth.audit.read.index import index_runs
from airflow_elspeth.audit.read.limbo import TaskStates, tasks_to_look_up
from airflow_elspeth.audit.read.lineage import explain_row
from airflow_elspeth.audit.read.records import (
    AuditRun,
    AuditRunTry,
    BranchParentsMissing,
    CoalesceSummary,
    ConsumedTokensMissing,
    DecidableResolutions,
    DecisionsDifferFromReplay,
    ErrorGroup,
    Explanation,
    Finding,
    IndexedRun,
    MergedTokensMissing,
    MergedTokensWithoutDecision,
    MissingBranch,
    RowsUndecided,
    RunNotClosed,
    SourceTokensMissing,
    TokensWithoutOutcome,
    to_json,
)
from airflow_elspeth.audit.read.runs import RunSelection, count_runs, row_runs, select_runs, with_tries
from airflow_elspeth.audit.read.verify import verify_run
from airflow_elspeth.core.vocabulary import (
    DecisionStatus,
    NodeStatus,
    RunStatus,
    TokenKind,
    TokenOutcome,
    collision_rule_text,
    outcome_label,
    policy_text,
    reason_order,
)
from airflow_elspeth.exceptions import AirflowStatesUnavailable, NotFound

console = Console()


def _make_console() -> Console:
    """The console of one invocation: ``COLUMNS`` (when set) is its width, read at each call."""
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) > 0 else None)


@dataclass
class Target:
    """Where the commands read: ``--url`` beats ``--conn-id`` beats the provider's default."""

    url: str | None
    conn_id: str | None
    # What was read, for the messages that report nothing found ("no audit runs in ...").
    where: str = "the audit store"

    def engine(self, *, upgrade: bool = True) -> Engine:
        if self.url:
            self.where = make_url(self.url).render_as_string(hide_password=True)
            return engine_for_url(self.url, upgrade=upgrade)
        from airflow_elspeth.airflow_states import quiet_airflow

        quiet_airflow()  # the hook imports Airflow
        # A terminal command reads connections from Airflow's metadata DB as well as from the
        # environment, as ``airflow connections get`` does: Airflow 3 consults the metadata DB only
        # in a process that declares itself a server; otherwise a connection defined there would be
        # missed and the embedded default read instead.
        os.environ.setdefault("_AIRFLOW_PROCESS_CONTEXT", "server")
        from airflow_elspeth.hooks.audit import ElspethAuditHook

        hook = ElspethAuditHook(audit_conn_id=self.conn_id)
        url = hook.get_url()
        used = hook.resolved_conn_id
        self.where = f"{url.render_as_string(hide_password=True)} " + (
            f"(connection {used})" if used else "(the embedded SQLite default)"
        )
        return engine_for_url(url, upgrade=upgrade)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(to_json(value), indent=2, default=str, sort_keys=False))


@click.group()
@click.option("--url", envvar="ELSPETH_AUDIT_URL", help="SQLAlchemy URL of the audit store.")
@click.option("--conn-id", help="Airflow connection id of the audit store.")
@click.pass_context
def main(ctx: click.Context, url: str | None, conn_id: str | None) -> None:
    """Read the airflow-elspeth audit trail: what each coalesce decided, for which rows, and why."""
    # Migration and connection chatter belongs in task logs, not in a terminal report.
    for noisy in ("alembic", "airflow.task.hooks.airflow_elspeth"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    global console
    console = _make_console()
    ctx.obj = Target(url=url, conn_id=conn_id)


# -- selecting runs ---------------------------------------------------------------------------------


def _not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An id option given an empty value is a mistake (an unset shell variable), not "any"."""
    if value is not None and not value.strip():
        raise click.BadParameter("is empty: give an id or leave the option out")
    return value


def run_options(func: Any) -> Any:
    for option in (
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables."),
        click.option(
            "--airflow-run-id", callback=_not_empty, help="Only audit runs of this Airflow DAG run."
        ),
        click.option("--dag-id", callback=_not_empty, help="Only audit runs of this DAG."),
        click.option(
            "--run-id", callback=_not_empty, help="One audit run (its id, as in the coalesce summary)."
        ),
    ):
        func = option(func)
    return func


# -- report -----------------------------------------------------------------------------------------


def airflow_states_option(purpose: str) -> Any:
    return click.option(
        "--airflow-states/--no-airflow-states",
        "airflow_states",
        default=None,
        help=(
            f"Read fork and coalesce task states from Airflow's metadata DB, {purpose}. Default: "
            "when Airflow's metadata DB is configured and readable. Reading them imports Airflow (to "
            "find that DB), and only then: with --no-airflow-states, or with no audit run to read, "
            "--url never imports Airflow."
        ),
    )


class LogicalDate(click.ParamType):
    """An ISO 8601 date or date-time (without a zone: UTC), as an aware UTC datetime."""

    name = "date"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(
                f"{value!r} is not an ISO 8601 date or date-time (such as 2026-11-27, "
                "2026-11-27T05:00 or 2026-11-27T05:00:00+02:00)",
                param,
                ctx,
            )
        return (
            parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)
        )


@main.command()
@run_options
@airflow_states_option("to show each coalesce task's state")
@click.option(
    "--since",
    type=LogicalDate(),
    help="Only audit runs whose logical date is at or after this (inclusive). An ISO 8601 date or "
    "date-time; without a zone, UTC. Audit runs without a logical date are left out.",
)
@click.option(
    "--until",
    type=LogicalDate(),
    help="Only audit runs whose logical date is before this (exclusive): --since 2026-11-27 "
    "--until 2026-11-28 is one day. Same format as --since.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Only the newest N audit runs by logical date (of those selected); says how many were left out.",
)
@click.option(
    "--compact",
    is_flag=True,
    help="One line per audit run: logical date, DAG, fork try, merged/failed/undecided rows per "
    "coalesce and the worst state (with --json: the UI index's entries).",
)
@click.pass_obj
def report(
    target: Target,
    run_id: str | None,
    dag_id: str | None,
    airflow_run_id: str | None,
    as_json: bool,
    airflow_states: bool | None,
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
    compact: bool,
) -> None:
    """Coalesce summaries of every audit run (or the selected ones), by logical date then fork try;
    an earlier try of a fork in the same DAG run is marked superseded; with Airflow task states, the
    coalesce task's state."""
    try:
        selection = RunSelection(
            run_id=run_id, dag_id=dag_id, airflow_run_id=airflow_run_id, since=since, until=until
        )
    except ValueError as err:  # the one way it can be wrong here: the options' times are aware
        raise click.BadParameter(str(err), param_hint="'--until'") from None
    engine = target.engine()
    runs = with_tries(engine, select_runs(engine, selection, limit=limit))
    left_out = 0
    if limit is not None and len(runs) == limit:
        left_out = count_runs(engine, selection) - limit
    task_states, states_note = _task_states_for(airflow_states, runs, engine)
    left_out_note = f"{_plural(left_out, 'older audit run')} left out (--limit {limit})." if left_out else ""
    indexed: list[IndexedRun] = []
    errors: dict[str, list[dict[str, Any]]] = {}
    found: list[dict[str, Any]] = []
    if compact:
        indexed = index_runs(engine, runs, read_task_states=lambda _wanted: task_states)
    else:
        errors = {run.audit_run_id: error_groups(engine, [run.audit_run_id]) for run in runs}
        found = [
            {
                "run": _run_header(run),
                "coalesce_task_state": _task_state(task_states, run, summary.coalesce),
                "summary": summary,
                "errors": errors[run.audit_run_id],
            }
            for run, summary in run_summaries(engine, runs)
        ]
    if as_json:
        _emit_json(indexed if compact else found)
        if left_out_note:  # stdout stays JSON
            click.echo(left_out_note, err=True)
        return
    if compact:
        _print_compact(target, indexed, states_note["detail"], left_out_note)
        return
    if not runs:
        console.print(f"No audit runs found in {escape(target.where)}.", soft_wrap=True)
        return
    console.print(f"Airflow task states: {escape(states_note['detail'])}", soft_wrap=True)
    if left_out_note:
        console.print(escape(left_out_note), soft_wrap=True)
    summarised = {item["run"]["run_id"] for item in found}
    for run in runs:
        for item in found:
            if item["run"]["run_id"] == run.audit_run_id:
                print_summary(run, item["summary"], item["coalesce_task_state"])
        if run.audit_run_id not in summarised:
            reason = f": {run.status_reason}" if run.status_reason else ""
            _rule("no coalesce", [run.dag_id, run.airflow_run_id])
            console.print(
                escape(
                    _fit(
                        [
                            f"audit run {run.audit_run_id}",
                            _try_text(run),
                            f"{run.status}{reason}, no coalesce registered",
                        ]
                    )
                )
            )
    if any(errors.values()):
        _print_error_groups(error_groups(engine, [run.audit_run_id for run in runs]), len(runs))


# The columns of ``report --compact``: what each may shrink to when the line is wider than the console.
_COMPACT_HEADER = ("logical date", "DAG", "try", "coalesces", "state")
_COMPACT_MIN = (0, 8, 0, 10, 0)


def _print_compact(target: Target, runs: list[IndexedRun], states: str, left_out: str) -> None:
    """``report --compact``: one line per audit run, as wide as the console at most (the DAG and
    the coalesces give way, cut with an ellipsis)."""
    if not runs:
        console.print(f"No audit runs found in {escape(target.where)}.", soft_wrap=True)
        return
    console.print(f"Airflow task states: {escape(states)}", soft_wrap=True)
    if left_out:
        console.print(escape(left_out), soft_wrap=True)
    console.print(
        escape(
            _fit(
                [
                    "Logical dates in UTC.",
                    "Per coalesce: rows merged/failed/undecided.",
                    "State: the worst of its coalesces.",
                ],
                sep=" ",
            )
        )
    )
    lines = [list(_COMPACT_HEADER)]
    for run in runs:
        counts = ", ".join(
            f"{o.coalesce} {o.merged}/{o.failed}/{'-' if o.undecided is None else o.undecided}"
            for o in run.outcomes
        )
        logical = run.logical_date.strftime("%Y-%m-%d %H:%M") if run.logical_date is not None else "-"
        lines.append([logical, run.dag_id, str(run.try_number), counts or "-", run.verdict])
    widths = [max(len(line[i]) for line in lines) for i in range(len(_COMPACT_HEADER))]
    excess = sum(widths) + 2 * (len(widths) - 1) - console.width
    for i in (1, 3):  # the DAG first, then the coalesces
        cut = min(max(excess, 0), widths[i] - _COMPACT_MIN[i])
        widths[i] -= max(cut, 0)
        excess -= max(cut, 0)
    for n, line in enumerate(lines):
        cells = [
            text.rjust(width)
            if i == 2
            else (text if len(text) <= width else text[: width - 1] + "…").ljust(width)
            for i, (text, width) in enumerate(zip(line, widths, strict=True))
        ]
        text = "  ".join(cells).rstrip()
        console.print(f"[bold]{escape(text)}[/]" if n == 0 else escape(text), soft_wrap=True)


def _print_error_groups(groups: list[ErrorGroup], runs: int) -> None:
    """Row errors of every listed audit run, one line per fingerprint (the same error)."""
    _title(f"Row errors by fingerprint, across {_plural(runs, 'audit run')}")
    table = Table(header_style="bold")
    for column in ("fingerprint", "reason", "rows", "runs", "branches", "message (shape)"):
        table.add_column(column, justify="right" if column in ("rows", "runs") else "left")
    for group in groups:
        table.add_row(
            group.error_hash[:12],
            escape(group.reason),
            str(group.rows),
            str(len(group.audit_runs)),
            escape(", ".join(group.branches)),
            escape(group.message_shape),
        )
    if _fits(table):
        console.print(table)
        return
    for group in groups:  # one error a block: a reason or a message is never cut
        console.print(
            escape(
                _fit(
                    [
                        f"{group.error_hash[:12]} {group.reason}",
                        _plural(group.rows, "row"),
                        _plural(len(group.audit_runs), "audit run"),
                        "branch " + ", ".join(group.branches),
                    ]
                )
            )
        )
        console.print(f"  {escape(group.message_shape)}")


def _task_state(task_states: TaskStates | None, run: AuditRun, task_id: str) -> str | None:
    """A task's Airflow state in the DAG run of ``run``; ``None`` when states were not read or
    Airflow has no such task instance (a deleted DAG run)."""
    if task_states is None:
        return None
    return task_states.get((run.dag_id, run.airflow_run_id, task_id))


def _run_header(run: AuditRunTry) -> dict[str, Any]:
    return {
        "run_id": run.audit_run_id,
        "dag_id": run.dag_id,
        "airflow_run_id": run.airflow_run_id,
        "fork_task_id": run.fork_task_id,
        "try_number": run.try_number,
        "status": run.status,
        "status_reason": run.status_reason,
        "rows_total": run.rows_total,
        "previous_run_id": run.previous_run_id,
        "logical_date": run.logical_date,
        "current": run.current,
        "superseded_by_try": run.superseded_by_try,
    }


def _plural(n: int, word: str, plural: str | None = None) -> str:
    """``1 row``, ``2 rows`` (``plural`` when adding an s is wrong)."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _fit(phrases: list[str], *, indent: str = "", sep: str = " · ") -> str:
    """Phrases joined by ``sep``, as many to a line as fit the console: a line breaks only between
    two phrases, never inside one."""
    lines: list[str] = []
    for phrase in (p for p in phrases if p):
        if lines and len(lines[-1]) + len(sep) + len(phrase) <= console.width:
            lines[-1] += sep + phrase
        else:
            lines.append(indent + phrase)
    return "\n".join(lines)


def _rule(title: str, context: list[str], *, title_first: bool = False) -> None:
    """A rule titled ``context · title`` (``title · context``), or, when that does not fit, titled
    ``title`` with the context below it."""
    whole = " · ".join([title, *context] if title_first else [*context, title])
    if len(whole) + 6 <= console.width:
        console.rule(f"[bold]{escape(whole)}[/]")
    else:
        console.rule(f"[bold]{escape(title)}[/]")
        console.print(escape(_fit(context)), style="bold")


def _try_text(run: AuditRunTry) -> str:
    text = f"fork {run.fork_task_id}, try {run.try_number}"
    if run.superseded_by_try:
        return text + f" (superseded by try {run.superseded_by_try})"
    return text


def _fits(renderable: Any) -> bool:
    """Whether ``renderable`` fits the console without shrinking a column."""
    wide = console.options.update_width(100_000)
    return bool(Measurement.get(console, wide, renderable).maximum <= console.width)


def _title(text: str) -> None:
    """A table's title, on its own line (a table title wraps to the table's width)."""
    console.print(f"\n[bold]{escape(text)}[/]")


def print_summary(run: AuditRunTry, summary: CoalesceSummary, task_state: str | None = None) -> None:
    """One coalesce's summary; ``task_state``: its task's Airflow state, when read."""
    policy = policy_text(summary.policy, len(summary.expected_branches), summary.quorum)
    merge = summary.merge + (f" ({summary.select_branch})" if summary.select_branch else "")
    _rule(f"coalesce {summary.coalesce}", [run.dag_id, run.airflow_run_id])
    logical = run.logical_date
    console.print(
        escape(
            _fit(
                [
                    f"audit run {summary.audit_run_id}",
                    _try_text(run),
                    f"logical date {logical.isoformat()}" if logical is not None else "",
                    f"policy {policy}",
                    f"merge {merge}",
                    f"deadline {summary.deadline}",
                    f"coalesce task {task_state}" if task_state is not None else "",
                ]
            )
        )
    )
    if run.status != RunStatus.COMPLETED:
        reason = f": {run.status_reason}" if run.status_reason else ""
        console.print(f"[yellow]audit run {run.status}{escape(reason)}[/]")
    counts = Table(show_header=True, header_style="bold")
    for column in ("rows", "merged", "failed", "undecided", "late arrivals"):
        counts.add_column(column, justify="right")
    undecided = summary.rows_undecided
    counts.add_row(
        str(summary.rows_total),
        f"[green]{summary.rows_merged}[/]",
        f"[red]{summary.rows_failed}[/]" if summary.rows_failed else "0",
        f"[yellow]{undecided}[/]" if undecided else "0",
        str(summary.late_arrivals),
    )
    console.print(counts)
    if summary.missing_branches:
        _print_missing(summary.missing_branches)
    if summary.field_collisions:
        _title(f"Union field collisions ({collision_rule_text(summary.on_collision)})")
        clashes = Table(header_style="bold")
        for column in ("field", "rows", "supplied by"):
            clashes.add_column(column)
        for field_name, clash in summary.field_collisions.items():
            clashes.add_row(escape(field_name), str(clash.rows), escape(", ".join(clash.branches)))
        console.print(clashes)
    if summary.failure_reasons:
        _title("Failed rows by reason")
        reasons_table = Table(header_style="bold")
        reasons_table.add_column("reason")
        reasons_table.add_column("rows", justify="right")
        for reason, n in summary.failure_reasons.items():
            reasons_table.add_row(escape(reason), str(n))
        console.print(reasons_table)
        _print_failed_rows(summary)


def _print_missing(missing: Mapping[str, MissingBranch]) -> None:
    """The branch x reason matrix; one (branch, reason) a line when the matrix is wider than the
    console (every reason keeps its whole name)."""
    reasons = sorted({r for info in missing.values() for r in info.reasons}, key=reason_order)
    _title("Missing branches (rows per reason)")
    matrix = Table(header_style="bold")
    matrix.add_column("branch")
    for reason in reasons:
        matrix.add_column(escape(reason), justify="right", no_wrap=True)
    matrix.add_column("rows", justify="right")
    for branch, info in missing.items():
        matrix.add_row(escape(branch), *(str(info.reasons.get(r, "")) for r in reasons), str(info.rows))
    if _fits(matrix):
        console.print(matrix)
        return
    tall = Table(header_style="bold")
    tall.add_column("branch")
    tall.add_column("reason", no_wrap=True)
    tall.add_column("rows", justify="right")
    for branch, info in missing.items():
        ordered = sorted(info.reasons.items(), key=lambda kv: reason_order(kv[0]))
        for i, (reason, n) in enumerate(ordered):
            tall.add_row(escape(branch) if i == 0 else "", escape(reason), str(n))
        if len(ordered) > 1:
            tall.add_row("", "[dim]all reasons[/]", str(info.rows), end_section=True)
        else:
            tall.rows[-1].end_section = True
    console.print(tall)


def _print_failed_rows(summary: CoalesceSummary) -> None:
    rows = summary.failed_rows[:20]
    shown = len(rows)
    more = summary.rows_failed - shown
    _title(f"Failed rows (first {shown} of {summary.rows_failed})" if more > 0 else "Failed rows")
    failed = Table(header_style="bold")
    for column in ("row key", "reason", "arrived", "missing"):
        failed.add_column(column, no_wrap=column != "arrived")
    for row in rows:
        failed.add_row(
            escape(row.row_key),
            escape(row.reason or ""),
            escape(", ".join(row.arrived)) or "-",
            escape("\n".join(f"{b}: {r}" for b, r in row.missing.items())) or "-",
        )
    if _fits(failed):
        console.print(failed)
        return
    for row in rows:  # one row a block: nothing is cut
        console.print(f"[bold]{escape(row.row_key)}[/]  {escape(row.reason or '')}")
        console.print(f"  arrived  {escape(', '.join(row.arrived) or '-')}")
        missing = list(row.missing.items()) or [("-", "")]
        for i, (branch, reason) in enumerate(missing):
            label = "missing " if i == 0 else "        "
            console.print(f"  {label} {escape(branch)}" + (f": {escape(reason)}" if reason else ""))


# -- explain ----------------------------------------------------------------------------------------


class AmbiguousRow(click.ClickException):
    exit_code = 2


@main.command()
@click.argument("row_key")
@run_options
@click.pass_obj
def explain(
    target: Target,
    row_key: str,
    run_id: str | None,
    dag_id: str | None,
    airflow_run_id: str | None,
    as_json: bool,
) -> None:
    """One row: its branches, their results and timing, and each coalesce decision and why.

    The row key is looked up in the selected audit runs (all of them without --run-id, --dag-id or
    --airflow-run-id). Found in one: that one is explained (and named). Found in several: they are
    listed and the command exits 2; choose one with --run-id, or narrow with --dag-id and
    --airflow-run-id."""
    engine = target.engine()
    runs = with_tries(
        engine, select_runs(engine, RunSelection(run_id=run_id, dag_id=dag_id, airflow_run_id=airflow_run_id))
    )
    matching = row_runs(engine, row_key, runs)
    if not matching:
        filters = _filters_text(run_id, dag_id, airflow_run_id)
        raise click.ClickException(f"no audit run{filters} in {target.where} has a row with key {row_key!r}")
    if len(matching) > 1:
        how = "Choose one with --run-id, or narrow with --dag-id and --airflow-run-id"
        if as_json:
            _emit_json({"error": "ambiguous", "row_key": row_key, "runs": [_run_header(r) for r in matching]})
        else:
            console.print(escape(f"row {row_key!r} is in {_plural(len(matching), 'audit run')}:"))
            _print_candidates(matching)
        raise AmbiguousRow(f"row {row_key!r} is in {len(matching)} audit runs.\n{how}.")
    run = matching[0]
    try:
        explained = explain_row(engine, run.audit_run_id, row_key)
    except NotFound as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        _emit_json(explained)
        return
    if not run_id:
        console.print(
            escape(_fit([f"row {row_key!r} found in one audit run: {run.audit_run_id}", _try_text(run)]))
        )
    print_explanation(_run_header(run), explained)


def _filters_text(run_id: str | None, dag_id: str | None, airflow_run_id: str | None) -> str:
    given = [
        f"{name} {value}"
        for name, value in (("--run-id", run_id), ("--dag-id", dag_id), ("--airflow-run-id", airflow_run_id))
        if value
    ]
    return f" matching {', '.join(given)}" if given else ""


def _print_candidates(runs: list[AuditRunTry]) -> None:
    """The audit runs a row key is in, one block each (they never share a line)."""
    for run in runs:
        logical = run.logical_date
        state = "current" if run.current else f"superseded by try {run.superseded_by_try}"
        console.print(f"  [bold]{escape(run.audit_run_id)}[/]")
        console.print(
            escape(
                _fit(
                    [
                        f"DAG {run.dag_id}",
                        f"Airflow run {run.airflow_run_id}",
                        f"logical date {logical.isoformat() if logical is not None else '-'}",
                        f"fork {run.fork_task_id} try {run.try_number} ({state})",
                    ],
                    indent="    ",
                )
            )
        )


def print_explanation(run: dict[str, Any], explained: Explanation) -> None:
    row = explained.row
    _rule(f"row {row.row_key}", [run["dag_id"], run["airflow_run_id"]], title_first=True)
    status = f"run {run['status']}" + (f" ({run['status_reason']})" if run.get("status_reason") else "")
    console.print(
        escape(_fit([f"audit run {run['run_id']}", f"row #{row.row_index} (chunk {row.chunk})", status]))
    )
    tree = Tree(f"source row {_short(explained.source)}")
    fork = tree.add(f"fork [bold]{escape(run['fork_task_id'])}[/] (try {run['try_number']})")
    for token in explained.tokens:
        if token.token_kind != TokenKind.BRANCH:
            continue
        terminal = token.terminal
        outcome = "; ".join(outcome_label(o.outcome, o.reason) for o in terminal)
        refined = {TokenOutcome.LATE.value, TokenOutcome.SKIPPED.value}
        at_decision = [
            o
            for o in token.superseded
            if o.outcome == TokenOutcome.NOT_ARRIVED
            and any(x.outcome in refined and x.join_group_id == o.join_group_id for x in terminal)
        ]
        superseded = "; ".join(
            outcome_label(o.outcome, o.reason) + f", superseded at {_clock(o.superseded_at)}"
            for o in token.superseded
            if o not in at_decision
        )
        label = f"branch [bold]{escape(str(token.branch_name))}[/] → {escape(outcome) or 'no outcome yet'}"
        if superseded:
            label += f" [dim](superseded: {escape(superseded)})[/]"
        branch = fork.add(label)
        if at_decision:
            seen = "; ".join(outcome_label(o.outcome, o.reason) for o in at_decision)
            branch.add(f"[dim]at the decision: {escape(seen)}[/]")
        if not token.states:
            if any(o.outcome == TokenOutcome.SKIPPED for o in terminal):
                branch.add("[dim]not processed by any step: the row was already decided[/]")
            else:
                branch.add("[yellow]no result from any step[/]")
        for state in token.states:
            style = STATUS_STYLE.get(state.status, "white")
            result = _short(explained.output_of(state)) if state.output_ref else _error_text(state.error_json)
            step = (
                f"{escape(state.node_id)} (try {state.attempt}): [{style}]{state.status}[/] "
                f"at {_clock(state.completed_at)}, took {state.duration_ms} ms"
            )
            plain = f"{state.node_id} (try {state.attempt}): {state.status} at 00:00:00.000, took "
            if len(plain) + len(str(state.duration_ms)) + len(result) + 20 <= console.width:
                branch.add(f"{step} · {escape(result)}")
            else:  # the result on its own line, under its step
                branch.add(step).add(escape(result))
    console.print(tree)
    for decision, replayed in zip(explained.decisions, explained.replays, strict=True):
        if replayed.resolution:
            verdict = f"[red]failed: {decision.failure_reason}[/]"
        elif decision.decision == DecisionStatus.MERGED:
            verdict = "[green]merged[/]"
        else:
            verdict = f"[red]failed: {decision.failure_reason}[/]"
        how = f"{decision.policy}, merge {decision.merge_strategy}"
        verdict_text = Text.from_markup(verdict)
        line = Text.from_markup(
            escape(
                _fit(
                    [
                        f"coalesce {decision.coalesce} ({how}):",
                        f"{verdict_text.plain} at {_clock(decision.decided_at)},",
                        f"{decision.wait_ms} ms after the fork completed",
                    ],
                    sep=" ",
                )
            )
        )
        line.highlight_words(
            [verdict_text.plain], style=str(verdict_text.spans[0].style) if verdict_text.spans else ""
        )
        line.stylize("bold", 0, len(f"coalesce {decision.coalesce}"))
        console.print()
        console.print(line)
        # The record's shown fields, each ``  label:  phrases`` with its phrases wrapped under it.
        for shown in decision.shown_fields():
            text = _fit(shown.entries, indent=" " * 12, sep=shown.sep)
            console.print(escape(text.replace(" " * 12, f"  {shown.label + ':':<9} ", 1)))
        console.print("  event log, replayed:")
        found = replayed.replayed
        late = [(e, True) for e in found.late_writes]
        for event, late_write in sorted([*((e, False) for e in found.events), *late], key=lambda x: x[0].at):
            after = (
                " [dim](after the resolution)[/]"
                if replayed.resolution and event.at > decision.decided_at
                else ""
            )
            if late_write:
                after = " [dim](late: written after its task was recorded ended, not in the log)[/]"
            name = escape(event.branch)
            console.print(f"    {_clock(event.at)}  {name:<12} {escape(event.label)}{after}")
        if replayed.resolution:
            ended = escape(str(replayed.task_state))
            if replayed.undecidable_then:
                console.print(
                    f"  resolved when the coalesce task ended {ended}: "
                    "[green]the row was undecidable then[/] (no policy decision to replay)"
                )
            else:
                console.print(
                    f"  resolved when the coalesce task ended {ended}, [red]but the row was decidable "
                    f"then[/]: its log up to the resolution gives {found.decision}"
                    + (f" ({found.failure_reason})" if found.failure_reason else "")
                    + f" at {_clock(found.decided_at)}"
                )
        else:
            agrees = "[green]agrees with the stored decision[/]" if replayed.agrees else "[red]DISAGREES[/]"
            console.print(f"  replay {agrees}")
    for old in explained.superseded_decisions:
        reason = f": {old.failure_reason}" if old.failure_reason else ""
        console.print(
            f"\n[dim]coalesce {escape(old.coalesce)}: superseded {escape(old.decision + reason)} "
            f"(decided at {_clock(old.decided_at)}, superseded at {_clock(old.superseded_at)} "
            "by a later try of the coalesce, which decides the row afresh)[/]"
        )
    if not explained.decisions:
        console.print("\n[yellow]no coalesce has decided this row[/]")
    for token in explained.tokens:
        if token.token_kind == TokenKind.MERGED:
            for state in token.states:
                console.print("merged output:", escape(_short(explained.output_of(state), 400)))


STATUS_STYLE = {
    NodeStatus.COMPLETED.value: "green",
    NodeStatus.FAILED.value: "red",
    NodeStatus.DROPPED.value: "yellow",
    NodeStatus.DISCARDED.value: "magenta",
}


def _clock(moment: Any) -> str:
    return str(moment.strftime("%H:%M:%S.%f")[:-3]) if moment is not None else "-"


def _short(value: Any, limit: int = 100) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_text(error_json: str | None) -> str:
    if not error_json:
        return "-"
    error = json.loads(error_json)
    return f"{error.get('type')}: {error.get('message')}"


# -- verify -----------------------------------------------------------------------------------------


def verify_runs(
    engine: Engine,
    runs: list[AuditRun],
    *,
    progress: bool,
    task_states: TaskStates | None = None,
) -> list[Finding]:
    """Integrity findings over the given runs (empty when everything holds), with a progress bar.

    The findings are :func:`~airflow_elspeth.audit.read.verify.verify_run`'s, run by run.
    """
    findings: list[Finding] = []
    with Progress(console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("verifying", total=len(runs))
        for run in runs:
            findings.extend(verify_run(engine, run, task_states=task_states))
            bar.advance(task)
    return findings


def _task_states_for(
    choice: bool | None, runs: Sequence[AuditRun], engine: Engine
) -> tuple[TaskStates | None, dict[str, Any]]:
    """Task states per ``--airflow-states`` (True: required, False: not read, None: try)."""
    if choice is False:
        return None, {"used": False, "detail": "not read (--no-airflow-states)"}
    wanted = tasks_to_look_up(engine, runs)
    if not wanted:
        return {}, {"used": True, "detail": "nothing to look up (no audit runs)"}
    from airflow_elspeth import airflow_states  # reads Airflow's metadata DB; imports Airflow

    try:
        states, where = airflow_states.airflow_task_states(wanted)
    except AirflowStatesUnavailable as err:
        if choice:
            raise click.ClickException(f"--airflow-states: Airflow task states unavailable: {err}") from err
        return None, {"used": False, "detail": f"not available: {err}"}
    return states, {"used": True, "detail": f"read from {where}"}


@main.command()
@run_options
@airflow_states_option("to catch runs and rows whose task has ended")
@click.pass_obj
def verify(
    target: Target,
    run_id: str | None,
    dag_id: str | None,
    airflow_run_id: str | None,
    as_json: bool,
    airflow_states: bool | None,
) -> None:
    """Integrity sweep: limbo (runs never closed, rows never decided, tokens without a terminal
    outcome), broken lineage links (stored and derived), decisions against their replay. Exits 1
    on any finding."""
    engine = target.engine()
    runs = select_runs(engine, RunSelection(run_id=run_id, dag_id=dag_id, airflow_run_id=airflow_run_id))
    task_states, states_note = _task_states_for(airflow_states, runs, engine)
    findings = verify_runs(
        engine, runs, progress=not as_json and sys.stderr.isatty(), task_states=task_states
    )
    if as_json:
        _emit_json({"runs_checked": len(runs), "airflow_states": states_note, "findings": findings})
    else:
        console.print(f"Airflow task states: {escape(states_note['detail'])}", soft_wrap=True)
        if findings:
            rows_at_stake = sum(f.count for f in findings)
            _title(f"{_plural(len(findings), 'integrity finding')} ({_plural(rows_at_stake, 'item')})")
            table = Table(header_style="bold red")
            for column in ("run", "check", "count", "examples", "detail"):
                table.add_column(column, overflow="fold")
            for finding in findings[:200]:
                table.add_row(
                    finding.run_id,
                    str(finding.check),
                    f"{finding.count} {finding.counted}",
                    escape(", ".join(finding.examples)),
                    escape(_finding_detail(finding)),
                )
            if _fits(table):
                console.print(table)
            else:  # one finding a block: a run id or a check name is never cut
                for finding in findings[:200]:
                    console.print(
                        f"[bold]{escape(str(finding.check))}[/] · {finding.count} {finding.counted}"
                        f" · run {finding.run_id}"
                    )
                    examples = ", ".join(finding.examples)
                    if examples:
                        console.print(f"  examples: {escape(examples)}")
                    console.print(f"  {escape(_finding_detail(finding))}")
            if len(findings) > 200:
                console.print(f"… and {len(findings) - 200} more (use --json)")
        else:
            place = f" in {escape(target.where)}" if not runs else ""
            console.print(
                f"[green]verified {_plural(len(runs), 'audit run')}{place}: no findings[/]", soft_wrap=True
            )
    if findings:
        sys.exit(1)


def _finding_detail(finding: Finding) -> str:
    """One line of what a finding is about, beyond its count and examples."""
    match finding:
        case RunNotClosed():
            return "still running, but " + "; ".join(finding.why)
        case RowsUndecided():
            return "; ".join(
                f"{node}: {info.undecided} undecided, " + ", ".join(info.why)
                for node, info in finding.coalesces.items()
            )
        case TokensWithoutOutcome():
            kinds = ", ".join(f"{n} {kind}" for kind, n in finding.by_kind.items())
            return f"no terminal outcome ({kinds}); rows {', '.join(finding.example_rows)}"
        case DecidableResolutions():
            return "resolved when the coalesce task ended, yet decidable then: " + "; ".join(
                f"{d.row_key} → {d.replayed.decision}" for d in finding.details
            )
        case DecisionsDifferFromReplay():
            return "stored decision differs from the replay: " + "; ".join(
                f"{d.row_key} stored {d.stored.decision}, replayed {d.replayed.decision}"
                for d in finding.details
            )
        case SourceTokensMissing():
            return "rows without their source token, the parent of their branch tokens"
        case BranchParentsMissing():
            return "branch tokens without their parent: " + "; ".join(
                f"{b} of {row} (its source token)" if row is not None else f"{b} (its row)"
                for row, b in zip(finding.rows, finding.branches, strict=True)
            )
        case ConsumedTokensMissing():
            return "consumed, yet no branch token of the row: " + "; ".join(
                f"{row} {b} at {node}"
                for row, node, b in zip(finding.examples, finding.coalesces, finding.branches, strict=True)
            )
        case MergedTokensMissing():
            return "merged, yet no merged token of the row: " + "; ".join(
                f"{row} at {node} names {token or 'none'}"
                for row, node, token in zip(
                    finding.examples, finding.coalesces, finding.merged_token_ids, strict=True
                )
            )
        case MergedTokensWithoutDecision():
            return "merged tokens no decision of their row names: rows " + ", ".join(
                row if row is not None else "(missing)" for row in finding.rows
            )
    # The rest (orphan parents, duplicate terminal outcomes): their details as JSON.
    shown = ("run_id", "check", "count", "counted", "examples")
    rest = {k: v for k, v in to_json(finding).items() if k not in shown}
    return json.dumps(rest, default=str)[:300]


# -- db ---------------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Audit store schema."""


@db.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def upgrade(target: Target, as_json: bool) -> None:
    """Create or upgrade the audit schema to the latest migration."""
    from airflow_elspeth.audit import migrate

    engine = target.engine(upgrade=False)
    # Every line names the store (its URL, the password masked, and the connection it came from):
    # a deployment has several (the default, a fork's audit_conn_id, a --url).
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        revision = migrate.current_revision(engine)
    except SQLAlchemyError as err:
        reason = str(err.orig) if isinstance(err, DBAPIError) else str(err)
        raise click.ClickException(
            f"cannot upgrade audit store {target.where}: {type(err).__name__}: {reason.strip()}"
        ) from err
    url = engine.url.render_as_string(hide_password=True)
    if as_json:
        _emit_json({"url": url, "store": target.where, "previous_revision": before, "revision": revision})
    elif before == revision:
        console.print(
            f"audit store {escape(target.where)} is at revision [bold]{revision}[/] (already)", soft_wrap=True
        )
    else:
        console.print(
            f"audit store {escape(target.where)} upgraded from {before or 'an empty database'} to "
            f"revision [bold]{revision}[/]",
            soft_wrap=True,
        )


if __name__ == "__main__":
    main()
