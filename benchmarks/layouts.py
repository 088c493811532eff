"""What each storage choice of the audit trail costs: the same events written in several table
layouts, from today's schema to one row per event with compact keys, beside the lean floor.

    python -m benchmarks.layouts [--rows N] [--json]

Every layout stores the same facts for a fork -> 3 branches -> coalesce run in which every row
merges: the source row and its body, each branch step's result (input and output hashes, the
output body, start, end, duration, the event time), the decision (policy, strategy, what it
consumed, the arrival order, the waits, the merged body and its hash). Writes are raw
``sqlite3`` ``executemany`` in transactions of 1,000 source rows, SQLite WAL with foreign keys on
(the provider's settings, ``audit/engine.py``), and only the statements and their commits are
timed: what is measured is the layout, not the Python that makes its rows (the 0.1 layout's ids
cost the provider about 9 s of hashing per 100,000 rows besides). Timings move with the machine's
load, so compare layouts within one run, and trust the bytes more than the seconds. The ladder,
each step adding one choice to the one before:

- ``0.1``: today's tables and indexes (``airflow_elspeth.audit.schema``), with the rows the
  provider writes per source row (a row, 5 tokens, 4 node states, 5 token outcomes, a decision,
  the payloads): the reference that ``python -m benchmarks`` measures through the provider.
- ``events``: one row per event (source row, step result, decision), the same value types as
  0.1 (32-hex-digit text ids, hex hashes, text timestamps), bodies inline, a rowid table each with
  its key (run id, node, row number: sequential within a run) and the coalesce's chunk index.
- ``+int keys``: the run and the node numbered (integers) within the store, the row's hex id not
  stored; the chunk index dropped (a chunk is a range of row numbers, read through the key).
- ``+without rowid``: each table clustered on its primary key.
- ``+compact values``: hashes as 32 bytes, times as integer microseconds.
- ``+no derivable``: the step's input hash (the row's source hash for a first step), its end
  time (start + duration), the decision's policy and merge strategy (its node's) not stored, and
  no empty lists (nothing missing, nothing late: null).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.schema import CreateIndex, CreateTable

from airflow_elspeth.audit import schema
from airflow_elspeth.audit.store import dumps
from airflow_elspeth.core.canonical import derive_id, hash_value
from benchmarks.cli import LEAN_FLOOR, run_lean_floor
from benchmarks.factory import BRANCHES, branch_alpha, branch_beta, branch_gamma, make_row

CALLABLES = {"alpha": branch_alpha, "beta": branch_beta, "gamma": branch_gamma}
CHUNK = 1000
T0 = datetime(2026, 12, 7, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Event:
    """The facts of one source row's journey, in plain values; each layout stores them its way."""

    index: int
    key: str
    body: str
    digest: bytes
    outputs: tuple[tuple[str, str, bytes], ...]  # (branch, body, digest)
    merged_body: str
    merged_digest: bytes
    started: datetime
    recorded: datetime
    decided: datetime


def events(rows: int) -> Iterator[Event]:
    for i in range(rows):
        row = make_row(i)
        outputs = []
        merged: dict[str, Any] = {}
        for branch in BRANCHES:
            out = CALLABLES[branch](row)
            merged.update(out)
            outputs.append((branch, *_hashed(out)))
        started = T0 + timedelta(microseconds=137 * i)
        yield Event(
            i,
            str(i),
            *_hashed(row),
            tuple(outputs),
            *_hashed(merged),
            started,
            started + timedelta(milliseconds=15),
            started + timedelta(seconds=2),
        )


def _hashed(value: Any) -> tuple[str, bytes]:
    """A value's canonical JSON and its SHA-256, as the provider makes them (``hash_value``)."""
    digest, body = hash_value(value)
    return body, bytes.fromhex(digest)


def text_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


def micros(at: datetime) -> int:
    return (at - T0) // timedelta(microseconds=1) + 1_796_601_600_000_000


ARRIVAL = dumps({"arrival_order": [{"branch": b, "offset_ms": 3 * n} for n, b in enumerate(BRANCHES)]})
CONSUMED = dumps(list(BRANCHES))
MERGE_CONTEXT = dumps({"collisions": None, "consumed": list(BRANCHES)})
RUN = derive_id("run")


class Layout:
    """A layout: its DDL and the rows it writes for one event, per table (insert order)."""

    name = ""
    ddl: str
    prelude = ""  # SQL run after the DDL, untimed (rows the events' foreign keys need)

    def rows(self, e: Event) -> dict[str, list[tuple[Any, ...]]]:
        raise NotImplementedError


