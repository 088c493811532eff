"""The index of audit runs, outcomes first (read model ``audit/read/index.py``, page and JSON), and
the coalesce page's account of why rows are undecided."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import pytest

from .audit_data import failed_fork
from .conftest import CONSENSUS_DAG, CONSENSUS_RUN, StoreRuns

pytestmark = pytest.mark.integration

Auth = Callable[[str], dict[str, str]]
STALL_DAG = "stall_dag"
ENDED_RUN, WAITING_RUN = "scheduled__2026-03-01T00:00:00+00:00", "scheduled__2026-03-02T00:00:00+00:00"


@dataclass(frozen=True)
class Stalled:
    engine: Any
    ended: str  # audit run whose deadline has passed
    waiting: str  # audit run whose deadline is an hour away


def _undecided_run(engine: Any, airflow_run_id: str, logical_date: datetime, timeout: timedelta) -> str:
    """A fork that completed and a coalesce that registered but decided nothing (3 rows open)."""
    from airflow_elspeth.audit.model import CoalesceSpec
    from airflow_elspeth.audit.store import AuditStore, ForkRow, RunIdentity
    from airflow_elspeth.core.canonical import hash_value
    from airflow_elspeth.core.config import coalesce_config

    store = AuditStore(engine)
    branches = ["a", "b"]
    run_id = store.begin_run(
        RunIdentity(
            dag_id=STALL_DAG,
            airflow_run_id=airflow_run_id,
            fork_task_id="fork",
            try_number=1,
            run_type="scheduled",
            logical_date=logical_date,
        ),
        branches=branches,
        chunk_size=1000,
        config={"branches": branches, "row_key": "id", "chunk_size": 1000},
    )
    rows = []
    for index in range(3):
        payload_hash, body = hash_value({"id": f"r{index}"})
        rows.append(
            ForkRow(row_key=f"r{index}", row_index=index, payload_hash=payload_hash, payload_body=body)
        )
    store.write_fork_chunk(run_id, branches, 0, rows)
    store.complete_run(run_id, rows_total=3, chunks_total=1)
    spec = CoalesceSpec(
        node_id="join",
        config=coalesce_config(
            branches=branches, policy="require_all", quorum=None, merge="union", timeout=timeout
        ),
        delivering={"a": "ask_a", "b": "ask_b"},
        mapped={"a": False, "b": False},
    )
    store.register_node(run_id, "join", "coalesce", None, spec.as_dict())
    return run_id


def _failed_run(engine: Any, airflow_run_id: str, logical_date: datetime, reason: str) -> str:
    return failed_fork(
        engine, dag_id=STALL_DAG, airflow_run_id=airflow_run_id, logical_date=logical_date, reason=reason
    )


@pytest.fixture(scope="module")
def stalled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stalled]:
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url

    url = URL.create("sqlite", database=str(tmp_path_factory.mktemp("stall") / "audit.db")).render_as_string()
    engine = engine_for_url(url)
    ended = _undecided_run(
        engine, ENDED_RUN, datetime(2026, 3, 1, tzinfo=timezone.utc), timedelta(seconds=0.01)
    )
    time.sleep(0.05)  # the first one's deadline passes
    waiting = _undecided_run(
        engine, WAITING_RUN, datetime(2026, 3, 2, tzinfo=timezone.utc), timedelta(hours=1)
    )
    try:
        yield Stalled(engine, ended, waiting)
    finally:
        dispose_engine(url)


@pytest.fixture
def readable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The viewer may read STALL_DAG (not a DAG of the metadata DB)."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    monkeypatch.setattr(
        SimpleAuthManager,
        "get_authorized_dag_ids",
        lambda self, *, user, method="GET", session=None: {STALL_DAG},
    )


def _states(ended_state: str) -> Callable[..., tuple[dict[tuple[str, str, str], str], str]]:
    def read(wanted: Any, url: str | None = None) -> tuple[dict[tuple[str, str, str], str], str]:
        states = {(STALL_DAG, ENDED_RUN, "join"): ended_state, (STALL_DAG, WAITING_RUN, "join"): "deferred"}
        return {k: v for k, v in states.items() if k[2] in wanted.get(k[:2], ())}, "test"

    return read


def test_superseded_tries_and_counts(store: StoreRuns) -> None:
    """Counts are the run pages' (decision_counts); an earlier fork try of a DAG run is superseded."""
    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.read.decisions import coalesce_summary
    from airflow_elspeth.audit.read.index import audit_index
    from airflow_elspeth.audit.read.runs import coalesce_spec, decision_counts

    engine = engine_for_url(store.url, upgrade=False)
    runs = {r.run_id: r for r in audit_index(engine, [CONSENSUS_DAG])}
    try1, try2 = runs[store.consensus_try1.run_id], runs[store.consensus_try2.run_id]
    assert (try1.current, try1.newest_try, try1.verdict) == (False, 2, "superseded")
    assert try2.current is True and try2.verdict == "rows_failed"
    assert [o.coalesce for o in try2.outcomes] == ["any_answer", "consensus"]
    counts = decision_counts(engine, {try2.run_id: (try2.rows_total, try2.coalesces)})
    for outcome in try2.outcomes:
        mine = counts[try2.run_id][outcome.coalesce]
        assert (outcome.merged, outcome.failed, outcome.undecided) == (
            mine.merged,
            mine.failed,
            mine.undecided,
        )
        assert outcome.rows == 40 and outcome.task_state is None and not outcome.overdue
        # Why rows failed: the summary's failure reasons (the one source of counts), most first.
        spec = coalesce_spec(engine, try2.run_id, outcome.coalesce)
        summary = coalesce_summary(engine, spec, try2.run_id)
        assert outcome.failure_reasons == summary["failure_reasons"]
        assert sum(outcome.failure_reasons.values()) == outcome.failed
        assert list(outcome.failure_reasons.values()) == sorted(
            outcome.failure_reasons.values(), reverse=True
        )
    assert any(o.failure_reasons for o in try2.outcomes), "the fixture has failed rows"


