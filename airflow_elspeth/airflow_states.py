"""Task states read from Airflow's own metadata DB: the only read of that database in the provider.

``airflow-elspeth verify`` and ``report`` import this module only when they read Airflow task states
(to catch audit runs and rows whose fork or coalesce task has ended, to show the coalesce task's
state), as the UI index does; the audit layer takes the states as a plain mapping,
:data:`airflow_elspeth.audit.read.limbo.TaskStates`.
Read-only, with an engine of its own; Airflow itself is imported only to find the metadata DB's URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Set

from sqlalchemy import bindparam, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from airflow_elspeth.exceptions import AirflowStatesUnavailable

# (dag_id, airflow_run_id) -> the task ids whose states are wanted.
WantedTasks = Mapping[tuple[str, str], Set[str]]

_BATCH = 500


def quiet_airflow() -> None:
    """Call right before importing Airflow, which configures its logging when first imported.

    Keeps Airflow's INFO chatter out of a terminal report unless the user asked for a level.
    """
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")


def _airflow_metadata_url() -> str:
    """The metadata DB Airflow is configured with (``[database] sql_alchemy_conn``)."""
    quiet_airflow()
    try:
        from airflow.configuration import conf
    except Exception as err:  # Airflow not importable
        raise AirflowStatesUnavailable(f"Airflow is not importable ({type(err).__name__}: {err})") from err
    try:
        url = conf.get("database", "sql_alchemy_conn")
    except Exception as err:
        raise AirflowStatesUnavailable(
            f"no [database] sql_alchemy_conn ({type(err).__name__}: {err})"
        ) from err
    if not url:
        raise AirflowStatesUnavailable("[database] sql_alchemy_conn is empty")
    return str(url)


def airflow_task_states(
    wanted: WantedTasks, url: str | None = None
) -> tuple[dict[tuple[str, str, str], str], str]:
    """The states of the wanted (unmapped) task instances, read from Airflow's metadata DB.

    Nothing wanted: nothing is read, and Airflow is not imported. A SQLite file that does not exist
    is "unavailable" (never created). :returns: (states, where they were read).
    :raises AirflowStatesUnavailable: when they cannot be read.
    """
    states: dict[tuple[str, str, str], str] = {}
    if not wanted:
        return states, "nothing to look up"
    url = url or _airflow_metadata_url()
    try:
        parsed = make_url(url)
    except Exception as err:
        raise AirflowStatesUnavailable(f"unreadable metadata DB URL ({type(err).__name__})") from err
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or not os.path.exists(database):
            raise AirflowStatesUnavailable(f"no Airflow metadata DB at {database or '(memory)'}")
    connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
    metadata = create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
    query = text(
        "SELECT dag_id, run_id, task_id, state FROM task_instance "
        "WHERE map_index = -1 AND dag_id = :dag_id AND run_id IN :run_ids"
    ).bindparams(bindparam("run_ids", expanding=True))
    by_dag: dict[str, list[str]] = {}
    for dag_id, airflow_run_id in wanted:
        by_dag.setdefault(dag_id, []).append(airflow_run_id)
    try:
        with metadata.connect() as conn:
            for dag_id, airflow_run_ids in sorted(by_dag.items()):
                for start in range(0, len(airflow_run_ids), _BATCH):
                    part = airflow_run_ids[start : start + _BATCH]
                    for ti_dag, ti_run, task_id, state in conn.execute(
                        query, {"dag_id": dag_id, "run_ids": part}
                    ):
                        if state is not None and task_id in wanted.get((ti_dag, ti_run), ()):
                            states[(ti_dag, ti_run, task_id)] = str(state)
    except Exception as err:
        first = str(getattr(err, "orig", None) or err).splitlines()[0] if str(err) else ""
        raise AirflowStatesUnavailable(f"{shown} could not be read ({type(err).__name__}: {first})") from err
    finally:
        metadata.dispose()
    return states, f"{shown} ({len(states)} task instances)"
