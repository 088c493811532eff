"""A fork given a literal list of row keys instead of rows: refused when the DAG file is parsed
(naming the DAG, the task, ``rows`` and the index of the first bad row), not when the fork runs."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_elspeth import ForkOperator

with DAG(
    dag_id="invalid_fork_rows_not_dicts", schedule=None, start_date=datetime(2026, 1, 1), catchup=False
) as dag:
    ForkOperator(task_id="fork", rows=["doc-1", "doc-2"], row_key="id", branches=["a", "b"])
