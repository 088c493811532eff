"""What the pages say in the cases that once misled or overloaded them, through Airflow's own API app:
no warning for zero counts, an error page that names no internal host, and a row page whose weight
does not grow with its values (each large value cut, with a link to the whole of it).
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from .audit_data import Arrive, BuiltRun, build_run
from .conftest import CONSENSUS_DAG, CONSENSUS_RUN, StoreRuns

pytestmark = pytest.mark.integration

Auth = Callable[[str], dict[str, str]]

BIG_TEXT = "0123456789abcdef" * 65_536  # 1 MiB
ENDS_DAG, BIG_DAG = "task_ends_dag", "big_values_dag"
RUN = "manual__pages"


def run_path(dag_id: str, suffix: str = "", api: bool = False) -> str:
    prefix = "/elspeth/api" if api else "/elspeth"
    return f"{prefix}/dags/{dag_id}/runs/{quote(RUN, safe='')}{suffix}"


@dataclass(frozen=True)
class PageRuns:
    engine: Any
    ends: BuiltRun
    big: BuiltRun


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageRuns]:
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url

    url = URL.create("sqlite", database=str(tmp_path_factory.mktemp("pages") / "audit.db"))
    engine = engine_for_url(url)
    # Branch "a" delivers every row and its task ends in success (a task end that loses nothing);
    # branch "b" delivers every other row and its task fails (the others are lost).
    ends = build_run(
        engine,
        dag_id=ENDS_DAG,
        airflow_run_id=RUN,
        rows=[{"id": f"row-{i}"} for i in range(6)],
        row_key="id",
        branches=["a", "b"],
        behaviour=lambda i, row, b: Arrive(0.05, {b: i}) if b == "a" or i % 2 else None,
        policy="require_all",
        quorum=None,
        timeout_s=0.3,
        task_states={"ask_0": "success", "ask_1": "failed"},
    )
    # One row whose source, branch "a"'s output and the merged output each hold a 1 MiB field.
    big = build_run(
        engine,
        dag_id=BIG_DAG,
        airflow_run_id=RUN,
        rows=[{"id": "big", "text": BIG_TEXT}],
        row_key="id",
        branches=["a", "b"],
        behaviour=lambda i, row, b: Arrive(0.05, {"echo": row["text"]} if b == "a" else {"label": "x"}),
        policy="require_all",
        quorum=None,
        merge="union",
        timeout_s=0.3,
    )
    try:
        yield PageRuns(engine, ends, big)
    finally:
        dispose_engine(url)


@pytest.fixture
def pages(page_runs: PageRuns, use_store: Callable[[Any], None]) -> PageRuns:
    use_store(page_runs.engine)
    return page_runs


def text_of(html: str) -> str:
    """The page's words, tags left out."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def test_a_task_end_that_lost_no_row_shows_no_warning(client: Any, pages: PageRuns, auth: Auth) -> None:
    delivered = client.get(run_path(ENDS_DAG, "/tasks/ask_0"), headers=auth("viewer"))
    assert delivered.status_code == 200
    assert "Branch step" in delivered.text
    assert "Task ended with rows undelivered" not in delivered.text
    assert 'class="notice' not in delivered.text
    assert "0 rows" not in text_of(delivered.text)
    # The task that did lose rows still says so, with how many.
    failed = client.get(run_path(ENDS_DAG, "/tasks/ask_1"), headers=auth("viewer"))
    assert failed.status_code == 200
    words = text_of(failed.text)
    assert "Task ended with rows undelivered" in words
    assert "3 rows of branch b lost because this task ended before delivering them" in words
    assert "branch_task_failed" in words


def test_zero_counts_are_not_coloured_as_warnings(client: Any, pages: PageRuns, auth: Auth) -> None:
    page = client.get(run_path(BIG_DAG), headers=auth("viewer")).text
    assert '<div class="tile"><div class="n">0</div><div class="l">failed' in page
    assert '<div class="tile"><div class="n">0</div><div class="l">late arrivals' in page


def test_a_large_value_is_cut_and_linked_whole(client: Any, pages: PageRuns, auth: Auth) -> None:
    """A row with a 1 MiB field in its source, an output and the merged output: the page stays small,
    says how large each value is, and links each whole value, which comes back as stored."""
    page = client.get(run_path(BIG_DAG, "/lineage?key=big"), headers=auth("viewer"))
    assert page.status_code == 200
    assert len(page.content) < 60_000, len(page.content)
    whole = r'<a href="([^"]+/lineage/payloads/[^"]+)">the whole value \(JSON, 1\.0 MB\)</a>'
    links = re.findall(whole, page.text)
    assert len(links) == 3, links  # source row, branch a's output, merged output
    assert text_of(page.text).count("The first 2,048 characters of a 1.0 MB value") == 3
    wholes = []
    for link in links:
        value = client.get(link.replace("&amp;", "&"), headers=auth("viewer"))
        assert value.status_code == 200 and value.headers["content-type"] == "application/json"
        wholes.append(value.json())
    assert {"id": "big", "text": BIG_TEXT} in wholes
    assert {"echo": BIG_TEXT} in wholes
    merged = next(w for w in wholes if "label" in w)
    assert merged == {"echo": BIG_TEXT, "label": "x"}
    # Small values are shown whole, with no link.
    assert '"label": "x"' in page.text.replace("&#34;", '"')


