"""The deployment the e2e suite runs is the one the README recommends: the harness takes the
deployment's Airflow settings from ``deploy/airflow.env``, which the README's "Running it for real"
quotes whole. No Airflow process is started here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e2e_harness import DEPLOY_ENV, REPO, AirflowStack, deployment_settings


class _Server:
    """Stands in for the suite's PostgreSQL server: only its URLs are read."""

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://tester:pw@127.0.0.1:5432/{database}"


def _env(stack: AirflowStack) -> dict[str, str]:
    stack._fernet_key, stack._secret, stack._log_ports = "fernet", "secret", (1, 2)
    return stack.env()


def _filled(stack: AirflowStack) -> dict[str, str]:
    return deployment_settings(
        {
            "AIRFLOW_DB_URL": stack.meta_url,
            "API_URL": stack.base_url,
            "SECRET": "secret",
            "FERNET_KEY": "fernet",
            "DAGS_FOLDER": str(stack.dags_folder),
        }
    )


def test_the_harness_runs_exactly_the_deployment_settings(tmp_path: Path) -> None:
    stack = AirflowStack(pg=_Server(), home=tmp_path)
    env, deploy = _env(stack), _filled(stack)
    assert {name: env[name] for name in deploy} == deploy  # every setting, none overridden by a test
    assert deploy["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == stack.meta_url
    assert deploy["AIRFLOW__API__BASE_URL"] == stack.base_url
    # Airflow derives its async URL (postgresql+asyncpg), as in the recipe: asyncpg is installed.
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC" not in env
    for needed in (
        "AIRFLOW__CORE__EXECUTOR",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__CORE__AUTH_MANAGER",
        "AIRFLOW__ELSPETH__AUDIT_CONN_ID",
    ):
        assert needed in deploy, needed


def test_the_celery_deployment_changes_only_the_executor(tmp_path: Path) -> None:
    stack = AirflowStack(pg=_Server(), home=tmp_path, broker_url="redis://127.0.0.1:1/0", celery_workers=1)
    env, deploy = _env(stack), _filled(stack)
    changed: dict[str, Any] = {name: env[name] for name in deploy if env[name] != deploy[name]}
    assert changed == {"AIRFLOW__CORE__EXECUTOR": "CeleryExecutor,LocalExecutor"}


def test_the_readme_quotes_the_settings_file_whole() -> None:
    readme = (REPO / "README.md").read_text()
    settings = DEPLOY_ENV.read_text()
    assert f"```bash\n# deploy/airflow.env\n{settings}```\n" in readme
