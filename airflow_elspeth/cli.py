"""``airflow-elspeth``: read the audit trail from a terminal.

``report`` (coalesce summaries), ``explain`` (one row's lineage and its decision replayed from the
event log), ``verify`` (integrity sweep; exits non-zero on any finding) and ``db upgrade``. Every
command reads the configured audit store (the embedded SQLite file when nothing is configured),
takes ``--json``, and writes nothing except ``db upgrade``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from rich.tree import Tree
from sqlalchemy import Engine, and_, func, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.coalesce import (
    CoalesceSpec,
    RunInfo,
    deadline_of,
    load_run,
    read_chunk_log,
    row_events,
)
from airflow_elspeth.audit.queries import coalesce_nodes, coalesce_summary, row_lineage, spec_of_node
from airflow_elspeth.core.policy import replay

# Airflow configures its logging when first imported (via the hook): keep its INFO chatter out of a
# terminal report unless the user asked for a level.
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

console = Console()


@dataclass
class Target:
    """Where the commands read: ``--url`` beats ``--conn-id`` beats the provider's default."""

    url: str | None
    conn_id: str | None

    def engine(self, *, upgrade: bool = True) -> Engine:
        from airflow_elspeth.hooks.audit import ElspethAuditHook, engine_for_url

        if self.url:
            return engine_for_url(self.url, upgrade=upgrade)
        return ElspethAuditHook(audit_conn_id=self.conn_id).get_engine()


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


def select_runs(
    engine: Engine, run_id: str | None, dag_id: str | None, airflow_run_id: str | None
) -> list[dict[str, Any]]:
    r = t.runs.c
    query = select(t.runs).order_by(r.started_at)
    if run_id:
        query = query.where(r.run_id == run_id)
    if dag_id:
        query = query.where(r.dag_id == dag_id)
    if airflow_run_id:
        query = query.where(r.airflow_run_id == airflow_run_id)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


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


