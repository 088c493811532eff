"""Fixtures of the UI tests: Airflow's own API app with the plugin mounted, users, and audit data.

* ``airflow_api`` (session): ``airflow.api_fastapi.app.create_app("core")`` - the API server's app,
  with the Elspeth plugin mounted by Airflow's plugin manager from the installed entry point - under
  the SimpleAuthManager with known users and passwords (``USERS``), ``simple_auth_manager_all_admins``
  off, on a migrated metadata DB in the suite's AIRFLOW_HOME.
* ``elspeth_app``: the mounted FastAPI sub-app (where the audit store dependency is overridden).
* ``client``: a TestClient of the whole API app; ``token(user)`` mints a JWT the way the auth
  manager's ``/auth/token`` does; ``auth(user)`` is the matching Authorization header.
* ``ui_store`` (session): an SQLite audit store with the runs the tests look at (``STORE_RUNS``),
  written through the store's own write path; ``use_store(engine)`` points the app at a store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .audit_data import Arrive, BuiltRun, Drop, Error, ExtraCoalesce, build_run, consensus_behaviour

PASSWORDS = {"admin": "admin-pw", "viewer": "viewer-pw", "outsider": "outsider-pw", "nobody": "nobody-pw"}
ROLES = {"admin": "admin", "viewer": "viewer", "outsider": "viewer", "nobody": ""}
# "nobody" has no role: authenticated, but allowed nothing.
USERS = ",".join(f"{user}:{role}" for user, role in ROLES.items())

XSS_DAG = "xss_dag"
XSS_RUN = "manual__xss"
XSS_BRANCHES = ["<script>alert(1)</script>", "b&\"q'", "plain"]
XSS_KEY = "<img src=x onerror=alert(1)>"
XSS_ERROR = "<b>boom</b> & <i>more</i>"
CONSENSUS_DAG = "consensus_dag"
CONSENSUS_RUN = "manual__2026-01-01T00:00:00+00:00"
SECRET_DAG = "secret_dag"
SECRET_RUN = "manual__secret"
SECRET_KEY = "top-secret-row"


@dataclass(frozen=True)
class StoreRuns:
    url: str
    xss: BuiltRun
    consensus_try1: BuiltRun
    consensus_try2: BuiltRun
    secret: BuiltRun


@pytest.fixture(scope="session")
def ui_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """SimpleAuthManager with known users and passwords (set before the app reads them)."""
    directory = tmp_path_factory.mktemp("ui-auth")
    passwords = directory / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    env = {
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": USERS,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__API_AUTH__JWT_SECRET": "elspeth-ui-tests-" + "0123456789abcdef" * 4,
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def airflow_api(ui_env: dict[str, str], airflow_metadata: str) -> Iterator[Any]:
    from airflow.api_fastapi.app import create_app, purge_cached_app

    purge_cached_app()
    app = create_app("core")
    try:
        yield app
    finally:
        purge_cached_app()


@pytest.fixture(scope="session")
def elspeth_app(airflow_api: Any) -> Any:
    """The sub-app Airflow mounted at /elspeth, found among the API app's routes."""
    from fastapi import FastAPI
    from starlette.routing import Mount

    mounted = [r.app for r in airflow_api.routes if isinstance(r, Mount) and r.path == "/elspeth"]
    assert len(mounted) == 1 and isinstance(mounted[0], FastAPI), (
        "the plugin's app is not mounted at /elspeth"
    )
    return mounted[0]


@pytest.fixture
def client(airflow_api: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(airflow_api) as test_client:
        yield test_client


@pytest.fixture
def token(airflow_api: Any) -> Callable[[str], str]:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    def mint(user: str) -> str:
        return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=user, role=ROLES[user]))

    return mint


@pytest.fixture
def auth(token: Callable[[str], str]) -> Callable[[str], dict[str, str]]:
    return lambda user: {"Authorization": f"Bearer {token(user)}"}