def test_the_value_route_serves_only_values_of_that_row(client: Any, pages: PageRuns, auth: Auth) -> None:
    from airflow_elspeth.core.canonical import hash_value

    big_source = hash_value({"id": "big", "text": BIG_TEXT})[0]
    other_source = hash_value({"id": "row-1"})[0]
    path = run_path(BIG_DAG, f"/lineage/payloads/{big_source}?key=big", api=True)
    assert client.get(path, headers=auth("viewer")).status_code == 200
    # A value of another row (here of another DAG run) is not found under this row.
    foreign = run_path(BIG_DAG, f"/lineage/payloads/{other_source}?key=big", api=True)
    assert client.get(foreign, headers=auth("viewer")).status_code == 404
    wrong_row = run_path(ENDS_DAG, f"/lineage/payloads/{big_source}?key=row-1", api=True)
    assert client.get(wrong_row, headers=auth("viewer")).status_code == 404
    assert client.get(path, headers=auth("nobody")).status_code == 403


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_store_is_reported_without_its_address(
    client: Any,
    ui_store: StoreRuns,
    auth: Auth,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The driver's message names the PostgreSQL host and port: the page and the JSON give a
    reference instead, and the API server's log line with that reference holds the error."""
    from airflow_elspeth.audit.engine import dispose_engine
    from airflow_elspeth.plugins import app as ui

    port = _closed_port()
    url = f"postgresql+psycopg2://elspeth:secret-pw@127.0.0.1:{port}/audit_store?connect_timeout=5"
    connection = json.dumps({"conn_type": "elspeth_audit", "extra": {"sqlalchemy_url": url}})
    monkeypatch.setattr(ui, "_url_cache", None)
    monkeypatch.setenv("AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT", connection)
    try:
        with caplog.at_level(logging.ERROR, logger="airflow_elspeth.plugins.app"):
            page = client.get(
                f"/elspeth/dags/{CONSENSUS_DAG}/runs/{quote(CONSENSUS_RUN, safe='')}", headers=auth("viewer")
            )
            api = client.get(
                f"/elspeth/api/dags/{CONSENSUS_DAG}/runs/{quote(CONSENSUS_RUN, safe='')}/lineage?key=doc-000",
                headers=auth("viewer"),
            )
    finally:
        monkeypatch.setattr(ui, "_url_cache", None)
        dispose_engine(url)
    assert page.status_code == 503 and api.status_code == 503
    for shown in (page.text, api.text):
        assert "127.0.0.1" not in shown and str(port) not in shown and "audit_store" not in shown
        assert "The audit store could not be read" in shown
    references = [re.search(r"Reference ([0-9a-f]{8})", shown) for shown in (page.text, api.text)]
    assert all(references), (page.text, api.text)
    for found in references:
        assert found is not None
        lines = [r for r in caplog.records if f"[reference {found.group(1)}]" in r.getMessage()]
        assert len(lines) == 1, caplog.text
        # The whole error is in the log: the driver's message, with the host and port.
        assert f'"127.0.0.1", port {port} failed' in lines[0].getMessage()
        assert lines[0].exc_info is not None


def test_unreadable_task_states_are_noted_without_the_database_address(
    airflow_api: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from airflow_elspeth import airflow_states
    from airflow_elspeth.exceptions import AirflowStatesUnavailable
    from airflow_elspeth.plugins.app import TaskStateReader

    def unreachable(wanted: Any) -> Any:
        raise AirflowStatesUnavailable(
            "postgresql://airflow@10.9.8.7:5432/airflow could not be read (OperationalError: timeout)"
        )

    monkeypatch.setattr(airflow_states, "airflow_task_states", unreachable)
    reader = TaskStateReader()
    with caplog.at_level(logging.WARNING, logger="airflow_elspeth.plugins.app"):
        assert reader.state("d", "r", "t") is None
    assert reader.note is not None
    assert "10.9.8.7" not in reader.note and "5432" not in reader.note
    found = re.search(r"reference ([0-9a-f]{8})", reader.note)
    assert found is not None, reader.note
    (line,) = [r for r in caplog.records if f"[reference {found.group(1)}]" in r.getMessage()]
    assert "10.9.8.7:5432" in line.getMessage()
