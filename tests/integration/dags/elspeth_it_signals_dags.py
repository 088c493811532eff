"""The test DAG of the Airflow-native signals: OpenLineage run facets and the Asset event's summary.

``fork >> [ask_a, ask_b] >> coalesce`` over six rows ``r0..r5``; branch ``a`` raises on ``r1`` and
``r4``, so the ``require_all`` coalesce fails those two rows and merges four. In ``DAG_ID`` the two
failures are tolerated (the coalesce succeeds); in ``FAILING_DAG_ID`` none is (it fails). The
coalesce's outlet is the asset ``ASSET_URI``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, Asset
from integration.support import integration_dag, selected

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

DAG_ID = "elspeth_it_signals"
FAILING_DAG_ID = "elspeth_it_signals_failing"
ASSET_URI = "elspeth://integration/signals/merged"
BRANCHES = ("a", "b")
ROW_COUNT = 6
FAILING_ROWS = (1, 4)  # branch "a" raises on these rows


def answer_a(row: dict[str, Any]) -> dict[str, Any]:
    if row["n"] in FAILING_ROWS:
        raise ValueError(f"a cannot answer {row['id']}")
    return {"a_value": row["n"]}


def answer_b(row: dict[str, Any]) -> dict[str, Any]:
    return {"b_value": row["n"]}


def build_dag(dag_id: str = DAG_ID) -> DAG:
    with integration_dag(dag_id) as dag:
        rows = [{"id": f"r{n}", "n": n} for n in range(ROW_COUNT)]
        fork = ForkOperator(task_id="fork", rows=rows, row_key="id", branches=list(BRANCHES))
        ask_a = BranchOperator(task_id="ask_a", fork=fork, branch="a", python_callable=answer_a)
        ask_b = BranchOperator(task_id="ask_b", fork=fork, branch="b", python_callable=answer_b)
        coalesce = CoalesceSensor(
            task_id="coalesce",
            fork=fork,
            policy="require_all",
            timeout=timedelta(seconds=60),
            tolerated_failures=len(FAILING_ROWS) if dag_id == DAG_ID else 0,
            outlets=[Asset(ASSET_URI)],
        )
        fork >> [ask_a, ask_b] >> coalesce
    return dag


# Like the other DAG files here: parsing builds only the DAGs named in ELSPETH_IT_DAGS (all if unset).
for _dag_id in selected([DAG_ID, FAILING_DAG_ID]):
    globals()[_dag_id] = build_dag(_dag_id)
