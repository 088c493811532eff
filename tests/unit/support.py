"""Helpers of the operator and runtime unit tests (no Airflow): a completed fork written straight
through the store, and what the store then holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import text

from airflow_elspeth.audit.store import AuditStore, ForkRow, RunIdentity
from airflow_elspeth.core.canonical import hash_value

WAIT = 120.0  # an upper bound for any wait on another thread: a loaded machine is slower, never wrong


def completed_fork(
    store: AuditStore, *, dag_id: str, airflow_run_id: str, branches: Sequence[str], rows: int
) -> str:
    """A completed audit run of fork task ``fork`` (try 1): ``rows`` rows ``{"id": "r<n>"}`` in one
    chunk, one token per branch. Returns the audit run id."""
    run_id = store.begin_run(
        RunIdentity(dag_id=dag_id, airflow_run_id=airflow_run_id, fork_task_id="fork", try_number=1),
        branches=list(branches),
        chunk_size=rows,
        config={"branches": list(branches)},
    )
    written = []
    for index in range(rows):
        digest, body = hash_value({"id": f"r{index}"}, what="row")
        written.append(ForkRow(row_key=f"r{index}", row_index=index, payload_hash=digest, payload_body=body))
    store.write_fork_chunk(run_id, list(branches), 0, written)
    store.complete_run(run_id, rows_total=rows, chunks_total=1)
    return run_id


def states(store: AuditStore, run_id: str, node: str) -> dict[str, str]:
    """Row key -> status of the node states at ``node``."""
    with store.engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT r.row_key, s.status FROM node_states s JOIN rows r"
                " ON r.run_id = s.run_id AND r.row_id = s.row_id WHERE s.run_id = :r AND s.node_id = :n"
            ),
            {"r": run_id, "n": node},
        ).all()
    return dict(found)


def skipped(store: AuditStore, run_id: str, branch: str) -> set[str]:
    """The row keys whose token on ``branch`` ended ``skipped``."""
    with store.engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT r.row_key FROM token_outcomes o JOIN tokens t ON t.token_id = o.token_id"
                " JOIN rows r ON r.run_id = t.run_id AND r.row_id = t.row_id"
                " WHERE o.run_id = :r AND t.branch_name = :b AND o.is_terminal AND o.outcome = 'skipped'"
            ),
            {"r": run_id, "b": branch},
        ).scalars()
    return set(found)


def wait_for(what: str, check: Callable[[], bool]) -> None:
    """Poll ``check`` until it holds (at most ``WAIT``)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < WAIT, f"never saw {what}"
        time.sleep(0.02)


def in_thread(run: Callable[[], Any], running: list[threading.Thread]) -> dict[str, Any]:
    """Call ``run()`` on a thread added to ``running``; what it returns ends up in the returned dict
    under ``returned``, what it raises under ``error``."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["returned"] = run()
        except BaseException as err:  # reported to the test thread, which asserts on it
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    running.append(thread)
    return outcome
