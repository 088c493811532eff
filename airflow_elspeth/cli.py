"""``airflow-elspeth``: read the audit trail from a terminal.

``report`` (coalesce summaries), ``explain`` (one row's lineage and its decision replayed from the
event log), ``verify`` (integrity sweep, limbo included; exits non-zero on any finding) and
``db upgrade``. Every command reads the configured audit store (the embedded SQLite file when
nothing is configured), takes ``--json``, and writes nothing except ``db upgrade``.

``verify`` may also read the fork and coalesce task states from Airflow's metadata DB (read-only,
when Airflow is configured here; ``--airflow-states/--no-airflow-states``): the only read of
Airflow's own database anywhere in the provider. The checks themselves (audit layer) take those
states as a plain mapping.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from rich.tree import Tree
from sqlalchemy import Engine

from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.read.decisions import run_summaries
from airflow_elspeth.audit.read.limbo import (
    ROWS_UNDECIDED,
    RUN_NOT_CLOSED,
    TOKENS_WITHOUT_OUTCOME,
    TaskStates,
    tasks_to_look_up,
)
from airflow_elspeth.audit.read.lineage import explain_row
from airflow_elspeth.audit.read.runs import find_row_run, select_runs
from airflow_elspeth.audit.read.verify import DECISION_REPLAY, RESOLUTION_DECIDABLE, verify_run
from airflow_elspeth.core.vocabulary import DecisionStatus, NodeStatus, RunStatus, TokenKind
from airflow_elspeth.exceptions import AirflowStatesUnavailable, NotFound

console = Console()


@dataclass
class Target:
    """Where the commands read: ``--url`` beats ``--conn-id`` beats the provider's default."""

    url: str | None
    conn_id: str | None

    def engine(self, *, upgrade: bool = True) -> Engine:
        if self.url:
            return engine_for_url(self.url, upgrade=upgrade)
        from airflow_elspeth.airflow_states import quiet_airflow

        quiet_airflow()  # the hook imports Airflow
        from airflow_elspeth.hooks.audit import ElspethAuditHook

        return engine_for_url(ElspethAuditHook(audit_conn_id=self.conn_id).get_url(), upgrade=upgrade)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, sort_keys=False))


