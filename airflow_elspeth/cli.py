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
from sqlalchemy import Engine, func, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.coalesce import (
    CoalesceSpec,
    RunInfo,
    deadline_of,
    load_run,
    read_chunk_log,
    row_events,
)
from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.queries import (
    LIMBO_EXAMPLES,
    ROWS_UNDECIDED,
    RUN_NOT_CLOSED,
    TOKENS_WITHOUT_OUTCOME,
    TaskStates,
    coalesce_nodes,
    coalesce_summary,
    is_resolution,
    limbo_findings,
    replay_at_resolution,
    resolution_task_state,
    row_lineage,
    spec_of_node,
)
from airflow_elspeth.core.policy import Status, replay
from airflow_elspeth.exceptions import AirflowStatesUnavailable


def _quiet_airflow() -> None:
    """Call right before importing Airflow, which configures its logging when first imported.

    Keeps Airflow's INFO chatter out of a terminal report unless the user asked for a level. Only
    two paths import Airflow: resolving the store without ``--url`` (the hook) and reading Airflow
    task states (``verify``); ``--url`` reaches the store through ``airflow_elspeth.audit.engine``.
    """
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")


console = Console()


@dataclass
class Target:
    """Where the commands read: ``--url`` beats ``--conn-id`` beats the provider's default."""

    url: str | None
    conn_id: str | None

    def engine(self, *, upgrade: bool = True) -> Engine:
        if self.url:
            return engine_for_url(self.url, upgrade=upgrade)
        _quiet_airflow()
        from airflow_elspeth.hooks.audit import ElspethAuditHook

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
    if run.get("status") != "completed":
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
    """The row's lineage plus, per coalesce, its decision replayed from the stored event log.

    A policy decision is replayed from the whole log (as it stood when the decision was recorded)
    and compared. A resolution (``coalesce_task_<state>``) is not a policy outcome: its replay uses
    only the events up to its ``decided_at`` and must still be pending there.
    """
    lineage = row_lineage(engine, run_id, row_key)
    row = lineage["row"]
    replays = []
    with engine.connect() as conn:
        run = load_run(conn, run_id)
    assert run is not None
    for decision in lineage["decisions"]:
        spec = spec_of_node(engine, run_id, decision["node_id"])
        if is_resolution(decision["failure_reason"]):
            replayed = replay_decision(
                engine,
                spec,
                run,
                row["chunk"],
                row["row_id"],
                decision["decided_at"],
                until=decision["decided_at"],
            )
            pending = replayed["decision"] == Status.PENDING.value
            replays.append(
                {
                    "coalesce": decision["node_id"],
                    "resolution": True,
                    "task_state": resolution_task_state(decision),
                    "replayed": replayed,
                    "undecidable_then": pending,
                    "agrees": pending,
                }
            )
            continue
        replayed = replay_decision(engine, spec, run, row["chunk"], row["row_id"], decision["recorded_at"])
        replays.append(
            {
                "coalesce": decision["node_id"],
                "resolution": False,
                "replayed": replayed,
                "agrees": _agrees(decision, replayed),
            }
        )
    return {**lineage, "replays": replays}


def replay_decision(
    engine: Engine,
    spec: CoalesceSpec,
    run: RunInfo,
    chunk: int,
    row_id: str,
    now: Any,
    *,
    until: Any = None,
) -> dict[str, Any]:
    """Replay one row's log as it stood at ``now`` (only the events stamped up to ``until``, if given).

    The events listed are the whole stored log, so a reader sees what came after, too.
    """
    with engine.connect() as conn:
        _, states, losses = read_chunk_log(
            conn, spec, run.run_id, chunk, undecided_only=False, row_ids=[row_id]
        )
    events = row_events(spec, states.get(row_id, {}), losses)
    deadline = deadline_of(run, spec.config)
    if until is not None:
        decision = replay_at_resolution(spec.config, events, decided_at=until, deadline=deadline)
    else:
        decision = replay(spec.config, events, deadline=deadline, now=now)
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
    status = f" · run {run['status']}" + (f" ({run['status_reason']})" if run.get("status_reason") else "")
    console.print(
        f"audit run {run['run_id']} · row #{row['row_index']} (chunk {row['chunk']})" + escape(status)
    )
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
        elif decision["decision"] == "merged":
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

FINDING_EXAMPLES = LIMBO_EXAMPLES