def test_the_index_page_says_why_rows_failed(
    client: Any, store: StoreRuns, auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each failure reason of a coalesce is a chip with its row count, its words on hover, and a
    link to those rows on the run page."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    monkeypatch.setattr(
        SimpleAuthManager,
        "get_authorized_dag_ids",
        lambda self, *, user, method="GET", session=None: {CONSENSUS_DAG},
    )
    data = client.get("/elspeth/api/runs", headers=auth("viewer")).json()
    run = next(r for r in data["audit_runs"] if r["run_id"] == store.consensus_try2.run_id)
    page = client.get("/elspeth/", headers=auth("viewer")).text
    for outcome in run["outcomes"]:
        for reason, n in list(outcome["failure_reasons"].items())[:3]:
            label = rf"<strong>{re.escape(reason)}</strong> {n}</a>"
            chip = re.search(rf'<a class="chip loss" href="([^"]+)" title="([^"]+)">{label}', page)
            assert chip, reason
            assert f"coalesce={quote(outcome['coalesce'])}" in chip.group(1)
            assert f"reason={quote(reason)}" in chip.group(1) and "decision=failed" in chip.group(1)


def test_undecided_status_says_why() -> None:
    from airflow_elspeth.audit.read.index import undecided_status

    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    soon, past = now + timedelta(minutes=5), now - timedelta(minutes=5)

    def kind(**kw: Any) -> str | None:
        found = undecided_status(**{"undecided": 3, "current": True, "now": now, "task_state": None, **kw})
        return found.kind if found else None

    assert kind(undecided=0, deadline=past) is None
    assert kind(deadline=soon, task_state="deferred") == "waiting"
    assert kind(deadline=past, task_state="running") == "overdue"
    assert kind(deadline=past) == "overdue"  # state not known: the audit side alone
    assert kind(deadline=soon, task_state="failed") == "ended"
    assert kind(deadline=None) == "fork_running"
    assert kind(deadline=past, current=False) == "superseded"