@click.group()
@click.option("--url", envvar="ELSPETH_AUDIT_URL", help="SQLAlchemy URL of the audit store.")
@click.option("--conn-id", help="Airflow connection id of the audit store.")
@click.pass_context
def main(ctx: click.Context, url: str | None, conn_id: str | None) -> None:
    """Read the airflow-elspeth audit trail: what each coalesce decided, for which rows, and why."""
    # Migration and connection chatter belongs in task logs, not in a terminal report.
    for noisy in ("alembic", "airflow.task.hooks.airflow_elspeth"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = Target(url=url, conn_id=conn_id)


# -- selecting runs ---------------------------------------------------------------------------------


def run_options(func: Any) -> Any:
    for option in (
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables."),
        click.option("--airflow-run-id", help="Only audit runs of this Airflow DAG run."),
        click.option("--dag-id", help="Only audit runs of this DAG."),
        click.option("--run-id", help="One audit run (its id, as in the coalesce summary)."),
    ):
        func = option(func)
    return func


# -- report -----------------------------------------------------------------------------------------


@main.command()
@run_options
@click.pass_obj
def report(
    target: Target, run_id: str | None, dag_id: str | None, airflow_run_id: str | None, as_json: bool
) -> None:
    """Coalesce summaries of every audit run (or the selected ones)."""
    engine = target.engine()
    runs = select_runs(engine, run_id, dag_id, airflow_run_id)
    found = [{"run": _run_header(run), "summary": summary} for run, summary in run_summaries(engine, runs)]
    if as_json:
        _emit_json(found)
        return
    if not runs:
        console.print("No audit runs found.")
        return
    for item in found:
        print_summary(item["run"], item["summary"])
    summarised = {item["run"]["run_id"] for item in found}
    for run in runs:
        if run["run_id"] not in summarised:
            reason = f": {run['status_reason']}" if run.get("status_reason") else ""
            console.print(
                f"audit run {run['run_id']} ({escape(run['dag_id'])} · {escape(run['airflow_run_id'])}, "
                f"fork {escape(run['fork_task_id'])}, try {run['try_number']}): "
                f"{run['status']}{escape(reason)}, no coalesce registered"
            )


def _run_header(run: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "run_id",
        "dag_id",
        "airflow_run_id",
        "fork_task_id",
        "try_number",
        "status",
        "status_reason",
        "rows_total",
        "previous_run_id",
    )
    return {k: run.get(k) for k in keys}


def print_summary(run: dict[str, Any], summary: dict[str, Any]) -> None:
    policy = summary["policy"] + (f" (quorum {summary['quorum']})" if summary.get("quorum") else "")
    merge = summary["merge"] + (f" ({summary['select_branch']})" if summary.get("select_branch") else "")
    console.rule(
        f"[bold]{run['dag_id']}[/] · {run['airflow_run_id']} · coalesce [bold]{summary['coalesce']}[/]"
    )
    console.print(
        f"audit run {summary['audit_run_id']} (fork {run['fork_task_id']}, try {run['try_number']}) · "
        f"policy {policy} · merge {merge} · deadline {summary['deadline']}"
    )
    if run.get("status") != RunStatus.COMPLETED:
        reason = f": {run['status_reason']}" if run.get("status_reason") else ""
        console.print(f"[yellow]audit run {run['status']}{escape(reason)}[/]")
    counts = Table(show_header=True, header_style="bold")
    for column in ("rows", "merged", "failed", "undecided", "late arrivals"):
        counts.add_column(column, justify="right")
    undecided = summary.get("rows_undecided", 0)
    counts.add_row(
        str(summary["rows_total"]),
        f"[green]{summary['rows_merged']}[/]",
        f"[red]{summary['rows_failed']}[/]" if summary["rows_failed"] else "0",
        f"[yellow]{undecided}[/]" if undecided else "0",
        str(summary["late_arrivals"]),
    )
    console.print(counts)
    if summary["missing_branches"]:
        reasons = sorted({r for info in summary["missing_branches"].values() for r in info["reasons"]})
        matrix = Table(title="Missing branches (rows per reason)", header_style="bold")
        matrix.add_column("branch")
        for reason in reasons:
            matrix.add_column(reason, justify="right")
        matrix.add_column("rows", justify="right")
        for branch, info in summary["missing_branches"].items():
            matrix.add_row(branch, *(str(info["reasons"].get(r, "")) for r in reasons), str(info["rows"]))
        console.print(matrix)
    if summary.get("field_collisions"):
        clashes = Table(title="Union field collisions (later branch wins)", header_style="bold")
        for column in ("field", "rows", "supplied by"):
            clashes.add_column(column)
        for field_name, info in summary["field_collisions"].items():
            clashes.add_row(escape(field_name), str(info["rows"]), escape(", ".join(info["branches"])))
        console.print(clashes)
    if summary["failure_reasons"]:
        reasons_table = Table(title="Failed rows by reason", header_style="bold")
        reasons_table.add_column("reason")
        reasons_table.add_column("rows", justify="right")
        for reason, n in summary["failure_reasons"].items():
            reasons_table.add_row(reason, str(n))
        console.print(reasons_table)
        failed = Table(
            title="Failed rows" + (" (first 100)" if summary["failed_rows_truncated"] else ""),
            header_style="bold",
        )
        for column in ("row key", "reason", "arrived", "missing"):
            failed.add_column(column)
        for row in summary["failed_rows"][:20]:
            failed.add_row(
                row["row_key"],
                row["reason"],
                ", ".join(row["arrived"]) or "-",
                ", ".join(f"{b}: {r}" for b, r in row["missing"].items()) or "-",
            )
        console.print(failed)


# -- explain ----------------------------------------------------------------------------------------


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
    """One row: its branches, their results and timing, and each coalesce decision and why."""
    engine = target.engine()
    runs = select_runs(engine, run_id, dag_id, airflow_run_id)
    try:
        run = find_row_run(engine, row_key, runs)
        explained = explain_row(engine, run["run_id"], row_key)
    except NotFound as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        _emit_json(explained)
        return
    print_explanation(run, explained)


def print_explanation(run: dict[str, Any], explained: dict[str, Any]) -> None:
    row = explained["row"]
    console.rule(
        f"row [bold]{escape(row['row_key'])}[/] · {escape(run['dag_id'])} · {escape(run['airflow_run_id'])}"
    )
    status = f" · run {run['status']}" + (f" ({run['status_reason']})" if run.get("status_reason") else "")
    console.print(
        f"audit run {run['run_id']} · row #{row['row_index']} (chunk {row['chunk']})" + escape(status)
    )
    tree = Tree(f"source row {_short(explained['source'])}")
    fork = tree.add(f"fork [bold]{escape(run['fork_task_id'])}[/] (try {run['try_number']})")
    for token in explained["tokens"]:
        if token["token_kind"] != TokenKind.BRANCH:
            continue
        outcome = "; ".join(
            o["outcome"] + (f" ({o['reason']})" if o["reason"] else "")
            for o in token["outcomes"]
            if o["is_terminal"]
        )
        superseded = "; ".join(
            o["outcome"]
            + (f" ({o['reason']})" if o["reason"] else "")
            + f", superseded at {_clock(o['superseded_at'])}"
            for o in token["outcomes"]
            if not o["is_terminal"] and o.get("superseded_at") is not None
        )
        label = f"branch [bold]{escape(token['branch_name'])}[/] → {escape(outcome) or 'no outcome yet'}"
        if superseded:
            label += f" [dim](superseded: {escape(superseded)})[/]"
        branch = fork.add(label)
        if not token["states"]:
            branch.add("[yellow]no result from any step[/]")
        for state in token["states"]:
            style = STATUS_STYLE.get(state["status"], "white")
            result = (
                _short(explained["outputs"].get(state["output_ref"]))
                if state["output_ref"]
                else _error_text(state["error_json"])
            )
            branch.add(
                f"{escape(state['node_id'])} (try {state['attempt']}): [{style}]{state['status']}[/] "
                f"at {_clock(state['completed_at'])}, took {state['duration_ms']} ms · {escape(result)}"
            )
    console.print(tree)
    for decision, replayed in zip(explained["decisions"], explained["replays"], strict=True):
        if replayed.get("resolution"):
            verdict = f"[red]failed: {decision['failure_reason']}[/]"
        elif decision["decision"] == DecisionStatus.MERGED:
            verdict = "[green]merged[/]"
        else:
            verdict = f"[red]failed: {decision['failure_reason']}[/]"
        how = f"{decision['policy']}, merge {decision['merge_strategy']}"
        console.print(
            f"\n[bold]coalesce {escape(decision['node_id'])}[/] ({how}): {verdict} at "
            f"{_clock(decision['decided_at'])}, {decision['wait_ms']} ms after the fork completed"
        )
        console.print(f"  consumed: {', '.join(json.loads(decision['consumed'])) or '-'}")
        missing = json.loads(decision["missing_json"])
        if missing:
            console.print("  missing:  " + escape("; ".join(f"{b}: {r}" for b, r in missing.items())))
        details = json.loads(decision["details_json"])
        if details:
            console.print(f"  details:  {escape(json.dumps(details, sort_keys=True))}")
        console.print("  event log, replayed:")
        for event in replayed["replayed"]["events"]:
            reason = f" ({event['reason']})" if event["reason"] else ""
            after = (
                " [dim](after the resolution)[/]"
                if replayed.get("resolution") and event["at"] > decision["decided_at"]
                else ""
            )
            name = escape(event["branch"])
            console.print(f"    {_clock(event['at'])}  {name:<12} {event['kind']}{escape(reason)}{after}")
        if replayed.get("resolution"):
            state = escape(replayed["task_state"])
            if replayed["undecidable_then"]:
                console.print(
                    f"  resolved when the coalesce task ended {state}: "
                    "[green]the row was undecidable then[/] (no policy decision to replay)"
                )
            else:
                found = replayed["replayed"]
                console.print(
                    f"  resolved when the coalesce task ended {state}, [red]but the row was decidable "
                    f"then[/]: its log up to the resolution gives {found['decision']}"
                    + (f" ({found['failure_reason']})" if found["failure_reason"] else "")
                    + f" at {_clock(found['decided_at'])}"
                )
        else:
            agrees = (
                "[green]agrees with the stored decision[/]" if replayed["agrees"] else "[red]DISAGREES[/]"
            )
            console.print(f"  replay {agrees}")
    for old in explained.get("superseded_decisions", []):
        reason = f": {old['failure_reason']}" if old["failure_reason"] else ""
        console.print(
            f"\n[dim]coalesce {escape(old['node_id'])}: superseded {escape(old['decision'] + reason)} "
            f"(decided at {_clock(old['decided_at'])}, superseded at {_clock(old['superseded_at'])} "
            "by a later try of the coalesce, which decides the row afresh)[/]"
        )
    if not explained["decisions"]:
        console.print("\n[yellow]no coalesce has decided this row[/]")
    for token in explained["tokens"]:
        if token["token_kind"] == TokenKind.MERGED:
            for state in token["states"]:
                console.print(
                    "merged output:", escape(_short(explained["outputs"].get(state["output_ref"]), 400))
                )


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
    runs: list[dict[str, Any]],
    *,
    progress: bool,
    task_states: TaskStates | None = None,
) -> list[dict[str, Any]]:
    """Integrity findings over the given runs (empty when everything holds), with a progress bar.

    The findings are :func:`~airflow_elspeth.audit.read.verify.verify_run`'s, run by run.
    """
    findings: list[dict[str, Any]] = []
    with Progress(console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("verifying", total=len(runs))
        for run in runs:
            findings.extend(verify_run(engine, run, task_states=task_states))
            bar.advance(task)
    return findings


def _task_states_for(
    choice: bool | None, runs: list[dict[str, Any]], engine: Engine
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
@click.option(
    "--airflow-states/--no-airflow-states",
    "airflow_states",
    default=None,
    help=(
        "Read fork and coalesce task states from Airflow's metadata DB, to catch runs and rows "
        "whose task has ended. Default: when Airflow's metadata DB is configured and readable. "
        "Reading them imports Airflow (to find that DB), and only then: with --no-airflow-states, "
        "or with no audit run to check, verify --url never imports Airflow."
    ),
)
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
    outcome), orphan parents, decisions against their replay. Exits 1 on any finding."""
    engine = target.engine()
    runs = select_runs(engine, run_id, dag_id, airflow_run_id)
    task_states, states_note = _task_states_for(airflow_states, runs, engine)
    findings = verify_runs(
        engine, runs, progress=not as_json and sys.stderr.isatty(), task_states=task_states
    )
    if as_json:
        _emit_json({"runs_checked": len(runs), "airflow_states": states_note, "findings": findings})
    else:
        console.print(f"Airflow task states: {escape(states_note['detail'])}")
        if findings:
            rows_at_stake = sum(f["count"] for f in findings)
            table = Table(
                title=f"{len(findings)} integrity findings ({rows_at_stake} items)", header_style="bold red"
            )
            for column in ("run", "check", "count", "examples", "detail"):
                table.add_column(column, overflow="fold")
            for finding in findings[:200]:
                table.add_row(
                    finding["run_id"],
                    finding["check"],
                    f"{finding['count']} {finding.get('counted', '')}".strip(),
                    escape(", ".join(str(e) for e in finding.get("examples", []))),
                    escape(_finding_detail(finding)),
                )
            console.print(table)
            if len(findings) > 200:
                console.print(f"… and {len(findings) - 200} more (use --json)")
        else:
            console.print(f"[green]verified {len(runs)} audit runs: no findings[/]")
    if findings:
        sys.exit(1)


def _finding_detail(finding: dict[str, Any]) -> str:
    """One line of what a finding is about, beyond its count and examples."""
    check = finding["check"]
    if check == RUN_NOT_CLOSED:
        return "still running, but " + "; ".join(finding["why"])
    if check == ROWS_UNDECIDED:
        return "; ".join(
            f"{node}: {info['undecided']} undecided, " + ", ".join(info["why"])
            for node, info in finding["coalesces"].items()
        )
    if check == TOKENS_WITHOUT_OUTCOME:
        kinds = ", ".join(f"{n} {kind}" for kind, n in finding["by_kind"].items())
        return f"no terminal outcome ({kinds}); rows {', '.join(finding['example_rows'])}"
    if check == RESOLUTION_DECIDABLE:
        return "resolved when the coalesce task ended, yet decidable then: " + "; ".join(
            f"{d['row_key']} → {d['replayed']['decision']}" for d in finding["details"]
        )
    if check == DECISION_REPLAY:
        return "stored decision differs from the replay: " + "; ".join(
            f"{d['row_key']} stored {d['stored']['decision']}, replayed {d['replayed']['decision']}"
            for d in finding["details"]
        )
    rest = {k: v for k, v in finding.items() if k not in ("run_id", "check", "count", "counted", "examples")}
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
    migrate.upgrade(engine)
    revision = migrate.current_revision(engine)
    url = engine.url.render_as_string(hide_password=True)
    if as_json:
        _emit_json({"url": url, "revision": revision})
    else:
        console.print(f"audit store {url} is at revision [bold]{revision}[/]")


if __name__ == "__main__":
    main()
