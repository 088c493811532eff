"""What every integration test asserts about a finished run, with SQL on the audit DB.

The event logs are rebuilt here independently of ``airflow_elspeth.audit.coalesce`` (straight from
``node_states`` and ``branch_task_losses``) and replayed with the pure core
(``airflow_elspeth.core.policy.replay``, ``airflow_elspeth.core.merge.merge_outputs``), which is the
oracle: the stored decision must be exactly the replay of its stored event log.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, text

from airflow_elspeth.audit.ids import join_group_id
from airflow_elspeth.audit.read.records import to_json
from airflow_elspeth.audit.read.verify import derived_link_findings
from airflow_elspeth.core.config import coalesce_config
from airflow_elspeth.core.errors import error_fingerprint
from airflow_elspeth.core.merge import merge_outputs
from airflow_elspeth.core.policy import BranchEvent, EventKind, replay

TERMINAL_NODE_STATES = ("completed", "dropped", "failed", "discarded")
ARRIVAL_NODE_STATES = ("completed", "discarded")
LATE_REASONS = ("late_arrival_after_merge", "late_arrival_after_failure")


# ------------------------------------------------------------------------------------------------
# Airflow side: task states and XComs of a DagRun (metadata DB)


def ti_states(dag_run: Any) -> dict[str, str]:
    """task_id (``task_id[i]`` for mapped) -> state of the DagRun's task instances."""
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    with settings.Session() as session:
        rows = session.execute(
            select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state).where(
                TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
            )
        ).all()
    return {
        (task_id if map_index < 0 else f"{task_id}[{map_index}]"): str(getattr(state, "value", state))
        for task_id, map_index, state in rows
    }


def ti_try_numbers(dag_run: Any) -> dict[str, int]:
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    with settings.Session() as session:
        rows = session.execute(
            select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.try_number).where(
                TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
            )
        ).all()
    return {(t if m < 0 else f"{t}[{m}]"): n for t, m, n in rows}


def xcom(dag_run: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    """An XCom value of the DagRun, read from the metadata DB (None when there is none)."""
    from airflow import settings
    from airflow.models.xcom import XComModel

    with settings.Session() as session:
        found = session.scalars(
            XComModel.get_many(
                run_id=dag_run.run_id,
                key=key,
                task_ids=task_id,
                dag_ids=dag_run.dag_id,
                map_indexes=map_index,
            )
        ).first()
        return None if found is None else XComModel.deserialize_value(found)


def reschedules(dag_run: Any, task_id: str) -> list[Any]:
    """The TaskReschedule rows (start_date, reschedule_date) of one task instance, oldest first."""
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskreschedule import TaskReschedule
    from sqlalchemy import select

    with settings.Session() as session:
        return list(
            session.execute(
                select(TaskReschedule.start_date, TaskReschedule.reschedule_date)
                .join(TaskInstance, TaskInstance.id == TaskReschedule.ti_id)
                .where(
                    TaskInstance.dag_id == dag_run.dag_id,
                    TaskInstance.run_id == dag_run.run_id,
                    TaskInstance.task_id == task_id,
                )
                .order_by(TaskReschedule.id)
            ).all()
        )


def ti_start(dag_run: Any, task_id: str) -> datetime:
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    with settings.Session() as session:
        return session.scalar(
            select(TaskInstance.start_date).where(
                TaskInstance.dag_id == dag_run.dag_id,
                TaskInstance.run_id == dag_run.run_id,
                TaskInstance.task_id == task_id,
            )
        )


# ------------------------------------------------------------------------------------------------
# Audit side


def q(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql), params).mappings()]


def audit_runs(engine: Engine, dag_id: str, airflow_run_id: str) -> list[dict[str, Any]]:
    return q(
        engine,
        "SELECT * FROM runs WHERE dag_id = :d AND airflow_run_id = :r ORDER BY try_number",
        d=dag_id,
        r=airflow_run_id,
    )


def only_run(engine: Engine, dag_run: Any, fork_task_id: str = "fork") -> dict[str, Any]:
    runs = [
        r for r in audit_runs(engine, dag_run.dag_id, dag_run.run_id) if r["fork_task_id"] == fork_task_id
    ]
    assert len(runs) == 1, f"expected one audit run of {fork_task_id}, got {runs}"
    return runs[0]


