"""``fork_join``: one call that builds fork → one branch task per branch → coalesce in a TaskGroup."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from airflow.sdk import TaskGroup

from airflow_elspeth.exceptions import ElspethConfigError
from airflow_elspeth.operators.branch import BranchOperator
from airflow_elspeth.operators.fork import ForkOperator
from airflow_elspeth.sensors.coalesce import CoalesceSensor


def fork_join(
    group_id: str,
    *,
    rows: Any,
    branches: Mapping[str, Callable[[dict[str, Any]], dict[str, Any] | None]],
    row_key: str | None = None,
    fork_kwargs: Mapping[str, Any] | None = None,
    branch_kwargs: Mapping[str, Any] | None = None,
    **coalesce_kwargs: Any,
) -> TaskGroup:
    """Build ``fork >> [one BranchOperator per branch] >> coalesce`` inside a TaskGroup.

    The tasks are ``<group_id>.fork``, ``<group_id>.<branch>`` and ``<group_id>.coalesce``; use the
    returned group in dependencies (``load >> group >> publish``) and ``group["coalesce"]`` (or
    ``group.children``) to reach a task. Sugar only: the operators are the API.

    :param group_id: the TaskGroup's id.
    :param rows: as ForkOperator's ``rows``.
    :param branches: branch name -> the row callable of that branch, in branch order.
    :param row_key: as ForkOperator's ``row_key``.
    :param fork_kwargs: extra ForkOperator arguments (e.g. ``chunk_size``; ``audit_conn_id``, which the
        branches and the coalesce inherit).
    :param branch_kwargs: extra arguments for every BranchOperator (e.g. ``row_retries``).
    :param coalesce_kwargs: CoalesceSensor arguments (``policy``, ``quorum``, ``merge``, ``timeout`` …).
    """
    if not isinstance(branches, Mapping) or not branches:
        raise ElspethConfigError(f"branches must map branch names to callables, got {branches!r}")
    with TaskGroup(group_id=group_id) as group:
        fork = ForkOperator(
            task_id="fork", rows=rows, branches=list(branches), row_key=row_key, **dict(fork_kwargs or {})
        )
        branch_tasks = [
            BranchOperator(
                task_id=name, fork=fork, branch=name, python_callable=func, **dict(branch_kwargs or {})
            )
            for name, func in branches.items()
        ]
        coalesce = CoalesceSensor(task_id="coalesce", fork=fork, **coalesce_kwargs)
        fork >> branch_tasks >> coalesce
    return group