@pytest.fixture(scope="session")
def ui_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreRuns]:
    """One audit store with the runs the pages are tested on (~15 s: deadlines pass for real)."""
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url

    path = tmp_path_factory.mktemp("ui-store") / "audit.db"
    url = URL.create("sqlite", database=str(path)).render_as_string()
    engine = engine_for_url(url)

    def xss_behaviour(index: int, row: dict[str, Any], branch: str) -> Arrive | Error | Drop | None:
        if branch == XSS_BRANCHES[0]:
            if index % 3 == 0:
                return Error(0.1, "ValueError", XSS_ERROR)
            return Arrive(0.1, {"html": "<script>alert(2)</script>", "n": index})
        if branch == XSS_BRANCHES[1]:
            return Drop(0.2) if index % 4 == 1 else Arrive(0.2, {"quote": "\"'&", "n": index})
        return Arrive(30, {"late": True}) if index % 2 else Arrive(0.3, {"plain": index})

    xss = build_run(
        engine,
        dag_id=XSS_DAG,
        airflow_run_id=XSS_RUN,
        rows=[{"key": f"{XSS_KEY}-{i}", "text": f"<em>{i}</em>"} for i in range(12)],
        row_key="key",
        branches=XSS_BRANCHES,
        behaviour=xss_behaviour,
        policy="require_all",
        quorum=None,
        merge="union",
    )

    def consensus_more(index: int, row: dict[str, Any], branch: str) -> Arrive | Error | Drop | None:
        # Rows 1, 9, 17, ...: gemini delivers only after the decision was written.
        if branch == "gemini" and index % 8 == 1:
            return Arrive(30, {"label": "invoice"}, after_decision=True)
        return consensus_behaviour(index, row, branch)

    rows = [{"id": f"doc-{i:03d}", "n": i} for i in range(40)]
    common: dict[str, Any] = {
        "dag_id": CONSENSUS_DAG,
        "airflow_run_id": CONSENSUS_RUN,
        "rows": rows,
        "row_key": "id",
        "branches": ["gpt", "claude", "gemini"],
    }
    try1 = build_run(engine, **common, behaviour=consensus_behaviour, try_number=1)
    try2 = build_run(
        engine,
        **common,
        behaviour=consensus_more,
        try_number=2,
        extra_coalesces=[ExtraCoalesce("any_answer", "best_effort")],
    )
    secret = build_run(
        engine,
        dag_id=SECRET_DAG,
        airflow_run_id=SECRET_RUN,
        rows=[{"id": SECRET_KEY}, {"id": "other"}],
        row_key="id",
        branches=["a", "b"],
        behaviour=lambda i, row, b: Error(0.1, "SecretError", "classified") if b == "a" else Arrive(0.1, {}),
        policy="require_all",
        quorum=None,
    )
    try:
        yield StoreRuns(url, xss, try1, try2, secret)
    finally:
        dispose_engine(url)


@pytest.fixture
def use_store(elspeth_app: Any) -> Iterator[Callable[[Any], None]]:
    """``use_store(engine_or_None)``: the app reads this audit store (None: no store yet)."""
    from airflow_elspeth.audit.read.cache import clear_cache
    from airflow_elspeth.plugins.app import optional_engine

    def use(engine: Any) -> None:
        elspeth_app.dependency_overrides[optional_engine] = lambda: engine

    yield use
    elspeth_app.dependency_overrides.pop(optional_engine, None)
    clear_cache()


@pytest.fixture
def store(ui_store: StoreRuns, use_store: Callable[[Any], None]) -> StoreRuns:
    """The app reads ``ui_store``."""
    from airflow_elspeth.audit.engine import engine_for_url

    use_store(engine_for_url(ui_store.url, upgrade=False))
    return ui_store


def artifacts_dir(sub: str = "") -> Path:
    """``test-artifacts/`` at the repository root, or a directory in it (all gitignored)."""
    directory = Path(__file__).resolve().parents[2] / "test-artifacts" / sub
    directory.mkdir(parents=True, exist_ok=True)
    return directory
