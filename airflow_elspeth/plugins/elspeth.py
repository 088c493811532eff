"""ElspethPlugin: the audit pages on the Airflow 3 API server, as tabs of DAG runs and task instances.

- ``fastapi_apps``: :func:`airflow_elspeth.plugins.app.create_app` mounted at ``/elspeth``.
- ``external_views``: an "Audit" tab on the DAG run page and on the task instance page, and an
  "Elspeth audit" entry under Browse.

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


def _external_views() -> list[dict[str, Any]]:
    base = base_path() + URL_PREFIX
    return [
        {
            "name": "Audit",
            "href": base + "/dags/{DAG_ID}/runs/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "elspeth-audit",
        },
        {
            "name": "Audit",
            "href": base + "/dags/{DAG_ID}/runs/{RUN_ID}/tasks/{TASK_ID}?map_index={MAP_INDEX}",
            "destination": "task_instance",
            "url_route": "elspeth-audit-task",
        },
        {
            "name": "Elspeth audit",
            "href": base + "/",
            "destination": "nav",
            "category": "browse",
            "url_route": "elspeth",
        },
    ]


class ElspethPlugin(AirflowPlugin):
    """Audit pages of Elspeth fork/join runs (read-only; every page checks DAG read access)."""

    name = "elspeth"
    fastapi_apps = _OnFirstUse(_fastapi_apps)
    external_views = _OnFirstUse(_external_views)
