"""What the three Airflow shells of a coalesce share: its sensor, its trigger and its finalizer.

The coalesce's :class:`~airflow_elspeth.audit.model.CoalesceSpec` built from its task (so the
finalizer never calls into the sensor), the XCom key of its summary, and the branch tasks' states
read through the Task SDK. Each shell then reaches the audit store through one
:class:`~airflow_elspeth.audit.service.CoalesceService`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from airflow_elspeth.audit.service import CoalesceSpec
from airflow_elspeth.exceptions import TopologyError
from airflow_elspeth.topology import coalesce_contract, delivering_steps

SUMMARY_XCOM_KEY = "coalesce_summary"


def coalesce_spec(coalesce: Any) -> CoalesceSpec:
    """A coalesce task's spec: its configuration and each branch's delivering step (the
    BranchOperator of its fork directly upstream), with the merged rows' contract.

    :param coalesce: a CoalesceSensor in its DAG.
    :raises ElspethConfigError: the structure is invalid (``TopologyError``: the cluster policy
        refuses such a DAG at parse time; this is for one that bypassed it), or a mapped step's
        ``output_fields`` are.
    """
    steps = delivering_steps(coalesce)
    return CoalesceSpec(
        node_id=coalesce.task_id,
        config=coalesce.coalesce,
        delivering={branch: task_id for branch, (task_id, _) in steps.items()},
        mapped={branch: mapped for branch, (_, mapped) in steps.items()},
        output_contract=output_contract(coalesce),
    )


def output_contract(coalesce: Any) -> dict[str, Any] | None:
    """The contract of the rows a coalesce task merges (``{"fields": {field: [types]},
    "untyped_branches": [...]}``), from its branches' delivering steps' ``output_fields``
    (``union``: merged; ``select``: the selected branch's); None for ``nested``.

    :raises TopologyError: the branches declare one field with different types.
    """
    merged = coalesce_contract(coalesce)
    if merged is None:
        return None
    if merged.conflicts:
        raise TopologyError(
            f"coalesce {coalesce.task_id!r}: " + "; ".join(c.message for c in merged.conflicts)
        )
    return merged.as_dict()


def read_task_states(
    get_task_states: Callable[..., Any], dag_id: str, airflow_run_id: str, task_ids: Iterable[str]
) -> dict[str, str]:
    """States of tasks of one DAG run through the Task SDK, one task id per call (a mapped task's
    instances come back as ``<task_id>_<map_index>``); tasks without a state are left out.

    :param get_task_states: ``RuntimeTaskInstance.get_task_states`` (a task's ``ti`` or the class).
    """
    states: dict[str, str] = {}
    for task_id in task_ids:
        found = get_task_states(dag_id=dag_id, task_ids=[task_id], run_ids=[airflow_run_id])
        run_states = (found or {}).get(airflow_run_id, {})
        states.update({key: str(state) for key, state in run_states.items() if state is not None})
    return states
