"""The Airflow DAGs of tests/integration/test_labels.py: a few scenarios of elspeth_it_dags.py, each in the
coalesce's reschedule mode and deferrable (``<scenario>__reschedule`` / ``<scenario>__deferrable``),
so the labels of the audit trail can be compared across waiting modes."""

from __future__ import annotations

from integration.support import dag_module, selected

M = dag_module()

LABEL_SCENARIOS = (
    "elspeth_it_require_all_hang",
    "elspeth_it_quorum_hang",
    "elspeth_it_quorum_late",
    "elspeth_it_best_effort_late",
)
MODES = ("reschedule", "deferrable")
# Which branch a ``first`` coalesce merges depends on the order dag.test() runs the branches in:
# run in both modes, but not compared.
ORDER_DEPENDENT = "elspeth_it_first_all_arrive"


def variant(scenario: str, mode: str) -> str:
    return f"{scenario}__{mode}"


SPECS = {
    variant(name, mode): M.SCENARIOS[name].with_(dag_id=variant(name, mode), deferrable=mode == "deferrable")
    for name in (*LABEL_SCENARIOS, ORDER_DEPENDENT)
    for mode in MODES
}

for _dag_id in selected(SPECS):
    globals()[_dag_id] = M.build_dag(SPECS[_dag_id])
