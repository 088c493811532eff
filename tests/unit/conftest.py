"""Make the checkout importable when the package is not installed into the environment; the
operator unit tests' audit store and the threads a test starts."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("airflow_elspeth") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@pytest.fixture
def store(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh SQLite audit store (an ``AuditStore``), the default audit connection of the operators."""
    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.store import AuditStore

    monkeypatch.setenv(
        "AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT",
        json.dumps({"conn_type": "elspeth", "extra": {"sqlalchemy_url": sqlite_url}}),
    )
    return AuditStore(engine_for_url(sqlite_url))


@pytest.fixture
def running() -> Iterator[list[threading.Thread]]:
    """The threads a test starts (``support.in_thread``): each must have ended once the test is over."""
    from .support import WAIT

    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