def as_utc(value: Any) -> datetime:
    """Timestamps read with text() SQL: SQLite gives naive strings, PostgreSQL aware datetimes."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def check_terminal_outcomes(engine: Engine, run_id: str) -> dict[str, int]:
    """Every token of the run has a terminal outcome, one per coalesce that joined it at most (two
    coalesces consuming one branch each end its token); returns outcome counts."""
    tokens = q(engine, "SELECT token_id, token_kind, branch_name FROM tokens WHERE run_id = :r", r=run_id)
    terminal = Counter(
        (row["token_id"], row["join_group_id"])
        for row in q(
            engine,
            "SELECT token_id, join_group_id FROM token_outcomes WHERE run_id = :r AND is_terminal",
            r=run_id,
        )
    )
    ended = {token for token, _ in terminal}
    wrong = [tok for tok in tokens if tok["token_id"] not in ended]
    assert not wrong, f"tokens without a terminal outcome: {wrong}"
    twice = {key: n for key, n in terminal.items() if n > 1}
    assert not twice, f"tokens with two terminal outcomes in one join group: {twice}"
    assert tokens, f"audit run {run_id} has no tokens"
    known = {tok["token_id"] for tok in tokens}
    orphans = sorted(ended - known)
    assert not orphans, f"outcomes of unknown tokens: {orphans}"
    counts = q(
        engine,
        "SELECT outcome, COUNT(*) AS n FROM token_outcomes"
        " WHERE run_id = :r AND is_terminal GROUP BY outcome",
        r=run_id,
    )
    return {row["outcome"]: row["n"] for row in counts}


def check_node_states_unique(engine: Engine, run_id: str) -> None:
    """No (token, node) has two terminal node states (retries and re-polls write nothing twice)."""
    dup = q(
        engine,
        f"""
        SELECT token_id, node_id, COUNT(*) AS n FROM node_states
        WHERE run_id = :r AND status IN {TERMINAL_NODE_STATES!r}
        GROUP BY token_id, node_id HAVING COUNT(*) > 1
        """,
        r=run_id,
    )
    assert not dup, f"(token, node) with several terminal node states: {dup}"


@dataclass
class CoalesceView:
    """One coalesce of one audit run as the audit DB has it, after every check passed."""

    run: dict[str, Any]
    node_id: str
    spec: dict[str, Any]
    decisions: dict[str, dict[str, Any]]  # row_key -> decision row (json columns decoded)
    late_tokens: int
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return str(self.run["run_id"])

    def per_row(self) -> dict[str, str]:
        """row_key -> "merged" or the failure reason."""
        return {k: d["failure_reason"] or d["decision"] for k, d in self.decisions.items()}

    def missing(self, row_key: str) -> dict[str, str]:
        return dict(self.decisions[row_key]["missing"])


def _events(
    config: Any,
    delivering: Mapping[str, str],
    states: list[dict[str, Any]],
    losses: list[dict[str, Any]],
    row_id: str,
    chunk: int,
) -> list[BranchEvent]:
    """A row's event log, rebuilt from node_states and branch_task_losses.

    See docs/ARCHITECTURE.md, "Decision semantics".

    An event's time is when it became visible: ``node_states.recorded_at`` (stamped inside the
    writing transaction), ``branch_task_losses.observed_at``. A branch's event is the earlier of its
    first terminal state at its delivering step and its task's loss (the chunk's own, else the
    task's): a state stamped after that loss was written by a task already declared ended (late).
    """
    events = []
    for branch in config.branches:
        node = delivering[branch]
        task_losses = [x for x in losses if x["node_id"] == node and x["chunk"] in (chunk, -1)]
        task_losses.sort(key=lambda x: x["chunk"] != chunk)  # the chunk's own task first
        loss = task_losses[0] if task_losses else None
        mine = sorted(
            (s for s in states if s["node_id"] == node and s["row_id"] == row_id),
            key=lambda s: as_utc(s["recorded_at"]),
        )
        if mine and (loss is None or as_utc(mine[0]["recorded_at"]) <= as_utc(loss["observed_at"])):
            first = mine[0]
            at = as_utc(first["recorded_at"])
            if first["status"] in ARRIVAL_NODE_STATES:
                events.append(BranchEvent(branch, at, EventKind.ARRIVAL))
            elif first["status"] == "dropped":
                events.append(BranchEvent(branch, at, EventKind.LOSS, "dropped"))
            else:
                error = json.loads(first["error_json"] or "{}")
                # An output that broke its step's contract is lost at the field it broke.
                contract = error.get("contract") if error.get("type") == "ContractViolation" else None
                reason = f"contract:{contract['field']}" if contract else f"error:{error.get('type')}"
                events.append(BranchEvent(branch, at, EventKind.LOSS, reason))
        elif loss is not None:
            events.append(
                BranchEvent(
                    branch, as_utc(loss["observed_at"]), EventKind.LOSS, f"branch_task_{loss['task_state']}"
                )
            )
    return events


def check_coalesce(engine: Engine, run: dict[str, Any], node_id: str = "coalesce") -> CoalesceView:
    """Decisions == pure replay of their event logs; outcomes, merged rows and lineage consistent."""
    run_id = run["run_id"]
    node = q(engine, "SELECT * FROM nodes WHERE run_id = :r AND node_id = :n", r=run_id, n=node_id)
    assert len(node) == 1 and node[0]["node_type"] == "coalesce", f"coalesce node {node_id}: {node}"
    spec = json.loads(node[0]["config_json"])
    cfg = spec["config"]
    config = coalesce_config(
        branches=cfg["branches"],
        policy=cfg["policy"],
        merge=cfg["merge"],
        timeout=timedelta(seconds=cfg["timeout_seconds"]),
        quorum=cfg["quorum"],
        select_branch=cfg["select_branch"],
        on_collision=cfg.get("on_collision", "record"),
    )
    delivering = spec["delivering"]
    nodes = tuple(delivering.values())
    states = q(
        engine,
        f"SELECT * FROM node_states WHERE run_id = :r AND status IN {TERMINAL_NODE_STATES!r}",
        r=run_id,
    )
    states = [s for s in states if s["node_id"] in nodes]
    losses = [
        x
        for x in q(engine, "SELECT * FROM branch_task_losses WHERE run_id = :r", r=run_id)
        if x["node_id"] in nodes
    ]
    rows = {r["row_id"]: r for r in q(engine, "SELECT * FROM rows WHERE run_id = :r", r=run_id)}
    decisions = q(
        engine, "SELECT * FROM coalesce_decisions WHERE run_id = :r AND node_id = :n", r=run_id, n=node_id
    )
    assert len(decisions) == len(rows) == run["rows_total"], (
        f"{node_id}: {len(decisions)} decisions for {len(rows)} rows ({run['rows_total']} forked)"
    )
    deadline = as_utc(run["completed_at"]) + config.timeout
    now = datetime.now(timezone.utc)
    # The run's bodies, read with their events once (the payloads view searches every body by hash).
    payloads = {
        row["hash"]: row["body"]
        for row in q(
            engine,
            "SELECT output_hash AS hash, output_body AS body FROM step_results"
            " WHERE run_no = :n AND output_body IS NOT NULL"
            " UNION SELECT merged_hash, merged_body FROM decisions"
            " WHERE run_no = :n AND merged_hash IS NOT NULL"
            " UNION SELECT source_hash, body FROM source_rows WHERE run_no = :n",
            n=run["run_no"],
        )
    }
    stored_parents = {row["token_id"] for row in q(engine, "SELECT token_id FROM token_parents")}
    coalesce_states = {
        row["token_id"]: row
        for row in q(
            engine, "SELECT * FROM node_states WHERE run_id = :r AND node_id = :n", r=run_id, n=node_id
        )
    }

    def payload(digest: str) -> Any:
        assert digest in payloads, f"payload {digest} missing"
        return json.loads(payloads[digest])

    outcomes = {
        o["token_id"]: o
        for o in q(engine, "SELECT * FROM token_outcomes WHERE run_id = :r AND is_terminal", r=run_id)
    }
    tokens = q(engine, "SELECT * FROM tokens WHERE run_id = :r", r=run_id)
    branch_token = {
        (t["row_id"], t["branch_name"]): t["token_id"] for t in tokens if t["token_kind"] == "branch"
    }

    def story_of(d: dict[str, Any], row_id: str, missing: dict[str, str]) -> dict[str, str]:
        """The story told since (summary, reports, outcomes): a branch the decision saw not arrived
        that answered after the row's decision time is a late arrival; one whose step skipped the
        decided row (its token's outcome says so) is skipped_decided."""
        story = dict(missing)
        for branch, reason in missing.items():
            if reason != "not_arrived":
                continue
            answered = [
                s
                for s in states
                if s["node_id"] == delivering[branch]
                and s["row_id"] == row_id
                and s["status"] in ARRIVAL_NODE_STATES
                and as_utc(s["recorded_at"]) > as_utc(d["decided_at"])
            ]
            if answered:
                story[branch] = (
                    "late_arrival_after_merge" if d["decision"] == "merged" else "late_arrival_after_failure"
                )
            elif outcomes[branch_token[(row_id, branch)]]["outcome"] == "skipped":
                story[branch] = "skipped_decided"
        return story

    def output_of(row_id: str, branch: str) -> Any:
        state = next(
            s
            for s in states
            if s["node_id"] == delivering[branch]
            and s["row_id"] == row_id
            and s["status"] in ARRIVAL_NODE_STATES
        )
        return payload(state["output_ref"])

    def collisions_of(row_id: str) -> Any:
        """on_collision="fail_row": the decision depends on whether the consumed outputs collide."""
        return lambda consumed: (
            merge_outputs(config, consumed, {b: output_of(row_id, b) for b in consumed}).collisions
        )

    fail_row = config.on_collision == "fail_row"
    by_key: dict[str, dict[str, Any]] = {}
    late_tokens = 0
    for d in decisions:
        row_id, key = d["row_id"], d["row_key"]
        assert rows[row_id]["row_key"] == key and d["chunk"] == rows[row_id]["chunk"]
        events = _events(config, delivering, states, losses, row_id, d["chunk"])
        if (d["failure_reason"] or "").startswith("coalesce_task_"):
            # A resolution (the coalesce task ended): the row must have been undecidable then.
            decided_at = as_utc(d["decided_at"])
            before = [e for e in events if e.at <= decided_at]
            assert not replay(config, before, deadline=deadline, now=decided_at).is_final, (
                f"{node_id} row {key!r}: resolved {d['failure_reason']} but decidable then ({events})"
            )
            assert d["decision"] == "failed"
            resolved_missing = json.loads(d["missing_json"])
            by_key[key] = {
                **d,
                "consumed": [],
                "missing": resolved_missing,
                "story": story_of(d, row_id, resolved_missing),
                "late": [],
            }
            continue
        expected = replay(
            config, events, deadline=deadline, now=now, collisions=collisions_of(row_id) if fail_row else None
        )
        consumed = json.loads(d["consumed"])
        missing = json.loads(d["missing_json"])
        late = json.loads(d["late_json"])
        where = f"{node_id} row {key!r} (events {events})"
        assert expected.is_final, f"{where}: stored {d['decision']} but the log replays to pending"
        assert d["decision"] == expected.status.value, f"{where}: {d['decision']} != {expected.status.value}"
        assert as_utc(d["decided_at"]) == expected.decided_at, f"{where}: decided_at {d['decided_at']}"
        assert tuple(consumed) == expected.consumed, f"{where}: consumed {consumed} != {expected.consumed}"
        expected_reason = expected.failure_reason.value if expected.failure_reason else None
        assert d["failure_reason"] == expected_reason, f"{where}: {d['failure_reason']} != {expected_reason}"
        assert d["policy"] == config.policy.value and d["merge_strategy"] == config.merge.value
        assert set(missing) == set(expected.missing), f"{where}: missing {missing} != {expected.missing}"
        for branch, reason in missing.items():
            if reason != expected.missing[branch]:
                # Known at the decision as not (yet) arrived; what the branch did afterwards is in
                # the log now (a late arrival, or a loss), stamped after the decision was recorded.
                assert reason == "not_arrived", (
                    f"{where}: {branch} missing as {reason!r}, log says {expected.missing[branch]!r}"
                )
                later = [e for e in events if e.branch == branch]
                assert later and later[0].at >= as_utc(d["decided_at"]), f"{where}: {branch}"
        assert set(late) <= set(expected.late), f"{where}: late {late} not in {expected.late}"
        # The arrival record, computed here from the oracle's own event log: the arrivals up to the
        # decision in log order, offsets from the first, and the wait from the first.
        arrivals = [e for e in events if e.kind == "arrival" and e.at <= expected.decided_at]
        arrivals.sort(key=lambda e: (e.at, config.branches.index(e.branch)))
        ms = timedelta(milliseconds=1)
        assert json.loads(d["details_json"])["arrival_order"] == [
            {"branch": e.branch, "offset_ms": (e.at - arrivals[0].at) // ms} for e in arrivals
        ], where
        first_wait = (expected.decided_at - arrivals[0].at) // ms if arrivals else None
        assert d["wait_from_first_arrival_ms"] == first_wait, where
        story = story_of(d, row_id, missing)
        # Each branch token's terminal outcome says what happened to it at this decision (unless
        # another coalesce of the same fork decided the token first: one terminal outcome a token).
        join_group = join_group_id(row_id, node_id)
        for branch in config.branches:
            outcome = outcomes[branch_token[(row_id, branch)]]
            arrival = [
                s
                for s in states
                if s["node_id"] == delivering[branch]
                and s["row_id"] == row_id
                and s["status"] in ARRIVAL_NODE_STATES
            ]
            if outcome["join_group_id"] != join_group:
                assert outcome["outcome"] != "forked", f"{where}: {branch} has no decision outcome"
            elif branch in consumed:
                assert outcome["outcome"] == "coalesced", f"{where}: {branch} {outcome}"
            elif branch in missing:
                reason = missing[branch]
                want = (
                    "not_arrived" if reason == "not_arrived" else "late" if reason in LATE_REASONS else "lost"
                )
                if reason.startswith("branch_task_") and arrival:
                    # Lost to its task's end; what that task wrote afterwards is late.
                    want = "late"
                    reason = f"late_arrival_after_{'merge' if d['decision'] == 'merged' else 'failure'}"
                elif reason == "not_arrived":
                    # Not arrived at the decision: the outcome names the branch task's state then,
                    # unless the branch has since answered (late) or skipped the decided row.
                    task_state = json.loads(d["details_json"]).get("branch_task_states", {}).get(branch)
                    reason = f"branch_task_{task_state}"
                    since = story[branch]
                    if since in LATE_REASONS:
                        want, reason = "late", since
                    elif since == "skipped_decided":
                        want, reason = "skipped", since
                assert (outcome["outcome"], outcome["reason"]) == (want, reason), (
                    f"{where}: {branch} {outcome}"
                )
            else:
                assert d["decision"] == "failed", f"{where}: {branch} neither consumed nor missing"
                assert (outcome["outcome"], outcome["reason"]) == ("row_failed", d["failure_reason"])
            if arrival and as_utc(arrival[0]["recorded_at"]) > as_utc(d["decided_at"]):
                late_tokens += 1
        # A merged row: its token, its parents (the consumed branch tokens, derived from the
        # decision: never stored) and the merge itself.
        if d["decision"] == "merged":
            merged_id = d["merged_token_id"]
            assert merged_id and outcomes[merged_id]["outcome"] == "merged", f"{where}: merged token"
            assert merged_id not in stored_parents, f"{where}: derivable parents stored"
            assert all((row_id, b) in branch_token for b in consumed), f"{where}: consumed token missing"
            merged_state = coalesce_states.get(merged_id)
            assert merged_state is not None and merged_state["status"] == "completed", (
                f"{where}: merged state"
            )
            merged = merge_outputs(config, consumed, {b: output_of(row_id, b) for b in consumed})
            assert payload(merged_state["output_ref"]) == merged.row, f"{where}: merged row"
            collisions = json.loads(d["collisions_json"]) if d["collisions_json"] else {}
            assert collisions == merged.collisions, f"{where}: collisions"
        else:
            assert d["merged_token_id"] is None
            if d["failure_reason"] == "field_collision":  # the collisions that failed it, recorded
                assert json.loads(d["collisions_json"]) == expected.details["collisions"], where
        by_key[key] = {**d, "consumed": consumed, "missing": missing, "story": story, "late": late}
    return CoalesceView(run=run, node_id=node_id, spec=spec, decisions=by_key, late_tokens=late_tokens)


AFTER_DECISION_REASONS = (*LATE_REASONS, "skipped_decided")


def _settled_since(then: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, int]:
    """Compare a summary's missing branches (``then``) with the story now: the same rows and reasons,
    except ``not_arrived`` rows that have since become late arrivals or skips. Returns how many
    became each (``late``, ``skipped``)."""
    assert set(then) == set(now), (then, now)
    settled = {"late": 0, "skipped": 0}
    for branch in now:
        was, is_ = then[branch]["reasons"], now[branch]["reasons"]
        assert then[branch]["rows"] == now[branch]["rows"], (branch, then, now)
        for reason in set(was) | set(is_):
            if reason != "not_arrived" and reason not in AFTER_DECISION_REASONS:
                assert was.get(reason, 0) == is_.get(reason, 0), (branch, reason, then, now)
        grown = {reason: is_.get(reason, 0) - was.get(reason, 0) for reason in AFTER_DECISION_REASONS}
        assert all(n >= 0 for n in grown.values()), (branch, then, now)
        assert was.get("not_arrived", 0) - is_.get("not_arrived", 0) == sum(grown.values()), (
            branch,
            then,
            now,
        )
        settled["late"] += sum(grown[reason] for reason in LATE_REASONS)
        settled["skipped"] += grown["skipped_decided"]
    return settled


def check_summary(summary: Mapping[str, Any], view: CoalesceView) -> None:
    """The XCom ``coalesce_summary`` agrees with the audit rows.

    See docs/ARCHITECTURE.md, "The coalesce summary".
    """
    cfg = view.spec["config"]
    decisions = view.decisions.values()
    failed = [d for d in decisions if d["decision"] == "failed"]
    missing: dict[str, dict[str, Any]] = {}
    for d in decisions:
        for branch, reason in d["story"].items():
            entry = missing.setdefault(branch, {"rows": 0, "reasons": {}})
            entry["rows"] += 1
            entry["reasons"][reason] = entry["reasons"].get(reason, 0) + 1
    deadline = as_utc(view.run["completed_at"]) + timedelta(seconds=cfg["timeout_seconds"])
    assert summary["audit_run_id"] == view.run_id
    assert summary["coalesce"] == view.node_id
    assert summary["policy"] == cfg["policy"]
    assert summary["quorum"] == cfg["quorum"]
    assert summary["merge"] == cfg["merge"]
    assert summary["select_branch"] == cfg["select_branch"]
    assert summary["expected_branches"] == cfg["branches"]
    assert as_utc(summary["deadline"]) == deadline
    assert summary["rows_total"] == view.run["rows_total"] == len(view.decisions)
    assert summary["rows_merged"] == len(view.decisions) - len(failed)
    assert summary["rows_failed"] == len(failed)
    assert summary["failure_reasons"] == dict(Counter(d["failure_reason"] for d in failed))
    # The summary is what the coalesce knew when it ended; a branch may answer (late) or skip a
    # decided row after that, turning a not_arrived of the summary into a late arrival or a skip now.
    settled_since = _settled_since(summary["missing_branches"], missing)
    assert summary["late_arrivals"] + settled_since["late"] == view.late_tokens, (
        summary["late_arrivals"],
        settled_since,
        view.late_tokens,
    )
    assert summary["failed_rows_truncated"] is (len(failed) > 100)
    first_waits = [
        d["wait_from_first_arrival_ms"] for d in decisions if d["wait_from_first_arrival_ms"] is not None
    ]
    assert summary["waits_ms"]["from_first_arrival"]["max"] == (max(first_waits) if first_waits else None)
    assert summary["waits_ms"]["from_fork_completion"]["max"] == max(
        (d["wait_ms"] for d in decisions), default=None
    )
    collisions: dict[str, dict[str, Any]] = {}
    for d in decisions:
        for name, branches in json.loads(d["collisions_json"] or "{}").items():
            entry = collisions.setdefault(name, {"rows": 0, "branches": set()})
            entry["rows"] += 1
            entry["branches"] |= set(branches)
    assert summary["field_collisions"] == {
        name: {"rows": e["rows"], "branches": [b for b in cfg["branches"] if b in e["branches"]]}
        for name, e in sorted(collisions.items())
    }
    listed = {f["row_key"]: f for f in summary["failed_rows"]}
    assert set(listed) == {d["row_key"] for d in failed}
    for d in failed:
        entry = listed[d["row_key"]]
        assert entry["reason"] == d["failure_reason"]
        # As for the counts: a not_arrived of the summary may since be a late arrival or a skip.
        assert set(entry["missing"]) == set(d["story"]), (entry["missing"], d["story"])
        for branch, reason in entry["missing"].items():
            now = d["story"][branch]
            assert reason == now or (reason == "not_arrived" and now in AFTER_DECISION_REASONS), (
                d["row_key"],
                entry["missing"],
                d["story"],
            )
        assert entry["arrived"] == json.loads(d["details_json"]).get("arrived", [])


def check_counts_add_up(summary: Mapping[str, Any]) -> None:
    """Every count of a summary is the sum of the table it heads (rows, failure reasons, each
    branch's missing reasons; late arrivals = the late columns of the missing-branch table)."""
    assert (
        summary["rows_total"] == summary["rows_merged"] + summary["rows_failed"] + summary["rows_undecided"]
    )
    assert summary["rows_failed"] == sum(summary["failure_reasons"].values())
    late = 0
    for branch, info in summary["missing_branches"].items():
        assert info["rows"] == sum(info["reasons"].values()), (branch, info)
        late += sum(n for r, n in info["reasons"].items() if r in LATE_REASONS)
    assert summary["late_arrivals"] == late, summary


def tolerated(summary: Mapping[str, Any], failures: int, rate: float | None) -> bool:
    failed, total = summary["rows_failed"], summary["rows_total"]
    return failed <= failures or (rate is not None and total > 0 and failed / total <= rate)


def check_sensor_state(state: str, summary: Mapping[str, Any], spec: Any) -> str:
    """The coalesce task's end state follows the tolerance; returns the expected state."""
    ok = tolerated(summary, spec.tolerated_failures, spec.tolerated_failure_rate)
    expected = "success" if ok else ("skipped" if spec.soft_fail else "failed")
    assert state == expected, (
        f"coalesce ended {state}, tolerance says {expected}: {summary['failure_reasons']}"
    )
    return expected


def check_error_fingerprints(engine: Engine, run_id: str) -> None:
    """A terminal loss to a row error (``error:<Type>``, or ``contract:<field>``: an output that broke
    its step's contract) carries the fingerprint of the error its node state recorded; no other
    terminal outcome carries one."""
    outcomes = q(
        engine,
        "SELECT token_id, outcome, reason, error_hash FROM token_outcomes WHERE run_id = :r AND is_terminal",
        r=run_id,
    )
    errors: dict[str, set[str]] = {}
    for state in q(
        engine,
        "SELECT token_id, error_json FROM node_states WHERE run_id = :r AND status = 'failed'",
        r=run_id,
    ):
        error = json.loads(state["error_json"] or "{}")
        fingerprint = error_fingerprint(error.get("type") or "Exception", error.get("message") or "")
        errors.setdefault(state["token_id"], set()).add(fingerprint)
    for o in outcomes:
        if o["outcome"] == "lost" and str(o["reason"]).startswith(("error:", "contract:")):
            assert o["error_hash"] in errors.get(o["token_id"], set()), (o, errors.get(o["token_id"]))
        else:
            assert o["error_hash"] is None, o


def check_run_integrity(engine: Engine, run_id: str) -> dict[str, int]:
    """Run-wide invariants: one terminal outcome per token, one terminal node state per (token, node),
    an error fingerprint on each loss to a row error, and (a completed run) every derived lineage
    link holding, as ``verify`` checks them."""
    check_node_states_unique(engine, run_id)
    check_error_fingerprints(engine, run_id)
    if q(engine, "SELECT status FROM runs WHERE run_id = :r", r=run_id)[0]["status"] == "completed":
        broken = derived_link_findings(engine, run_id)
        assert not broken, [to_json(finding) for finding in broken]
    return check_terminal_outcomes(engine, run_id)


def snapshot(engine: Engine, run_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every audit row of one run, per table, sorted (to compare before and after a re-run)."""
    out = {}
    for table, where in (
        ("runs", "run_id = :r"),
        ("nodes", "run_id = :r"),
        ("rows", "run_id = :r"),
        ("tokens", "run_id = :r"),
        ("token_parents", "token_id IN (SELECT token_id FROM tokens WHERE run_id = :r)"),
        ("node_states", "run_id = :r"),
        ("token_outcomes", "run_id = :r"),
        ("coalesce_decisions", "run_id = :r"),
        ("branch_task_losses", "run_id = :r"),
    ):
        rows = q(engine, f"SELECT * FROM {table} WHERE {where}", r=run_id)
        out[table] = sorted(tuple(sorted((k, str(v)) for k, v in row.items())) for row in rows)
    return out