class Today(Layout):
    name = "0.1"

    def __init__(self) -> None:
        dialect = create_engine("sqlite://").dialect
        statements = []
        for table in schema.metadata.sorted_tables:
            statements.append(str(CreateTable(table).compile(dialect=dialect)))
            statements += [str(CreateIndex(ix).compile(dialect=dialect)) for ix in table.indexes]
        self.ddl = ";\n".join(statements) + ";"
        self.prelude = (
            "insert into runs (run_id, dag_id, airflow_run_id, fork_task_id, try_number, started_at,"
            f" status, config_hash, chunk_size, branches_json) values ('{RUN}', 'bench', 'run', 'fork',"
            f" 1, '{text_time(T0)}', 'completed', '{'0' * 64}', {CHUNK}, '{CONSUMED}')"
        )

    def rows(self, e: Event) -> dict[str, list[tuple[Any, ...]]]:
        row_id = derive_id(RUN, e.key)
        chunk = e.index // CHUNK
        source = derive_id(RUN, row_id, "source")
        group = derive_id(RUN, row_id, "fork")
        forked_at = text_time(e.started)
        tokens = [(source, RUN, row_id, "source", None, group, None, chunk, forked_at)]
        outcomes = [(None, source, RUN, "forked", 1, None, None, None, forked_at, None)]
        states, payloads = [], [(e.digest.hex(), e.body)]
        join = derive_id(RUN, row_id, "join", "coalesce")
        for branch, body, digest in e.outputs:
            token = derive_id(RUN, row_id, "branch", branch)
            tokens.append((token, RUN, row_id, "branch", branch, group, None, chunk, forked_at))
            outcomes.append((None, token, RUN, "coalesced", 1, None, None, join, text_time(e.decided), None))
            payloads.append((digest.hex(), body))
            state = self._state(token, row_id, f"branch_{branch}", e, e.digest.hex(), digest.hex(), chunk)
            states.append(state)
        merged = derive_id(RUN, row_id, "merged", "coalesce")
        tokens.append((merged, RUN, row_id, "merged", None, None, join, chunk, text_time(e.decided)))
        outcomes.append((None, merged, RUN, "merged", 1, None, None, join, text_time(e.decided), None))
        payloads.append((e.merged_digest.hex(), e.merged_body))
        states.append(
            self._state(merged, row_id, "coalesce", e, None, e.merged_digest.hex(), chunk, MERGE_CONTEXT)
        )
        decided = text_time(e.decided)
        decision = (RUN, "coalesce", row_id, e.key, chunk, "merged", None, ARRIVAL, "require_all", "union")
        decision += (CONSUMED, "{}", "[]", None, merged, decided, 2000, 6, decided)
        return {
            "payloads": payloads,
            "rows": [(RUN, row_id, e.key, e.index, chunk, e.digest.hex(), e.digest.hex())],
            "tokens": tokens,
            "node_states": states,
            "token_outcomes": outcomes,
            "coalesce_decisions": [decision],
        }

    @staticmethod
    def _state(
        token: str,
        row_id: str,
        node: str,
        e: Event,
        input_hash: str | None,
        output: str,
        chunk: int,
        context: str | None = None,
    ) -> tuple[Any, ...]:
        state = (derive_id(token, node, 1), token, RUN, node, 1, "completed", input_hash, output, output)
        ended = text_time(e.started + timedelta(microseconds=80))
        return (*state, None, context, text_time(e.started), ended, 0, text_time(e.recorded), row_id, chunk)


class Events(Layout):
    """One row per event; the value types of 0.1 (see the module's docstring for the ladder)."""

    def __init__(self, name: str, *, int_keys: bool, without_rowid: bool, compact: bool, lean: bool) -> None:
        self.name, self.int_keys, self.compact, self.lean = name, int_keys, compact, lean
        key = "integer" if int_keys else "text"
        hashes = "blob" if compact else "text"
        times = "integer" if compact else "text"
        clustered = " without rowid" if without_rowid else ""
        step_input = "" if lean else f"input_hash {hashes},"
        step_end = "" if lean else f"completed_at {times},"
        chunk_index = "create index ix_step_results_chunk on step_results(run, node, chunk);"
        chunk_index = "" if int_keys else chunk_index
        row_unique = "" if int_keys else "row_id text not null,"
        node_facts = "" if lean else "policy text not null, merge_strategy text not null,"
        self.ddl = f"""
create table source_rows(run {key}, row integer, {row_unique} row_key text not null, chunk integer not null,
    source_hash {hashes} not null, body text not null, primary key (run, row)){clustered};
create unique index ux_source_rows_key on source_rows(run, row_key);
create table step_results(run {key}, node {key}, row integer, attempt integer, status text not null,
    chunk integer not null, {step_input} output_hash {hashes}, output_body text, error_json text,
    context_json text, started_at {times} not null, {step_end} duration_ms integer,
    recorded_at {times} not null, primary key (run, node, row, attempt)){clustered};
{chunk_index}
create table decisions(run {key}, node {key}, row integer, chunk integer not null, decision text not null,
    failure_reason text, details_json text not null, {node_facts}
    consumed text not null, missing_json text, late_json text, collisions_json text,
    merged_hash {hashes}, merged_body text, decided_at {times} not null, wait_ms integer,
    wait_from_first_arrival_ms integer, recorded_at {times} not null,
    primary key (run, node, row)){clustered};
"""

    def _hash(self, digest: bytes) -> bytes | str:
        return digest if self.compact else digest.hex()

    def _time(self, at: datetime) -> int | str:
        return micros(at) if self.compact else text_time(at)

    def rows(self, e: Event) -> dict[str, list[tuple[Any, ...]]]:
        run: int | str = 1 if self.int_keys else RUN
        chunk = e.index // CHUNK
        row_key = (run, e.index) if self.int_keys else (run, e.index, derive_id(RUN, e.key))
        steps = []
        for n, (branch, body, digest) in enumerate(e.outputs):
            node: int | str = n + 1 if self.int_keys else f"branch_{branch}"
            step: tuple[Any, ...] = (run, node, e.index, 1, "completed", chunk)
            if not self.lean:
                step += (self._hash(e.digest),)
            step += (self._hash(digest), body, None, None, self._time(e.started))
            if not self.lean:
                step += (self._time(e.started + timedelta(microseconds=80)),)
            steps.append((*step, 0, self._time(e.recorded)))
        decided = self._time(e.decided)
        decision = (run, 4 if self.int_keys else "coalesce", e.index, chunk, "merged", None, ARRIVAL)
        if not self.lean:
            decision += ("require_all", "union")
        # Nothing missing, nothing late: empty lists in 0.1, nothing at all when lean.
        decision += (CONSUMED, *((None, None) if self.lean else ("{}", "[]")), None)
        decision += (self._hash(e.merged_digest), e.merged_body, decided, 2000, 6, decided)
        return {
            "source_rows": [(*row_key, e.key, chunk, self._hash(e.digest), e.body)],
            "step_results": steps,
            "decisions": [decision],
        }