@pytest.mark.usefixtures("readable")
def test_index_puts_outcomes_first_and_flags_overdue_rows(
    client: Any, stalled: Stalled, use_store: Any, auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_elspeth import airflow_states

    use_store(stalled.engine)
    monkeypatch.setattr(airflow_states, "airflow_task_states", _states("failed"))
    data = client.get("/elspeth/api/runs?sort=logical_date&order=asc", headers=auth("viewer")).json()
    assert data["task_states"] == "read"
    assert [r["airflow_run_id"] for r in data["audit_runs"]] == [ENDED_RUN, WAITING_RUN]
    ended, waiting = (r["outcomes"][0] for r in data["audit_runs"])
    assert (ended["rows"], ended["merged"], ended["failed"], ended["undecided"]) == (3, 0, 0, 3)
    assert ended["task_state"] == "failed" and ended["verdict"] == "ended_undecided" and ended["overdue"]
    assert waiting["task_state"] == "deferred" and waiting["verdict"] == "waiting" and not waiting["overdue"]
    newest_first = client.get("/elspeth/api/runs?sort=logical_date", headers=auth("viewer")).json()
    assert [r["airflow_run_id"] for r in newest_first["audit_runs"]] == [WAITING_RUN, ENDED_RUN]
    assert client.get("/elspeth/api/runs?sort=nope", headers=auth("viewer")).status_code == 400

    page = client.get("/elspeth/?sort=logical_date&order=asc", headers=auth("viewer")).text
    rows = re.findall(r'<tr class="([^"]*)" data-verdict="([^"]+)">', page)
    assert rows == [("alert", "ended_undecided"), ("", "waiting")]
    head = page.index("<thead>")
    assert page.index("Outcome", head) < page.index("Coalesce", head) < page.index("Undecided", head)
    assert "undecided: coalesce ended" in page and "Logical date ▲" in page


@pytest.mark.usefixtures("readable")
def test_without_task_states_the_index_says_so(
    client: Any, stalled: Stalled, use_store: Any, auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_elspeth import airflow_states
    from airflow_elspeth.exceptions import AirflowStatesUnavailable

    def unavailable(wanted: Any, url: str | None = None) -> Any:
        raise AirflowStatesUnavailable("no metadata DB here")

    use_store(stalled.engine)
    monkeypatch.setattr(airflow_states, "airflow_task_states", unavailable)
    data = client.get("/elspeth/api/runs", headers=auth("viewer")).json()
    # Why is in the API server's log, under the reference the note gives (tests/ui/test_pages.py).
    assert "could not be read (reference " in data["task_states"]
    assert "no metadata DB here" not in data["task_states"]
    by_run = {r["airflow_run_id"]: r["outcomes"][0] for r in data["audit_runs"]}
    # The audit side alone: past the deadline and undecided is overdue.
    assert by_run[ENDED_RUN]["verdict"] == "overdue" and by_run[ENDED_RUN]["task_state"] is None
    page = client.get("/elspeth/", headers=auth("viewer")).text
    assert "Airflow task states could not be read" in page and "undecided past deadline" in page


def test_coalesce_page_says_why_rows_are_undecided_and_what_to_do(
    client: Any, stalled: Stalled, use_store: Any, auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_elspeth import airflow_states

    use_store(stalled.engine)
    monkeypatch.setattr(airflow_states, "airflow_task_states", _states("failed"))
    ended = client.get(
        f"/elspeth/dags/{STALL_DAG}/runs/{quote(ENDED_RUN, safe='')}", headers=auth("viewer")
    ).text
    why = ended[ended.index('id="why-undecided"') :]
    why = " ".join(re.sub(r"<[^>]+>", "", why[: why.index("</div>")]).split())
    assert "3 rows undecided." in why and "the coalesce task ended failed" in why
    assert "clear the coalesce task join" in why
    assert f"airflow-elspeth verify --dag-id {STALL_DAG} --airflow-run-id {ENDED_RUN}" in why
    waiting = client.get(
        f"/elspeth/dags/{STALL_DAG}/runs/{quote(WAITING_RUN, safe='')}/tasks/join", headers=auth("viewer")
    ).text
    why = waiting[waiting.index('id="why-undecided"') :]
    why = " ".join(re.sub(r"<[^>]+>", "", why[: why.index("</div>")]).split())
    assert "still waiting" in why
    assert re.search(r"\d\d:\d\d:\d\d UTC at the latest", why), why
    assert "deferred" in waiting  # the coalesce's Airflow task state


def test_decided_runs_have_no_undecided_notice(client: Any, store: StoreRuns, auth: Auth) -> None:
    page = client.get(
        f"/elspeth/dags/{CONSENSUS_DAG}/runs/{quote(CONSENSUS_RUN, safe='')}", headers=auth("viewer")
    ).text
    assert 'id="why-undecided"' not in page and 'id="coalesce-task-state"' in page


@pytest.mark.usefixtures("readable")
def test_branch_step_tab_shows_the_rows_lost_when_its_task_ended(
    client: Any, use_store: Any, auth: Auth, tmp_path: Any
) -> None:
    """The coalesce saw branch a's task failed: its tab lists that end and the rows it lost."""
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.coalesce import coalesce_pass
    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url
    from airflow_elspeth.audit.read.runs import coalesce_spec
    from airflow_elspeth.audit.store import AuditStore
    from airflow_elspeth.core.vocabulary import NodeType

    url = URL.create("sqlite", database=str(tmp_path / "audit.db")).render_as_string()
    engine = engine_for_url(url)
    try:
        run_id = _undecided_run(
            engine, ENDED_RUN, datetime(2026, 3, 1, tzinfo=timezone.utc), timedelta(hours=1)
        )
        store = AuditStore(engine)
        for branch in ("a", "b"):
            store.register_node(run_id, f"ask_{branch}", NodeType.BRANCH, branch, {"branch": branch})
        spec = coalesce_spec(engine, run_id, "join")
        coalesce_pass(store, spec, run_id, {"ask_a": "failed", "ask_b": "running"})
        use_store(engine)

        step = client.get(
            f"/elspeth/api/dags/{STALL_DAG}/runs/{quote(ENDED_RUN, safe='')}/tasks/ask_a",
            headers=auth("viewer"),
        ).json()
        assert [(e["task_state"], e["records"]) for e in step["task_ends"]] == [("failed", 1)]
        assert step["rows_lost_at_task_end"] == 3
        other = client.get(
            f"/elspeth/api/dags/{STALL_DAG}/runs/{quote(ENDED_RUN, safe='')}/tasks/ask_b",
            headers=auth("viewer"),
        ).json()
        assert (other["task_ends"], other["rows_lost_at_task_end"]) == ([], 0)
        page = client.get(
            f"/elspeth/dags/{STALL_DAG}/runs/{quote(ENDED_RUN, safe='')}/tasks/ask_a", headers=auth("viewer")
        ).text
        assert "Task ended with rows undelivered" in page
        assert "3 rows of branch a lost" in page and "branch_task_failed" in page
    finally:
        dispose_engine(url)


@pytest.mark.usefixtures("readable")
def test_the_index_lists_backfilled_dates_newest_logical_date_first(
    client: Any, use_store: Any, auth: Auth, tmp_path: Any
) -> None:
    """Runs started 11-03, 11-01, 11-02 (a backfill after a scheduled run) list by logical date,
    newest first, as Airflow's grid does; ``sort=started_at`` still lists them by start."""
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url

    url = URL.create("sqlite", database=str(tmp_path / "audit.db")).render_as_string()
    engine = engine_for_url(url)
    try:
        started = [3, 1, 2]
        for day in started:
            _undecided_run(
                engine,
                f"backfill__2026-11-0{day}T00:00:00+00:00",
                datetime(2026, 11, day, tzinfo=timezone.utc),
                timedelta(hours=1),
            )
        use_store(engine)
        listed = client.get("/elspeth/api/runs", headers=auth("viewer")).json()["audit_runs"]
        assert [r["logical_date"][:10] for r in listed] == ["2026-11-03", "2026-11-02", "2026-11-01"]
        by_start = client.get("/elspeth/api/runs?sort=started_at&order=asc", headers=auth("viewer")).json()
        assert [r["logical_date"][:10] for r in by_start["audit_runs"]] == [f"2026-11-0{d}" for d in started]
        page = client.get("/elspeth/", headers=auth("viewer")).text
        assert "Logical date ▼" in page
    finally:
        dispose_engine(url)


def test_branch_losses_and_late_arrivals_show_for_every_run(
    client: Any, store: StoreRuns, auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per coalesce, the rows each branch was lost on and the late answers are the summary's (the
    one source of counts), merged rows too: a run whose rows all merged still shows them."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.read.decisions import coalesce_summary
    from airflow_elspeth.audit.read.index import audit_index
    from airflow_elspeth.audit.read.runs import coalesce_spec
    from airflow_elspeth.core.vocabulary import ReasonKind, reason_kind

    monkeypatch.setattr(
        SimpleAuthManager,
        "get_authorized_dag_ids",
        lambda self, *, user, method="GET", session=None: {CONSENSUS_DAG},
    )
    engine = engine_for_url(store.url, upgrade=False)
    (run,) = [r for r in audit_index(engine, [CONSENSUS_DAG]) if r.run_id == store.consensus_try2.run_id]
    for outcome in run.outcomes:
        summary = coalesce_summary(engine, coalesce_spec(engine, run.run_id, outcome.coalesce), run.run_id)
        losses = {
            branch: sum(n for reason, n in info["reasons"].items() if reason_kind(reason) is ReasonKind.LOSS)
            for branch, info in summary["missing_branches"].items()
        }
        assert outcome.branch_losses == {b: n for b, n in losses.items() if n}
        assert outcome.late_arrivals == summary["late_arrivals"]
    merged = next(o for o in run.outcomes if o.verdict == "all_merged")
    assert merged.branch_losses and merged.late_arrivals, "the fixture's best-effort coalesce lost and waited"

    data = client.get("/elspeth/api/runs", headers=auth("viewer")).json()
    listed = next(r for r in data["audit_runs"] if r["run_id"] == run.run_id)
    shown = next(o for o in listed["outcomes"] if o["coalesce"] == merged.coalesce)
    assert (shown["branch_losses"], shown["late_arrivals"]) == (merged.branch_losses, merged.late_arrivals)
    page = client.get("/elspeth/", headers=auth("viewer")).text
    for branch, n in merged.branch_losses.items():
        assert f"coalesce={quote(merged.coalesce)}&amp;decision=all&amp;branch={quote(branch)}#rows" in page
        assert f"{branch} lost {n:,}</a>" in page
    assert f"late {merged.late_arrivals:,}</a>" in page


@pytest.mark.usefixtures("readable")
def test_a_fork_failure_says_why_in_why_failed(
    client: Any, use_store: Any, auth: Auth, tmp_path: Any
) -> None:
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url

    url = URL.create("sqlite", database=str(tmp_path / "audit.db")).render_as_string()
    engine = engine_for_url(url)
    try:
        _failed_run(
            engine,
            ENDED_RUN,
            datetime(2026, 3, 1, tzinfo=timezone.utc),
            "source query timed out <after 30 s>",
        )
        use_store(engine)
        page = client.get("/elspeth/", headers=auth("viewer")).text
        row = page[page.index('data-verdict="fork_failed"') :]
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row[: row.index("</tr>")], re.S)
        heads = re.findall(r"<th[^>]*>(.*?)</th>", page[page.index("<thead>") : page.index("</thead>")], re.S)
        why = cells[heads.index("Why failed")]
        assert "fork failed:</strong> source query timed out &lt;after 30 s&gt;" in why
    finally:
        dispose_engine(url)


@pytest.mark.usefixtures("readable")
def test_the_index_pages_and_filters_in_its_address(
    client: Any, use_store: Any, auth: Auth, tmp_path: Any
) -> None:
    """DAG, logical-date range and outcome filter; a page at a time with a count; the address keeps
    them (shareable), the JSON takes the same filters with limit/offset."""
    from sqlalchemy.engine import URL

    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url

    url = URL.create("sqlite", database=str(tmp_path / "audit.db")).render_as_string()
    engine = engine_for_url(url)
    headers = auth("viewer")
    try:
        for day in (1, 2):
            _undecided_run(
                engine,
                f"manual__2026-11-0{day}",
                datetime(2026, 11, day, tzinfo=timezone.utc),
                timedelta(hours=1),
            )
        _failed_run(
            engine, "manual__2026-11-03", datetime(2026, 11, 3, tzinfo=timezone.utc), "the source went away"
        )
        use_store(engine)

        def listed(query: str) -> tuple[list[str], int]:
            data = client.get(f"/elspeth/api/runs?{query}", headers=headers).json()
            return [r["airflow_run_id"][-2:] for r in data["audit_runs"]], data["total"]

        assert listed("") == (["03", "02", "01"], 3)
        assert listed("limit=2&offset=2") == (["01"], 3)
        assert listed("since=2026-11-02") == (["03", "02"], 2)
        assert listed("since=2026-11-01T12:00:00%2B00:00&until=2026-11-03") == (["02"], 1)
        assert listed("outcome=fork_failed") == (["03"], 1)
        assert listed("outcome=undecided&order=asc") == (["01", "02"], 2)
        assert listed("outcome=all_merged") == ([], 0)
        assert listed(f"dag_id={STALL_DAG}&limit=1") == (["03"], 3)
        assert listed("dag_id=not_readable") == ([], 0)
        for bad in ("outcome=nope", "since=yesterday", "since=2026-11-02&until=2026-11-01", "offset=-1"):
            assert client.get(f"/elspeth/api/runs?{bad}", headers=headers).status_code in (400, 422), bad
        assert client.get("/elspeth/?outcome=nope", headers=headers).status_code == 400

        page = client.get(
            f"/elspeth/?dag_id={STALL_DAG}&since=2026-11-01&limit=1&page=2", headers=headers
        ).text
        assert re.findall(r'data-verdict="([^"]+)"', page) == ["waiting"]
        assert "audit runs 2\u20132 of 3" in page and "page 2 of 3" in page
        nxt = re.search(r'<a href="([^"]+)" rel="next">', page)
        assert nxt, "a link to the next page"
        assert nxt.group(1) == f"/elspeth/?dag_id={STALL_DAG}&amp;since=2026-11-01&amp;limit=1&amp;page=3"
        assert f'<option value="{STALL_DAG}" selected>' in page and 'value="2026-11-01"' in page
        assert f"/elspeth/api/runs?dag_id={STALL_DAG}&amp;since=2026-11-01&amp;limit=1&amp;offset=1" in page
        empty = client.get("/elspeth/?outcome=all_merged", headers=headers).text
        assert "match these filters" in empty
    finally:
        dispose_engine(url)
