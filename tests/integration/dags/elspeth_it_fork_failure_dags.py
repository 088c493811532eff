"""Test DAGs of forks that fail: a source raising part-way, on the first try only, bad row keys,
a row over ``[elspeth] max_row_bytes`` (a flat one, and one of shared references expanding to 2**50
values), a SIGTERM while the source still has rows.

Every DAG is ``fork >> [ask_a, ask_b] >> coalesce`` with a callable source. Like
``elspeth_it_dags.py``, parsing this file builds only the DAGs named in ``ELSPETH_IT_DAGS`` (all of
them when it is unset); the tests build theirs with :func:`build_dag`, which also takes the marker
file a first-try-only failure is keyed on.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG
from integration.support import integration_dag, selected

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

BRANCHES = ("a", "b")
FAIL_AFTER = 2500  # rows yielded before the source raises
CHUNK_SIZE = 1000
SMALL_CHUNK_SIZE = 2
BAD_ROW_INDEX = 4  # after two whole chunks of SMALL_CHUNK_SIZE
LONG_KEY_CHARS = 3000
OVERSIZE_LIMIT = 4096  # the [elspeth] max_row_bytes its test sets
BOMB_LEVELS = 50  # [x, x] this many times over: 2**50 leaves from 51 lists
ROWS_AFTER_SIGTERM = 20_000  # what the source still yields after the SIGTERM, unless it stops the fork
SOURCE_ERROR = f"source connection lost after {FAIL_AFTER} rows"

SOURCE_FAILS = "elspeth_it_fork_source_fails"
SOURCE_FAILS_ONCE = "elspeth_it_fork_source_fails_once"
LONG_KEY = "elspeth_it_fork_long_key"
NUL_KEY = "elspeth_it_fork_nul_key"
COMPLETE_FAILS = "elspeth_it_fork_complete_fails"
OVERSIZE_ROW = "elspeth_it_fork_oversize_row"
BOMB_ROW = "elspeth_it_fork_bomb_row"
SIGTERM = "elspeth_it_fork_sigterm"
DAG_IDS = (
    SOURCE_FAILS,
    SOURCE_FAILS_ONCE,
    LONG_KEY,
    NUL_KEY,
    COMPLETE_FAILS,
    OVERSIZE_ROW,
    BOMB_ROW,
    SIGTERM,
)

BAD_ROW_KINDS = {LONG_KEY: "long", NUL_KEY: "nul", OVERSIZE_ROW: "oversize", BOMB_ROW: "bomb"}

# The exception each failed fork reported, by dag_id (its on_failure_callback records it).
FORK_ERRORS: dict[str, str] = {}


def failing_source(marker: Path | None) -> Iterator[dict[str, Any]]:
    """``FAIL_AFTER`` rows, then RuntimeError; with a ``marker``, only while the marker is absent
    (the first call creates it, so a retry of the fork gets every row)."""
    fail = True
    if marker is not None:
        fail = not marker.exists()
        marker.touch()
    for n in range(FAIL_AFTER):
        yield {"id": f"r{n}", "n": n}
    if fail:
        raise RuntimeError(SOURCE_ERROR)


def shared_references(levels: int) -> Any:
    """``x = [1]``, then ``x = [x, x]`` ``levels`` times: a few objects, 2**levels leaves."""
    value: Any = [1]
    for _ in range(levels):
        value = [value, value]
    return value


def sigterm_source() -> Iterator[dict[str, Any]]:
    """BAD_ROW_INDEX rows, then SIGTERM to this process, as the supervisor sends it, then
    ROWS_AFTER_SIGTERM more rows: only the fork's on_kill ends the try before they are written.

    Only with the task runner's own handler installed (dag.test() runs tasks in the test process):
    never kill the test process itself.
    """
    for n in range(BAD_ROW_INDEX):
        yield {"id": f"r{n}", "n": n}
    handler = signal.getsignal(signal.SIGTERM)
    if not callable(handler) or "_on_term" not in getattr(handler, "__qualname__", ""):
        raise RuntimeError(f"the task runner's SIGTERM handler is not installed ({handler!r})")
    os.kill(os.getpid(), signal.SIGTERM)
    for n in range(BAD_ROW_INDEX, BAD_ROW_INDEX + ROWS_AFTER_SIGTERM):
        yield {"id": f"r{n}", "n": n}


def bad_key_source(kind: str) -> Iterator[dict[str, Any]]:
    """Six rows; the one at BAD_ROW_INDEX has, with ``kind`` "long" or "nul", a 3000-character key
    or a key containing NUL; with "oversize" a field of OVERSIZE_LIMIT characters; with "bomb" a
    field of BOMB_LEVELS shared-reference levels, built here, in the fork's own process (any other
    kind: six good rows)."""
    for n in range(6):
        row: dict[str, Any] = {"id": f"r{n}", "n": n}
        if n == BAD_ROW_INDEX and kind == "long":
            row["id"] = "k" * LONG_KEY_CHARS
        elif n == BAD_ROW_INDEX and kind == "nul":
            row["id"] = "r\x004"
        elif n == BAD_ROW_INDEX and kind == "oversize":
            row["text"] = "x" * OVERSIZE_LIMIT
        elif n == BAD_ROW_INDEX and kind == "bomb":
            row["tree"] = shared_references(BOMB_LEVELS)
        yield row


def _record_fork_error(context: Any) -> None:
    exception = context.get("exception")
    FORK_ERRORS[context["ti"].dag_id] = str(exception) if exception is not None else "<no exception>"


def _answer(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "answer": int(row["n"]) * 2}


def build_dag(dag_id: str, marker: Path | None = None) -> DAG:
    """One test DAG; ``marker`` is the first-try marker of SOURCE_FAILS_ONCE."""
    rows: Any
    retries = 0
    chunk_size = CHUNK_SIZE
    if dag_id == SOURCE_FAILS:
        rows = lambda: failing_source(None)  # noqa: E731
    elif dag_id == SOURCE_FAILS_ONCE:
        rows = lambda: failing_source(marker)  # noqa: E731 - without a marker: fails every try
        retries = 1
    elif dag_id in BAD_ROW_KINDS:
        kind = BAD_ROW_KINDS[dag_id]
        rows = lambda: bad_key_source(kind)  # noqa: E731
        chunk_size = SMALL_CHUNK_SIZE
    elif dag_id == SIGTERM:
        rows = sigterm_source
        chunk_size = SMALL_CHUNK_SIZE
    elif dag_id == COMPLETE_FAILS:
        rows = lambda: bad_key_source("good")  # noqa: E731
        chunk_size = SMALL_CHUNK_SIZE
    else:
        raise ValueError(f"unknown fork failure DAG {dag_id!r}")
    with integration_dag(dag_id) as dag:
        fork = ForkOperator(
            task_id="fork",
            rows=rows,
            row_key="id",
            branches=list(BRANCHES),
            chunk_size=chunk_size,
            retries=retries,
            retry_delay=timedelta(0),
            on_failure_callback=_record_fork_error,
        )
        steps = [
            BranchOperator(task_id=f"ask_{b}", fork=fork, branch=b, python_callable=_answer, batch_size=1000)
            for b in BRANCHES
        ]
        coalesce = CoalesceSensor(
            task_id="coalesce",
            fork=fork,
            policy="require_all",
            timeout=timedelta(seconds=60),
            poke_interval=1,
        )
        fork >> steps >> coalesce
    return dag


for _dag_id in selected(DAG_IDS):
    globals()[_dag_id] = build_dag(_dag_id)
