"""Airflow cluster policy: an elspeth DAG with a broken fork/branch/coalesce structure fails to import.

Registered through the ``airflow.policy`` setuptools entry point (``pyproject.toml``), which Airflow
loads when it initialises (``airflow.settings.initialize`` -> ``load_policy_plugins``). The DagBag
calls :func:`dag_policy` for every DAG it bags; a raised ``AirflowClusterPolicyViolation`` keeps the
DAG out of the bag and is recorded as the file's import error, so a coalesce over a branch that no
step of its fork delivers is reported when the DAG is parsed, not when it runs.

A sound DAG that is certain to fail rows, or waits in a way Airflow handles badly
(:func:`airflow_elspeth.topology.dag_warnings`), is bagged, with each warning issued once per parse as
an :class:`~airflow_elspeth.exceptions.ElspethDagWarning` naming the DAG and the task (Airflow writes
Python warnings to its log where it has configured logging).
Airflow 3.3's "DAG warnings" (``airflow.models.dagwarning``) take only Airflow's own closed
``DagWarningType`` (asset conflicts, missing pools, runtime-varying values) and the DAG processor
records Python warnings only while it imports the file, before the policy runs; so the warning goes
to the DAG processor's log of that file and, attributed to the DAG file, to whoever parses the DAG
with warnings shown (``python my_dag.py``, ``pytest``, ``airflow dags test``).
"""

from __future__ import annotations

import warnings
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


def warn_structure(dag: Any) -> list[str]:
    """Issue each of ``dag``'s parse-time warnings once, as an
    :class:`~airflow_elspeth.exceptions.ElspethDagWarning` naming the DAG; returns them.

    :param dag: a DAG.
    """
    from airflow_elspeth import topology
    from airflow_elspeth.exceptions import ElspethDagWarning

    if not topology.has_elspeth_tasks(dag):
        return []
    found = topology.dag_warnings(dag)
    for message in found:
        # Issued once, as a warning only: wherever Airflow has configured its logging (the DAG
        # processor, a task's parse of its file) it writes Python warnings to the log itself
        # (logger ``py.warnings``), so a log record of our own would say everything twice. No
        # registry: every parse issues it again. Attributed to the DAG's file, not to this module:
        # that is where the author looks.
        warnings.warn_explicit(
            f"DAG {dag.dag_id!r}: {message}",
            ElspethDagWarning,
            filename=str(getattr(dag, "fileloc", "") or __file__),
            lineno=1,
        )
    return found


@hookimpl
def dag_policy(dag: Any) -> None:
    """Refuse a DAG whose forks, branch steps and coalesces do not fit together; warn about one
    certain to fail rows.

    :param dag: the DAG being bagged.
    :raises AirflowClusterPolicyViolation: listing every problem (see
        :func:`airflow_elspeth.topology.check_dag`).
    """
    message = structure_error(dag)
    if message is not None:
        from airflow.exceptions import AirflowClusterPolicyViolation

        raise AirflowClusterPolicyViolation(message)
    warn_structure(dag)
