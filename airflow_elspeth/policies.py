"""Airflow cluster policy: an elspeth DAG with a broken fork/branch/coalesce structure fails to import.

Registered through the ``airflow.policy`` setuptools entry point (``pyproject.toml``), which Airflow
loads when it initialises (``airflow.settings.initialize`` -> ``load_policy_plugins``). The DagBag
calls :func:`dag_policy` for every DAG it bags; a raised ``AirflowClusterPolicyViolation`` keeps the
DAG out of the bag and is recorded as the file's import error, so a coalesce over a branch that no
step of its fork delivers is reported when the DAG is parsed, not when it runs.
"""

from __future__ import annotations

import importlib
import logging
from functools import cache
from typing import Any

from airflow.policies import hookimpl

log = logging.getLogger(__name__)

# (module, class, role): the classes whose ``_elspeth_role`` marker the check reads.
ROLE_CLASSES = (
    ("airflow_elspeth.operators.fork", "ForkOperator", "fork"),
    ("airflow_elspeth.operators.branch", "BranchOperator", "branch"),
    ("airflow_elspeth.sensors.coalesce", "CoalesceSensor", "coalesce"),
)


def unmarked_classes() -> list[str]:
    """The operator classes that do not carry their role marker (``_elspeth_role``); normally none.

    With a marker missing the structure cannot be read (every coalesce would seem to have no
    steps), so the policy checks nothing rather than reject every DAG.
    """
    missing = []
    for module, name, role in ROLE_CLASSES:
        cls = getattr(importlib.import_module(module), name)
        if getattr(cls, "_elspeth_role", None) != role:
            missing.append(f"{name}._elspeth_role = {role!r}")
    return missing


@cache
def _warn_unmarked(missing: tuple[str, ...]) -> None:
    log.warning("airflow_elspeth: DAG structure not checked, the operator classes lack %s", missing)


def structure_error(dag: Any) -> str | None:
    """The import error message for ``dag``'s structure problems, or None when it has none.

    DAGs without elspeth tasks are not inspected.

    :param dag: a DAG.
    """
    from airflow_elspeth import topology

    if not topology.has_elspeth_tasks(dag):
        return None
    missing = unmarked_classes()
    if missing:
        _warn_unmarked(tuple(missing))
        return None
    problems = topology.check_dag(dag)
    if not problems:
        return None
    listed = "\n".join(f"  - {problem}" for problem in problems)
    return f"DAG {dag.dag_id!r}: {len(problems)} fork/branch/coalesce structure problem(s):\n{listed}"


@hookimpl
def dag_policy(dag: Any) -> None:
    """Refuse a DAG whose forks, branch steps and coalesces do not fit together.

    :param dag: the DAG being bagged.
    :raises AirflowClusterPolicyViolation: listing every problem (see
        :func:`airflow_elspeth.topology.check_dag`).
    """
    message = structure_error(dag)
    if message is not None:
        from airflow.exceptions import AirflowClusterPolicyViolation

        raise AirflowClusterPolicyViolation(message)