def summaries(engine: Engine, runs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for run in runs:
        for node in coalesce_nodes(engine, run["run_id"]):
            spec = spec_of_node(engine, run["run_id"], node["node_id"])
            yield run, coalesce_summary(engine, spec, run["run_id"])


@main.command()
@run_options
@click.pass_obj
def report(
    target: Target, run_id: str | None, dag_id: str | None, airflow_run_id: str | None, as_json: bool
) -> None:
    """Coalesce summaries of every audit run (or the selected ones)."""
    engine = target.engine()
    runs = select_runs(engine, run_id, dag_id, airflow_run_id)
    found = [{"run": _run_header(run), "summary": summary} for run, summary in summaries(engine, runs)]
    if as_json:
        _emit_json(found)
        return
    if not runs:
        console.print("No audit runs found.")
        return
    for item in found:
        print_summary(item["run"], item["summary"])


def _run_header(run: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "run_id",
        "dag_id",
        "airflow_run_id",
        "fork_task_id",
        "try_number",
        "status",
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
    counts = Table(show_header=True, header_style="bold")
    for column in ("rows", "merged", "failed", "late arrivals"):
        counts.add_column(column, justify="right")
    counts.add_row(
        str(summary["rows_total"]),
        f"[green]{summary['rows_merged']}[/]",
        f"[red]{summary['rows_failed']}[/]" if summary["rows_failed"] else "0",
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


def find_row_run(engine: Engine, row_key: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest of ``runs`` that has ``row_key``."""
    with engine.connect() as conn:
        for run in reversed(runs):
            found = conn.execute(
                select(t.rows.c.row_id).where(t.rows.c.run_id == run["run_id"], t.rows.c.row_key == row_key)
            ).first()
            if found:
                return run
    raise click.ClickException(f"no audit run has a row with key {row_key!r}")


def explain_row(engine: Engine, run_id: str, row_key: str) -> dict[str, Any]:
    """The row's lineage plus, per coalesce, its decision replayed from the stored event log."""
    lineage = row_lineage(engine, run_id, row_key)
    row = lineage["row"]
    replays = []
    with engine.connect() as conn:
        run = load_run(conn, run_id)
    assert run is not None
    for decision in lineage["decisions"]:
        spec = spec_of_node(engine, run_id, decision["node_id"])
        replayed = replay_decision(engine, spec, run, row["chunk"], row["row_id"], decision["recorded_at"])
        replays.append(
            {
                "coalesce": decision["node_id"],
                "replayed": replayed,
                "agrees": _agrees(decision, replayed),
            }
        )
    return {**lineage, "replays": replays}


def replay_decision(
    engine: Engine, spec: CoalesceSpec, run: RunInfo, chunk: int, row_id: str, now: Any
) -> dict[str, Any]:
    """Replay one row's log as it stood when its decision was recorded."""
    with engine.connect() as conn:
        _, states, losses = read_chunk_log(
            conn, spec, run.run_id, chunk, undecided_only=False, row_ids=[row_id]
        )
    events = row_events(spec, states.get(row_id, {}), losses)
    decision = replay(spec.config, events, deadline=deadline_of(run, spec.config), now=now)
    return {
        "decision": decision.status.value,
        "decided_at": decision.decided_at,
        "consumed": list(decision.consumed),
        "failure_reason": decision.failure_reason.value if decision.failure_reason else None,
        "events": [
            {"branch": e.branch, "at": e.at, "kind": e.kind.value, "reason": e.reason}
            for e in sorted(events, key=lambda e: (e.at, spec.config.branch_index(e.branch)))
        ],
    }


def _agrees(stored: dict[str, Any], replayed: dict[str, Any]) -> bool:
    return (
        stored["decision"] == replayed["decision"]
        and stored["failure_reason"] == replayed["failure_reason"]
        and json.loads(stored["consumed"]) == replayed["consumed"]
        and stored["decided_at"] == replayed["decided_at"]
    )


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
    run = find_row_run(engine, row_key, runs)
    explained = explain_row(engine, run["run_id"], row_key)
    if as_json:
        _emit_json(explained)
        return
    print_explanation(run, explained)


def print_explanation(run: dict[str, Any], explained: dict[str, Any]) -> None:
    row = explained["row"]
    console.rule(
        f"row [bold]{escape(row['row_key'])}[/] · {escape(run['dag_id'])} · {escape(run['airflow_run_id'])}"
    )
    console.print(f"audit run {run['run_id']} · row #{row['row_index']} (chunk {row['chunk']})")
    tree = Tree(f"source row {_short(explained['source'])}")
    fork = tree.add(f"fork [bold]{escape(run['fork_task_id'])}[/] (try {run['try_number']})")
    for token in explained["tokens"]:
        if token["token_kind"] != "branch":
            continue
        outcome = "; ".join(
            o["outcome"] + (f" ({o['reason']})" if o["reason"] else "")
            for o in token["outcomes"]
            if o["is_terminal"]
        )
        branch = fork.add(
            f"branch [bold]{escape(token['branch_name'])}[/] → {escape(outcome) or 'no outcome yet'}"
        )
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
        verdict = (
            "[green]merged[/]"
            if decision["decision"] == "merged"
            else f"[red]failed: {decision['failure_reason']}[/]"
        )
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
            console.print(
                f"    {_clock(event['at'])}  {escape(event['branch']):<12} {event['kind']}{escape(reason)}"
            )
        agrees = "[green]agrees with the stored decision[/]" if replayed["agrees"] else "[red]DISAGREES[/]"
        console.print(f"  replay {agrees}")
    for token in explained["tokens"]:
        if token["token_kind"] == "merged":
            for state in token["states"]:
                console.print(
                    "merged output:", escape(_short(explained["outputs"].get(state["output_ref"]), 400))
                )


STATUS_STYLE = {"completed": "green", "failed": "red", "dropped": "yellow", "discarded": "magenta"}


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


def verify_runs(engine: Engine, runs: list[dict[str, Any]], *, progress: bool) -> list[dict[str, Any]]:
    """Integrity findings over the given runs (empty when everything holds)."""
    findings: list[dict[str, Any]] = []
    tk, to, tp = t.tokens.c, t.token_outcomes.c, t.token_parents.c
    with Progress(console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("verifying", total=len(runs))
        for run in runs:
            run_id = run["run_id"]
            nodes = coalesce_nodes(engine, run_id)
            with engine.connect() as conn:
                info = load_run(conn, run_id)
                finished = (
                    info is not None
                    and info.status == "completed"
                    and all(_decided_count(conn, run_id, n["node_id"]) >= info.rows_total for n in nodes)
                )
                if finished:
                    terminal = func.count(to.outcome_id)
                    for token_id, count in conn.execute(
                        select(tk.token_id, terminal)
                        .select_from(
                            t.tokens.outerjoin(
                                t.token_outcomes, and_(to.token_id == tk.token_id, to.is_terminal)
                            )
                        )
                        .where(tk.run_id == run_id)
                        .group_by(tk.token_id)
                        .having(terminal != 1)
                    ):
                        findings.append(
                            {
                                "run_id": run_id,
                                "check": "terminal_outcomes",
                                "token_id": token_id,
                                "found": count,
                            }
                        )
                parent = t.tokens.alias("parent")
                for token_id, parent_id in conn.execute(
                    select(tp.token_id, tp.parent_token_id)
                    .select_from(
                        t.token_parents.join(t.tokens, tk.token_id == tp.token_id).outerjoin(
                            parent, parent.c.token_id == tp.parent_token_id
                        )
                    )
                    .where(tk.run_id == run_id, parent.c.token_id.is_(None))
                ):
                    findings.append(
                        {
                            "run_id": run_id,
                            "check": "orphan_parent",
                            "token_id": token_id,
                            "parent_token_id": parent_id,
                        }
                    )
            if info is not None and info.completed_at is not None:
                for node in nodes:
                    findings.extend(
                        _replay_findings(engine, info, spec_of_node(engine, run_id, node["node_id"]))
                    )
            bar.advance(task)
    return findings


def _decided_count(conn: Any, run_id: str, node_id: str) -> int:
    cd = t.coalesce_decisions.c
    return int(
        conn.execute(
            select(func.count())
            .select_from(t.coalesce_decisions)
            .where(cd.run_id == run_id, cd.node_id == node_id)
        ).scalar_one()
    )


def _replay_findings(engine: Engine, run: RunInfo, spec: CoalesceSpec) -> list[dict[str, Any]]:
    """Decisions that differ from the replay of their stored event log, chunk by chunk."""
    findings = []
    cd = t.coalesce_decisions.c
    deadline = deadline_of(run, spec.config)
    for chunk in range(run.chunks_total):
        with engine.connect() as conn:
            _, states, losses = read_chunk_log(conn, spec, run.run_id, chunk, undecided_only=False)
            stored = conn.execute(
                select(t.coalesce_decisions).where(
                    cd.run_id == run.run_id, cd.node_id == spec.node_id, cd.chunk == chunk
                )
            ).mappings()
            for decision in stored:
                events = row_events(spec, states.get(decision["row_id"], {}), losses)
                replayed = replay(spec.config, events, deadline=deadline, now=decision["recorded_at"])
                again = {
                    "decision": replayed.status.value,
                    "decided_at": replayed.decided_at,
                    "consumed": list(replayed.consumed),
                    "failure_reason": replayed.failure_reason.value if replayed.failure_reason else None,
                }
                if not _agrees(dict(decision), again):
                    findings.append(
                        {
                            "run_id": run.run_id,
                            "check": "decision_replay",
                            "coalesce": spec.node_id,
                            "row_key": decision["row_key"],
                            "stored": {
                                "decision": decision["decision"],
                                "failure_reason": decision["failure_reason"],
                                "consumed": json.loads(decision["consumed"]),
                                "decided_at": decision["decided_at"],
                            },
                            "replayed": again,
                        }
                    )
    return findings


@main.command()
@run_options
@click.pass_obj
def verify(
    target: Target, run_id: str | None, dag_id: str | None, airflow_run_id: str | None, as_json: bool
) -> None:
    """Integrity sweep: terminal outcomes, orphan parents, decisions against their replay."""
    engine = target.engine()
    runs = select_runs(engine, run_id, dag_id, airflow_run_id)
    findings = verify_runs(engine, runs, progress=not as_json and sys.stderr.isatty())
    if as_json:
        _emit_json({"runs_checked": len(runs), "findings": findings})
    elif findings:
        table = Table(title=f"{len(findings)} integrity findings", header_style="bold red")
        for column in ("run", "check", "detail"):
            table.add_column(column)
        for finding in findings[:200]:
            detail = {k: v for k, v in finding.items() if k not in ("run_id", "check")}
            table.add_row(finding["run_id"], finding["check"], json.dumps(detail, default=str)[:150])
        console.print(table)
    else:
        console.print(f"[green]verified {len(runs)} audit runs: no findings[/]")
    if findings:
        sys.exit(1)


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
