"""Airflow cluster policy: an elspeth DAG with a broken fork/branch/coalesce structure fails to import.

Registered through the ``airflow.policy`` setuptools entry point (``pyproject.toml``), which Airflow
loads when it initialises (``airflow.settings.initialize`` -> ``load_policy_plugins``). The DagBag
calls :func:`dag_policy` for every DAG it bags; a raised ``AirflowClusterPolicyViolation`` keeps the
DAG out of the bag and is recorded as the file's import error, so a coalesce over a branch that no
step of its fork delivers is reported when the DAG is parsed, not when it runs.
"""

from __future__ import annotations

from typing import Any

from airflow.policies import hookimpl


def structure_error(dag: Any) -> str | None:
    """The import error message for ``dag``'s structure problems, or None when it has none.

    DAGs without elspeth tasks are not inspected.

    :param dag: a DAG.
    """
    from airflow_elspeth import topology

    if not topology.has_elspeth_tasks(dag):
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
