"""Helpers of the operator unit tests: a completed fork written straight through the store."""

from __future__ import annotations

from collections.abc import Sequence

from airflow_elspeth.audit.store import AuditStore, ForkRow, RunIdentity
from airflow_elspeth.core.canonical import hash_value


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