def verify_runs(
    engine: Engine,
    runs: list[dict[str, Any]],
    *,
    progress: bool,
    task_states: TaskStates | None = None,
) -> list[dict[str, Any]]:
    """Integrity findings over the given runs (empty when everything holds).

    One finding per (audit run, kind), with a ``count`` and a few ``examples``: limbo (see
    :func:`~airflow_elspeth.audit.queries.limbo_findings`), orphan token parents, policy decisions
    that differ from the replay of their stored log (``decision_replay``), and resolutions of rows
    that were decidable when resolved (``resolution_decidable``).
    """
    findings: list[dict[str, Any]] = []
    with Progress(console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("verifying", total=len(runs))
        for run in runs:
            run_id = run["run_id"]
            findings.extend(limbo_findings(engine, [run], task_states=task_states))
            orphan = _orphan_parents(engine, run_id)
            if orphan is not None:
                findings.append(orphan)
            with engine.connect() as conn:
                info = load_run(conn, run_id)
            if info is not None and info.completed_at is not None:
                mismatches: list[dict[str, Any]] = []
                decidable: list[dict[str, Any]] = []
                for node in coalesce_nodes(engine, run_id):
                    spec = spec_of_node(engine, run_id, node["node_id"])
                    found_mismatches, found_decidable = _replay_findings(engine, info, spec)
                    mismatches += found_mismatches
                    decidable += found_decidable
                for check, items in (("decision_replay", mismatches), ("resolution_decidable", decidable)):
                    if items:
                        findings.append(_aggregate(run_id, check, items))
            bar.advance(task)
    return findings


def _aggregate(run_id: str, check: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """One finding for many rows: their count, per coalesce, and the first few in full."""
    per_coalesce: dict[str, int] = {}
    for item in items:
        per_coalesce[item["coalesce"]] = per_coalesce.get(item["coalesce"], 0) + 1
    return {
        "run_id": run_id,
        "check": check,
        "count": len(items),
        "counted": "rows",
        "examples": [item["row_key"] for item in items[:FINDING_EXAMPLES]],
        "coalesces": per_coalesce,
        "details": items[:FINDING_EXAMPLES],
    }


def _orphan_parents(engine: Engine, run_id: str) -> dict[str, Any] | None:
    """Token parents of the run's tokens that are no token at all."""
    tk, tp = t.tokens.c, t.token_parents.c
    parent = t.tokens.alias("parent")
    orphans = (
        select(tp.token_id, tp.parent_token_id)
        .select_from(
            t.token_parents.join(t.tokens, tk.token_id == tp.token_id).outerjoin(
                parent, parent.c.token_id == tp.parent_token_id
            )
        )
        .where(tk.run_id == run_id, parent.c.token_id.is_(None))
    )
    with engine.connect() as conn:
        count = int(conn.execute(select(func.count()).select_from(orphans.subquery())).scalar_one())
        if not count:
            return None
        examples = conn.execute(orphans.order_by(tp.token_id).limit(FINDING_EXAMPLES)).all()
    return {
        "run_id": run_id,
        "check": "orphan_parent",
        "count": count,
        "counted": "token parents",
        "examples": [token_id for token_id, _ in examples],
        "missing_parents": [parent_id for _, parent_id in examples],
    }


def _replay_findings(
    engine: Engine, run: RunInfo, spec: CoalesceSpec
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Chunk by chunk: (policy decisions that differ from the replay of their stored event log,
    resolutions of rows whose log up to the resolution already decided them)."""
    mismatches: list[dict[str, Any]] = []
    decidable: list[dict[str, Any]] = []
    cd = t.coalesce_decisions.c
    deadline = deadline_of(run, spec.config)
    for chunk in range(run.chunks_total):
        with engine.connect() as conn:
            _, states, losses = read_chunk_log(conn, spec, run.run_id, chunk, undecided_only=False)
            stored = (
                conn.execute(
                    select(t.coalesce_decisions)
                    .where(cd.run_id == run.run_id, cd.node_id == spec.node_id, cd.chunk == chunk)
                    .order_by(cd.row_key)
                )
                .mappings()
                .all()
            )
        for decision in stored:
            events = row_events(spec, states.get(decision["row_id"], {}), losses)
            if is_resolution(decision["failure_reason"]):
                then = replay_at_resolution(
                    spec.config, events, decided_at=decision["decided_at"], deadline=deadline
                )
                if then.status is not Status.PENDING:
                    decidable.append(
                        {
                            "coalesce": spec.node_id,
                            "row_key": decision["row_key"],
                            "resolution": decision["failure_reason"],
                            "decided_at": decision["decided_at"],
                            "replayed": _decision_dict(then),
                        }
                    )
                continue
            replayed = replay(spec.config, events, deadline=deadline, now=decision["recorded_at"])
            again = _decision_dict(replayed)
            if not _agrees(dict(decision), again):
                mismatches.append(
                    {
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
    return mismatches, decidable


def _decision_dict(decision: Any) -> dict[str, Any]:
    return {
        "decision": decision.status.value,
        "decided_at": decision.decided_at,
        "consumed": list(decision.consumed),
        "failure_reason": decision.failure_reason.value if decision.failure_reason else None,
    }


# Airflow task states (the only Airflow reads of this module) --------------------------------------


def _airflow_metadata_url() -> str:
    """The metadata DB Airflow is configured with (``[database] sql_alchemy_conn``)."""
    _quiet_airflow()
    try:
        from airflow.configuration import conf
    except Exception as err:  # Airflow not importable
        raise AirflowStatesUnavailable(f"Airflow is not importable ({type(err).__name__}: {err})") from err
    try:
        url = conf.get("database", "sql_alchemy_conn")
    except Exception as err:
        raise AirflowStatesUnavailable(
            f"no [database] sql_alchemy_conn ({type(err).__name__}: {err})"
        ) from err
    if not url:
        raise AirflowStatesUnavailable("[database] sql_alchemy_conn is empty")
    return str(url)


def airflow_task_states(
    runs: list[dict[str, Any]], engine: Engine, url: str | None = None
) -> tuple[TaskStates, str]:
    """The states of the fork and coalesce task instances of ``runs``, read from Airflow's metadata DB.

    Read-only, with an engine of its own (never created: a SQLite file that does not exist is
    "unavailable"). :returns: (states, where they were read).
    :raises AirflowStatesUnavailable: when they cannot be read.
    """
    from sqlalchemy import bindparam, create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    url = url or _airflow_metadata_url()
    try:
        parsed = make_url(url)
    except Exception as err:
        raise AirflowStatesUnavailable(f"unreadable metadata DB URL ({type(err).__name__})") from err
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or not os.path.exists(database):
            raise AirflowStatesUnavailable(f"no Airflow metadata DB at {database or '(memory)'}")
    wanted: dict[tuple[str, str], set[str]] = {}
    run_ids = [r["run_id"] for r in runs]
    n = t.nodes.c
    coalesce_tasks: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for start in range(0, len(run_ids), 500):
            for run_id, task_id in conn.execute(
                select(n.run_id, n.task_id).where(
                    n.run_id.in_(run_ids[start : start + 500]), n.node_type == "coalesce"
                )
            ):
                coalesce_tasks.setdefault(run_id, []).append(task_id)
    for run in runs:
        key = (run["dag_id"], run["airflow_run_id"])
        wanted.setdefault(key, set()).update([run["fork_task_id"], *coalesce_tasks.get(run["run_id"], [])])
    states: dict[tuple[str, str, str], str] = {}
    if not wanted:
        return states, f"{shown} (nothing to look up)"
    connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
    metadata = create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
    query = text(
        "SELECT dag_id, run_id, task_id, state FROM task_instance "
        "WHERE map_index = -1 AND dag_id = :dag_id AND run_id IN :run_ids"
    ).bindparams(bindparam("run_ids", expanding=True))
    by_dag: dict[str, list[str]] = {}
    for dag_id, airflow_run_id in wanted:
        by_dag.setdefault(dag_id, []).append(airflow_run_id)
    try:
        with metadata.connect() as conn:
            for dag_id, airflow_run_ids in sorted(by_dag.items()):
                for start in range(0, len(airflow_run_ids), 500):
                    part = airflow_run_ids[start : start + 500]
                    for ti_dag, ti_run, task_id, state in conn.execute(
                        query, {"dag_id": dag_id, "run_ids": part}
                    ):
                        if state is not None and task_id in wanted.get((ti_dag, ti_run), ()):
                            states[(ti_dag, ti_run, task_id)] = str(state)
    except Exception as err:
        first = str(getattr(err, "orig", None) or err).splitlines()[0] if str(err) else ""
        raise AirflowStatesUnavailable(f"{shown} could not be read ({type(err).__name__}: {first})") from err
    finally:
        metadata.dispose()
    return states, f"{shown} ({len(states)} task instances)"


def _task_states_for(
    choice: bool | None, runs: list[dict[str, Any]], engine: Engine
) -> tuple[TaskStates | None, dict[str, Any]]:
    """Task states per ``--airflow-states`` (True: required, False: not read, None: try)."""
    if choice is False:
        return None, {"used": False, "detail": "not read (--no-airflow-states)"}
    try:
        states, where = airflow_task_states(runs, engine)
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
        "whose task has ended. Default: when Airflow's metadata DB is configured and readable."
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
    if check == "resolution_decidable":
        return "resolved when the coalesce task ended, yet decidable then: " + "; ".join(
            f"{d['row_key']} → {d['replayed']['decision']}" for d in finding["details"]
        )
    if check == "decision_replay":
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
