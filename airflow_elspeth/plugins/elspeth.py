"""ElspethPlugin: the audit pages on the Airflow 3 API server, as tabs of DAG runs and task instances.

- ``fastapi_apps``: :func:`airflow_elspeth.plugins.app.create_app` mounted at ``/elspeth``.
- ``external_views``: a "Fork/join audit" tab on the DAG run page (the run's audit) and on the task
  instance page (that task's part: a fork's rows and chunks, a branch step's results and losses, a
  coalesce's decisions), and a "Fork/join audit" entry under Browse (the index of audit runs). Not
  "Audit": Airflow has its own "Audit Log".

Every process that loads plugins imports this module (scheduler, workers, triggerer, API server),
so it imports nothing heavy: the FastAPI app is built, and the base URL read, the first time the API
server asks for them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from airflow.sdk.plugins_manager import AirflowPlugin

URL_PREFIX = "/elspeth"


def base_path() -> str:
    """The path of ``[api] base_url`` (empty when Airflow is served at the root)."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


class _OnFirstUse:
    """A class attribute computed when first read, then kept (plugins are used as classes)."""

    def __init__(self, build: Any) -> None:
        self.build = build
        self.value: Any = None

    def __get__(self, instance: Any, owner: type) -> Any:
        if self.value is None:
            self.value = self.build()
        return self.value


def _fastapi_apps() -> list[dict[str, Any]]:
    from airflow_elspeth.plugins.app import create_app

    return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Elspeth audit"}]


TAB_NAME = "Fork/join audit"
RUN_TAB_ROUTE = "elspeth-audit"
TASK_TAB_ROUTE = "elspeth-audit-task"
INDEX_ROUTE = "fork-join-audit"


def _external_views() -> list[dict[str, Any]]:
    base = base_path() + URL_PREFIX
    return [
        {
            "name": TAB_NAME,
            "href": base + "/dags/{DAG_ID}/runs/{RUN_ID}",
            "destination": "dag_run",
            "url_route": RUN_TAB_ROUTE,
        },
        {
            "name": TAB_NAME,
            "href": base + "/dags/{DAG_ID}/runs/{RUN_ID}/tasks/{TASK_ID}?map_index={MAP_INDEX}",
            "destination": "task_instance",
            "url_route": TASK_TAB_ROUTE,
        },
        {
            # Airflow shows a nav view at /plugin/<url_route> and then mirrors the frame's own path
            # into its address bar: /plugin/fork-join-audit/elspeth/ is this index, reloadable.
            "name": TAB_NAME,
            "href": base + "/",
            "destination": "nav",
            "category": "browse",
            "url_route": INDEX_ROUTE,
        },
    ]


def task_tab_url(dag_id: str, run_id: str, task_id: str, map_index: int | None = None) -> str:
    """The Airflow UI page of a task instance with this plugin's tab open (Airflow's route
    ``dags/:dagId/runs/:runId/tasks/:taskId[/mapped/:mapIndex]/plugin/:page``)."""
    from urllib.parse import quote

    dag, run, task = (quote(x, safe="") for x in (dag_id, run_id, task_id))
    mapped = f"/mapped/{map_index}" if map_index is not None and map_index >= 0 else ""
    return f"{base_path()}/dags/{dag}/runs/{run}/tasks/{task}{mapped}/plugin/{TASK_TAB_ROUTE}"


class ElspethPlugin(AirflowPlugin):
    """Audit pages of Elspeth fork/join runs (read-only; every page checks DAG read access)."""

    name = "elspeth"
    fastapi_apps = _OnFirstUse(_fastapi_apps)
    external_views = _OnFirstUse(_external_views)
