"""The runs index over 10,000 audit runs: every page and every filter lists the right runs in the
right order with the right count, and a page costs the same few SQL statements wherever it is (the
filter, the order and the page are one query; nothing is read per run of the store).

The store is written with plain inserts (tests/ui/audit_data.py: bulk_index_runs, a few seconds).
No time is asserted (the machine is shared); ``python -m benchmarks.index`` measures it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

import pytest

from .audit_data import INDEX_DAGS, IndexedFixture, bulk_index_runs

pytestmark = pytest.mark.integration

RUNS = 10_000
# SQL statements one index request may issue: the page, the count, the DAG choices, the newest tries,
# the coalesces, the decision counts and the branch losses of the page (a statement per run of the
# store would be thousands).
PAGE_STATEMENTS = 8
UNDECIDED_VERDICTS = {"ended_undecided", "overdue", "waiting"}


@dataclass(frozen=True)
class Store:
    engine: Any
    runs: list[IndexedFixture]


@pytest.fixture(scope="module")
def index_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url

    url = URL.create(
        "sqlite", database=str(tmp_path_factory.mktemp("index10k") / "audit.db")
    ).render_as_string()
    engine = engine_for_url(url)
    try:
        yield Store(engine, bulk_index_runs(engine, RUNS))
    finally:
        dispose_engine(url)


def _expected(
    runs: Sequence[IndexedFixture],
    *,
    dag_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    outcome: str | None = None,
    descending: bool = True,
) -> list[str]:
    chosen = [
        r
        for r in runs
        if (dag_id is None or r.dag_id == dag_id)
        and (since is None or r.logical_date >= since)
        and (until is None or r.logical_date < until)
        and (outcome is None or r.outcome == outcome)
    ]
    chosen.sort(key=lambda r: (r.logical_date, r.try_number, r.started_at, r.run_id), reverse=descending)
    return [r.run_id for r in chosen]


def test_every_page_and_filter_of_10k_audit_runs(
    client: Any,
    auth: Callable[[str], dict[str, str]],
    use_store: Callable[[Any], None],
    index_store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from sqlalchemy import event

    monkeypatch.setattr(
        SimpleAuthManager,
        "get_authorized_dag_ids",
        lambda self, *, user, method="GET", session=None: set(INDEX_DAGS),
    )
    use_store(index_store.engine)
    headers = auth("viewer")
    outcome_of = {r.run_id: r.outcome for r in index_store.runs}
    assert set(outcome_of.values()) == {
        "fork_failed",
        "superseded",
        "fork_running",
        "no_coalesce",
        "undecided",
        "rows_failed",
        "all_merged",
    }
    statements: list[int] = []
    issued = [0]

    def count(*_: Any) -> None:
        issued[0] += 1

    event.listen(index_store.engine, "before_cursor_execute", count)

    def get(path: str) -> Any:
        issued[0] = 0
        response = client.get(path, headers=headers)
        assert response.status_code == 200, (path, response.text[:500])
        statements.append(issued[0])
        return response

    since, until = datetime(2020, 2, 1, tzinfo=timezone.utc), datetime(2020, 3, 15, tzinfo=timezone.utc)
    cases: list[tuple[dict[str, str], dict[str, Any]]] = [
        ({}, {}),
        ({"order": "asc"}, {"descending": False}),
        ({"dag_id": "index_dag_3"}, {"dag_id": "index_dag_3"}),
        ({"since": "2020-02-01", "until": "2020-03-15"}, {"since": since, "until": until}),
        *(({"outcome": o}, {"outcome": o}) for o in sorted(set(outcome_of.values()))),
        (
            {"dag_id": "index_dag_1", "since": "2020-02-01", "outcome": "rows_failed"},
            {"dag_id": "index_dag_1", "since": since, "outcome": "rows_failed"},
        ),
    ]
    limit = 500
    try:
        for params, wanted in cases:
            expected = _expected(index_store.runs, **wanted)
            listed: list[str] = []
            for offset in range(0, max(len(expected), 1), limit):
                query = urlencode({**params, "limit": limit, "offset": offset})
                data = get(f"/elspeth/api/runs?{query}").json()
                assert data["total"] == len(expected), params
                assert (data["limit"], data["offset"]) == (limit, offset)
                page = data["audit_runs"]
                listed += [r["run_id"] for r in page]
                for run in page:  # the SQL filter and the verdict agree
                    verdict = run["verdict"]
                    shown = "undecided" if verdict in UNDECIDED_VERDICTS else verdict
                    assert shown == outcome_of[run["run_id"]], (params, run["run_id"], verdict)
            assert listed == expected, params

        # The page itself: its count, its rows in order, its links keeping the filters.
        expected = _expected(index_store.runs, dag_id="index_dag_2")
        pages = -(-len(expected) // 50)
        for page in (1, pages // 2, pages):
            html = get(f"/elspeth/?dag_id=index_dag_2&page={page}").text
            shown = list(dict.fromkeys(re.findall(r"\?audit_run=([0-9a-f]+)", html)))
            assert shown == expected[(page - 1) * 50 : page * 50], page
            first, end = (page - 1) * 50 + 1, min(page * 50, len(expected))
            assert f"audit runs {first:,}\u2013{end:,} of {len(expected):,}" in html
            assert f"page {page} of {pages}" in html
        beyond = get(f"/elspeth/?dag_id=index_dag_2&page={pages + 1}").text
        assert f"No audit runs on page {pages + 1}: there are {pages}." in beyond
    finally:
        event.remove(index_store.engine, "before_cursor_execute", count)
    assert max(statements) <= PAGE_STATEMENTS, statements


def test_filters_and_pages_agree_with_the_verdict_on_each_database(audit_engine: Any) -> None:
    """The outcome filter and the order are SQL: the same on SQLite and PostgreSQL, and each run a
    filter lists has that verdict (``index_runs``, in Python)."""
    from airflow_elspeth.audit.read.index import OUTCOMES, IndexSelection, audit_index, count_index

    runs = bulk_index_runs(audit_engine, 400)
    since = datetime(2020, 1, 5, tzinfo=timezone.utc)
    for outcome in OUTCOMES:
        selection = IndexSelection(dag_id="index_dag_0", since=since, outcome=outcome)
        expected = _expected(runs, dag_id="index_dag_0", since=since, outcome=outcome)
        assert count_index(audit_engine, INDEX_DAGS, selection) == len(expected), outcome
        listed = []
        for offset in range(0, max(len(expected), 1), 7):
            page = audit_index(audit_engine, INDEX_DAGS, selection=selection, limit=7, offset=offset)
            listed += [r.run_id for r in page]
            shown = {"undecided" if r.verdict in UNDECIDED_VERDICTS else r.verdict for r in page}
            assert shown <= {outcome}, (outcome, shown)
        assert listed == expected, outcome
    ascending = audit_index(audit_engine, None, descending=False, limit=500)
    assert [r.run_id for r in ascending] == _expected(runs, descending=False)
    assert audit_index(audit_engine, ["other_dag"]) == [] and count_index(audit_engine, []) == 0
