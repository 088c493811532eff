"""Configuration errors that say where: the DAG and the task, in front of the parameter.

Core validation (``core/config.py``, ``core/contract.py``) and the audit store's configuration
(``hooks/audit.py``, ``[elspeth]`` settings) know neither the DAG nor the task, and Airflow shows an
import error's traceback cut to its last frames (``[core] dagbag_import_error_traceback_depth``),
which are the provider's, not the DAG file's. So the operators name them: their constructors through
:func:`names_task`, their runs through :func:`in_task`. A task built outside any DAG (added to one
later, by ``dag.add_task`` or ``>>``) is named by its task id alone; the DAG-level checks
(:func:`airflow_elspeth.topology.check_dag`, through the cluster policy) name the DAG as well.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from airflow_elspeth.exceptions import ElspethConfigError

Init = TypeVar("Init", bound=Callable[..., None])


def _where(kwargs: dict[str, Any]) -> tuple[str | None, str | None]:
    """The DAG id and the task id of the task being constructed from ``kwargs``.

    Airflow's ``apply_defaults`` (``BaseOperatorMeta``) has put the DAG and the task group of the
    surrounding ``with DAG`` / ``with TaskGroup`` into ``kwargs`` before the constructor runs; the
    task id is prefixed with its group's id as ``BaseOperator`` does.
    """
    task_id, dag, group = kwargs.get("task_id"), kwargs.get("dag"), kwargs.get("task_group")
    if not isinstance(task_id, str):
        return None, None
    if group is not None:
        task_id = group.child_id(task_id)
    dag_id = getattr(dag, "dag_id", None)
    return (dag_id if isinstance(dag_id, str) else None), task_id


def names_task(init: Init) -> Init:
    """Decorate an elspeth operator's ``__init__``: an :class:`ElspethConfigError` it raises names
    the DAG and the task (see :meth:`ElspethConfigError.located`).

    :param init: the constructor, keyword arguments only (as Airflow's operators are).
    """

    @functools.wraps(init)
    def constructor(self: Any, **kwargs: Any) -> None:
        try:
            init(self, **kwargs)
        except ElspethConfigError as err:
            raise _located(err, *_where(kwargs)) from err.__cause__

    return constructor  # type: ignore[return-value]


@contextmanager
def in_task(task: Any) -> Iterator[None]:
    """Within a task's run: an :class:`ElspethConfigError` (its audit store's connection, an
    ``[elspeth]`` setting) names the task's DAG and the task.

    :param task: the running operator.
    """
    try:
        yield
    except ElspethConfigError as err:
        raise _located(err, task.dag_id if task.has_dag() else None, task.task_id) from err.__cause__


def _located(err: ElspethConfigError, dag_id: str | None, task_id: str | None) -> ElspethConfigError:
    """``err`` naming the DAG and the task (itself if it names them already), with its traceback:
    what the caller raises, from ``err``'s own cause, so the traceback reads as the original's."""
    located = err.located(dag_id, task_id)
    return err if located is err else located.with_traceback(err.__traceback__)