def ladder() -> list[Layout]:
    return [
        Today(),
        Events("events", int_keys=False, without_rowid=False, compact=False, lean=False),
        Events("+int keys", int_keys=True, without_rowid=False, compact=False, lean=False),
        Events("+without rowid", int_keys=True, without_rowid=True, compact=False, lean=False),
        Events("+compact values", int_keys=True, without_rowid=True, compact=True, lean=False),
        Events("+no derivable", int_keys=True, without_rowid=True, compact=True, lean=True),
    ]


def measure(layout: Layout, rows: int) -> dict[str, Any]:
    """Write ``rows`` source rows' events in ``layout``; the time and the bytes on disk per source row."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "audit.db")
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("pragma journal_mode=wal")
        con.execute("pragma foreign_keys=on")
        con.executescript(layout.ddl)
        if layout.prelude:
            con.execute(layout.prelude)
        inserts: dict[str, str] = {}
        audit_rows = 0
        seconds = 0.0
        stream = events(rows)
        for first in range(0, rows, CHUNK):
            batch: dict[str, list[tuple[Any, ...]]] = {}
            for e in (next(stream) for _ in range(min(CHUNK, rows - first))):
                for table, values in layout.rows(e).items():
                    batch.setdefault(table, []).extend(values)
            start = time.perf_counter()
            con.execute("begin")
            for table, values in batch.items():
                if table not in inserts:
                    marks = ",".join("?" * len(values[0]))
                    inserts[table] = f"insert or ignore into {table} values ({marks})"
                con.executemany(inserts[table], values)
                audit_rows += len(values)
            con.execute("commit")
            seconds += time.perf_counter() - start
        con.execute("pragma wal_checkpoint(truncate)")
        tables = dict(con.execute("select name, sum(pgsize) from dbstat group by name"))
        con.close()
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    return {
        "layout": layout.name,
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / seconds),
        "audit_rows_per_source_row": round(audit_rows / rows, 1),
        "bytes_per_source_row": round(size / rows),
        "largest": sorted(tables.items(), key=lambda kv: -kv[1])[:3],
    }


def table_line(name: str, seconds: float, per_row: float, size: float, floor: dict[str, Any]) -> str:
    return (
        f"{name:<18}{seconds:>8.2f}{seconds / floor['sql_seconds']:>9.1f}{per_row:>9.1f}{size:>8,.0f}"
        f"{size / floor['db_bytes_per_row']:>9.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--json", action="store_true", help="end with the figures as one JSON line")
    opts = parser.parse_args(argv)
    if not LEAN_FLOOR.exists():
        parser.error(f"the lean floor {LEAN_FLOOR} is missing (the repository's parent folder holds shared/)")
    floor = run_lean_floor(opts.rows)
    results = [measure(layout, opts.rows) for layout in ladder()]
    what = f"{opts.rows:,} source rows x {len(BRANCHES)} branches"
    print(f"{what}, SQLite {sqlite3.sqlite_version}, raw executemany; SQL seconds (statements, commits)")
    print(f"{'layout':<18}{'SQL s':>8}{'x floor':>9}{'rows/ev':>9}{'B/row':>8}{'x floor':>9}  largest tables")
    lean_per = floor["audit_rows"] / floor["rows"]
    print(table_line("lean floor", floor["sql_seconds"], lean_per, floor["db_bytes_per_row"], floor))
    for r in results:
        biggest = ", ".join(f"{name} {size / opts.rows:,.0f}" for name, size in r["largest"])
        fields = (r["seconds"], r["audit_rows_per_source_row"], r["bytes_per_source_row"])
        print(table_line(r["layout"], *fields, floor), biggest)
    if opts.json:
        print(json.dumps({"rows": opts.rows, "lean_floor": floor, "layouts": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
