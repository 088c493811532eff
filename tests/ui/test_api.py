"""The audit UI through Airflow's own API app: authentication, DAG access, escaping, the pages' content.

Plugin apps are open by default in Airflow 3; these tests pin down that every route of ours asks
for an authenticated user with read access to the DAG in its path, and reads nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest

from airflow_elspeth.core.canonical import hash_value

from .conftest import (
    CONSENSUS_DAG,
    CONSENSUS_RUN,
    PASSWORDS,
    SECRET_DAG,
    SECRET_KEY,
    SECRET_RUN,
    XSS_BRANCHES,
    XSS_DAG,
    XSS_KEY,
    XSS_RUN,
    StoreRuns,
)

pytestmark = pytest.mark.integration

Auth = Callable[[str], dict[str, str]]


def run_path(dag_id: str, run_id: str, suffix: str = "", api: bool = False) -> str:
    prefix = "/elspeth/api" if api else "/elspeth"
    return f"{prefix}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}{suffix}"


# Every route of the app, with the parameters that make it answer 200 for an allowed user.
ROUTES: dict[str, str] = {
    "/dags/{dag_id}/runs/{run_id}": "",
    "/dags/{dag_id}/runs/{run_id}/lineage": "?key=doc-000",
    "/dags/{dag_id}/runs/{run_id}/tasks/{task_id}": "",
    "/api/dags/{dag_id}/runs/{run_id}": "",
    "/api/dags/{dag_id}/runs/{run_id}/coalesces/{coalesce}": "",
    "/api/dags/{dag_id}/runs/{run_id}/coalesces/{coalesce}/rows": "",
    "/api/dags/{dag_id}/runs/{run_id}/coalesces/{coalesce}/late-arrivals": "",
    "/api/dags/{dag_id}/runs/{run_id}/lineage": "?key=doc-000",
    "/api/dags/{dag_id}/runs/{run_id}/lineage/payloads/{payload_hash}": "?key=doc-000",
    "/api/dags/{dag_id}/runs/{run_id}/tasks/{task_id}": "",
}


# The stored hash of row doc-000's source row (its whole value is served by the payload route).
DOC_000_HASH = hash_value({"id": "doc-000", "n": 0})[0]

# Routes that list only the DAGs the user may read (no DAG in the path).
INDEX_ROUTES = ("/", "/api/runs")


def assert_no_audit_data(text: str) -> None:
    """Nothing read from the audit store (the login link may echo the URL asked for)."""
    for marker in ("RateLimitError", "quorum", "audit_run", "gpt", "classified", "invoice"):
        assert marker not in text, marker


def concrete(template: str, dag_id: str = CONSENSUS_DAG, run_id: str = CONSENSUS_RUN) -> str:
    path = (
        template.replace("{dag_id}", quote(dag_id, safe=""))
        .replace("{run_id}", quote(run_id, safe=""))
        .replace("{task_id}", "ask_1")
        .replace("{coalesce}", "consensus")
        .replace("{payload_hash}", DOC_000_HASH)
    )
    return "/elspeth" + path + ROUTES.get(template, "")


def test_the_plugin_is_mounted_with_exactly_the_routes_tested_here(elspeth_app: Any) -> None:
    """A new route must be added to ROUTES, so the access tests below cover it."""
    from fastapi.routing import APIRoute

    paths = {route.path for route in elspeth_app.routes if isinstance(route, APIRoute)}
    assert paths == {*ROUTES, *INDEX_ROUTES}
    for route in elspeth_app.routes:
        if isinstance(route, APIRoute):
            assert route.methods <= {"GET", "HEAD"}, f"{route.path} is not read-only: {route.methods}"


def test_plugin_registers_tabs_on_dag_runs_and_task_instances() -> None:
    from airflow import plugins_manager

    external_views, _ = plugins_manager._get_ui_plugins()
    ours = {v["url_route"]: v for v in external_views if v["href"].startswith("/elspeth")}
    assert set(ours) == {"elspeth-audit", "elspeth-audit-task", "fork-join-audit"}
    assert ours["elspeth-audit"]["destination"] == "dag_run"
    assert ours["elspeth-audit"]["href"] == "/elspeth/dags/{DAG_ID}/runs/{RUN_ID}"
    assert ours["elspeth-audit-task"]["destination"] == "task_instance"
    assert "{TASK_ID}" in ours["elspeth-audit-task"]["href"]
    # The Browse entry opens the index of audit runs.
    assert ours["fork-join-audit"]["destination"] == "nav"
    assert ours["fork-join-audit"]["category"] == "browse"
    assert ours["fork-join-audit"]["href"] == "/elspeth/"
    # Never to be taken for Airflow's own "Audit Log".
    assert {v["name"] for v in ours.values()} == {"Fork/join audit"}
    apps, _ = plugins_manager.get_fastapi_plugins()
    assert [a["url_prefix"] for a in apps if a["name"] == "Elspeth audit"] == ["/elspeth"]


@pytest.mark.parametrize("template", [*ROUTES, *INDEX_ROUTES])
def test_every_route_answers_401_without_credentials(client: Any, store: StoreRuns, template: str) -> None:
    response = client.get(concrete(template) if template not in INDEX_ROUTES else "/elspeth" + template)
    assert response.status_code == 401, response.text
    assert_no_audit_data(response.text)


def test_an_invalid_token_is_refused(client: Any, store: StoreRuns) -> None:
    response = client.get(
        concrete("/api/dags/{dag_id}/runs/{run_id}"), headers={"Authorization": "Bearer x.y.z"}
    )
    assert response.status_code == 403  # Airflow answers an invalid JWT with 403


def test_unauthenticated_html_page_offers_the_login(client: Any, store: StoreRuns) -> None:
    response = client.get(concrete("/dags/{dag_id}/runs/{run_id}"))
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("text/html")
    assert "/auth/login?next=" in response.text
    api = client.get(concrete("/api/dags/{dag_id}/runs/{run_id}"))
    assert api.status_code == 401 and api.json() == {"detail": "Not authenticated"}


@pytest.mark.parametrize("template", list(ROUTES))
def test_every_dag_route_answers_403_to_a_user_without_dag_access(
    client: Any, store: StoreRuns, auth: Auth, template: str
) -> None:
    response = client.get(concrete(template), headers=auth("nobody"))
    assert response.status_code == 403, response.text
    assert_no_audit_data(response.text)


@pytest.mark.parametrize("template", list(ROUTES))
def test_every_dag_route_answers_200_with_dag_read_access(
    client: Any, store: StoreRuns, auth: Auth, template: str
) -> None:
    response = client.get(concrete(template), headers=auth("viewer"))
    assert response.status_code == 200, response.text


def test_access_is_checked_against_the_dag_in_the_path(
    client: Any, store: StoreRuns, auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who may read one DAG gets 200 there and 403 on another, for every route."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    asked: list[tuple[str, str, str | None]] = []
    original = SimpleAuthManager.is_authorized_dag

    def only_consensus(
        self: Any, *, method: str, user: Any, access_entity: Any = None, details: Any = None
    ) -> bool:
        asked.append((user.get_name(), method, details.id if details else None))
        if user.get_name() == "outsider":
            return method == "GET" and details is not None and details.id == CONSENSUS_DAG
        return original(self, method=method, user=user, access_entity=access_entity, details=details)

    monkeypatch.setattr(SimpleAuthManager, "is_authorized_dag", only_consensus)
    for template in ROUTES:
        allowed = client.get(concrete(template), headers=auth("outsider"))
        assert allowed.status_code == 200, (template, allowed.text)
        denied = client.get(concrete(template, SECRET_DAG, SECRET_RUN), headers=auth("outsider"))
        assert denied.status_code == 403, (template, denied.text)
        assert SECRET_KEY not in denied.text
    assert {(user, method) for user, method, _ in asked} == {("outsider", "GET")}
    assert {dag for *_, dag in asked} == {CONSENSUS_DAG, SECRET_DAG}


def test_index_lists_only_runs_of_readable_dags(
    client: Any, store: StoreRuns, auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    monkeypatch.setattr(
        SimpleAuthManager,
        "get_authorized_dag_ids",
        lambda self, *, user, method="GET", session=None: {XSS_DAG},
    )
    page = client.get("/elspeth/", headers=auth("viewer"))
    assert page.status_code == 200
    assert XSS_RUN in page.text
    assert SECRET_RUN not in page.text and CONSENSUS_RUN not in page.text
    listed = client.get("/elspeth/api/runs", headers=auth("viewer")).json()["audit_runs"]
    assert {r["airflow_run_id"] for r in listed} == {XSS_RUN}


def test_login_with_password_then_bearer_token_or_cookie(client: Any, store: StoreRuns) -> None:
    """The real login: the auth manager's token endpoint, then the token as header or as the UI cookie."""
    created = client.post("/auth/token", json={"username": "viewer", "password": PASSWORDS["viewer"]})
    assert created.status_code == 201, created.text
    access_token = created.json()["access_token"]
    path = concrete("/dags/{dag_id}/runs/{run_id}")
    assert client.get(path, headers={"Authorization": f"Bearer {access_token}"}).status_code == 200
    client.cookies.set("_token", access_token)
    assert client.get(path).status_code == 200
    wrong = client.post("/auth/token", json={"username": "viewer", "password": "nope"})
    assert wrong.status_code == 401


def test_nothing_is_writable(client: Any, store: StoreRuns, auth: Auth) -> None:
    for template in ROUTES:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            response = client.request(method, concrete(template), headers=auth("admin"))
            assert response.status_code == 405, (method, template, response.status_code)


def test_no_unguarded_docs_or_schema(client: Any, store: StoreRuns) -> None:
    for path in ("/elspeth/docs", "/elspeth/redoc", "/elspeth/openapi.json", "/elspeth/static/x.css"):
        assert client.get(path).status_code == 404, path


def test_an_audit_run_of_another_dag_is_not_shown(client: Any, store: StoreRuns, auth: Auth) -> None:
    """Audit run ids are looked up within the DAG run of the path (no id from another DAG)."""
    for suffix in ("", "/lineage?key=" + quote(SECRET_KEY)):
        joiner = "&" if "?" in suffix else "?"
        path = run_path(CONSENSUS_DAG, CONSENSUS_RUN, suffix) + f"{joiner}audit_run={store.secret.run_id}"
        response = client.get(path, headers=auth("viewer"))
        assert response.status_code == 404, response.text
        assert SECRET_KEY not in response.text
    api = client.get(
        run_path(CONSENSUS_DAG, CONSENSUS_RUN, "/coalesces/consensus/rows", api=True)
        + f"?audit_run={store.secret.run_id}",
        headers=auth("viewer"),
    )
    assert api.status_code == 404
    # The secret run's rows are not reachable under another DAG run of the same DAG either.
    other = client.get(
        run_path(SECRET_DAG, "manual__other", "/lineage?key=" + quote(SECRET_KEY)), headers=auth("admin")
    )
    assert other.status_code == 404


# --------------------------------------------------------------------------------------------------
# Escaping


def assert_escaped(html: str) -> None:
    # The page's own script (static/page.js, allowed by its hash) is the only one.
    assert html.lower().count("<script") == 1, "the pages run their own script only, and print none"
    assert "<img" not in html.lower()
    assert "<b>boom</b>" not in html and "<i>more</i>" not in html
    assert "onerror=alert" not in html.replace("onerror=alert(1)&gt;", "")


def test_html_looking_branch_names_row_keys_and_errors_render_escaped(
    client: Any, store: StoreRuns, auth: Auth
) -> None:
    headers = auth("viewer")
    run_page = client.get(run_path(XSS_DAG, XSS_RUN), headers=headers)
    assert run_page.status_code == 200
    html = run_page.text
    assert_escaped(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # matrix, chips, chart legend, filters
    assert "b&amp;&#34;q&#39;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;-0" in html  # failed rows list
    # Filtered by the HTML-looking branch: the filter echoes it escaped, and the links carry it encoded.
    filtered = client.get(
        run_path(XSS_DAG, XSS_RUN) + "?decision=all&branch=" + quote(XSS_BRANCHES[0], safe=""),
        headers=headers,
    )
    assert filtered.status_code == 200
    assert_escaped(filtered.text)
    assert quote(XSS_BRANCHES[0], safe="") in filtered.text or "%3Cscript%3E" in filtered.text

    row_page = client.get(
        run_path(XSS_DAG, XSS_RUN, "/lineage?key=" + quote(f"{XSS_KEY}-0")), headers=headers
    )
    assert row_page.status_code == 200
    assert_escaped(row_page.text)
    assert "&lt;b&gt;boom&lt;/b&gt; &amp; &lt;i&gt;more&lt;/i&gt;" in row_page.text
    assert "&lt;em&gt;0&lt;/em&gt;" in row_page.text  # the source row's value

    task_page = client.get(run_path(XSS_DAG, XSS_RUN, "/tasks/ask_0"), headers=headers)
    assert task_page.status_code == 200
    assert_escaped(task_page.text)
    assert "&lt;b&gt;boom&lt;/b&gt;" in task_page.text

    # The JSON API carries the values as they are, as JSON.
    api = client.get(
        run_path(XSS_DAG, XSS_RUN, "/lineage?key=" + quote(f"{XSS_KEY}-0"), api=True), headers=headers
    )
    assert api.headers["content-type"].startswith("application/json")
    assert api.json()["row_key"] == f"{XSS_KEY}-0"


def test_html_pages_run_only_their_own_script(client: Any, store: StoreRuns, auth: Auth) -> None:
    """No inline script runs but the page's own, allowed by its hash (not 'unsafe-inline')."""
    import base64
    import hashlib
    import re

    response = client.get(run_path(XSS_DAG, XSS_RUN), headers=auth("viewer"))
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    (script,) = re.findall(r"<script>(.*?)</script>", response.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["script-src"] == f"'sha256-{digest}'"
    assert "frame-ancestors 'self'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


# --------------------------------------------------------------------------------------------------
# What the pages show


def api_json(
    client: Any, auth: Auth, suffix: str, dag_id: str = CONSENSUS_DAG, run_id: str = CONSENSUS_RUN
) -> Any:
    response = client.get(run_path(dag_id, run_id, suffix, api=True), headers=auth("viewer"))
    assert response.status_code == 200, response.text
    return response.json()


def test_reprocessed_dag_run_lists_every_audit_run_and_shows_the_newest(
    client: Any, store: StoreRuns, auth: Auth
) -> None:
    runs = api_json(client, auth, "")["audit_runs"]
    assert [(r["try_number"], r["current"]) for r in runs] == [(2, True), (1, False)]
    assert runs[0]["coalesces"] == ["any_answer", "consensus"]
    assert runs[0]["previous_run_id"] == store.consensus_try1.run_id
    page = client.get(run_path(CONSENSUS_DAG, CONSENSUS_RUN), headers=auth("viewer")).text
    assert "All audit runs of this DAG run" in page
    assert store.consensus_try2.run_id in page and store.consensus_try1.run_id in page
    earlier = client.get(
        run_path(CONSENSUS_DAG, CONSENSUS_RUN) + f"?audit_run={store.consensus_try1.run_id}",
        headers=auth("viewer"),
    ).text
    assert "earlier attempt" in earlier


def test_extra_link_lands_on_its_coalesce(client: Any, store: StoreRuns, auth: Auth) -> None:
    """The extra link opens the task instance's tab inside the Airflow UI, whose frame shows that
    coalesce's decisions."""
    from types import SimpleNamespace

    from airflow import plugins_manager

    from airflow_elspeth.sensors.coalesce import CoalesceAuditLink

    external_views, _ = plugins_manager._get_ui_plugins()
    tab = next(v for v in external_views if v["url_route"] == "elspeth-audit-task")
    for coalesce in ("any_answer", "consensus"):
        link = CoalesceAuditLink().get_link(
            SimpleNamespace(task_id=coalesce),
            ti_key=SimpleNamespace(dag_id=CONSENSUS_DAG, run_id=CONSENSUS_RUN, map_index=-1),
        )
        # Airflow's UI route of a task instance with the plugin tab "elspeth-audit-task" open.
        assert link == (
            f"/dags/{CONSENSUS_DAG}/runs/{quote(CONSENSUS_RUN, safe='')}/tasks/{coalesce}"
            "/plugin/elspeth-audit-task"
        )
        # What that tab frames: the href with the route's parameters substituted, as the UI does.
        framed = (
            tab["href"]
            .replace("{DAG_ID}", CONSENSUS_DAG)
            .replace("{RUN_ID}", quote(CONSENSUS_RUN, safe=""))
            .replace("{TASK_ID}", coalesce)
            .replace("{MAP_INDEX}", "-1")
        )
        page = client.get(framed, headers=auth("viewer"))
        assert page.status_code == 200, framed
        assert f"Coalesce <code>{coalesce}</code>" in page.text
        assert "All audit runs of this DAG run" not in page.text  # that task's part only
    mapped = CoalesceAuditLink().get_link(
        SimpleNamespace(task_id="c"), ti_key=SimpleNamespace(dag_id="d", run_id="r", map_index=3)
    )
    assert mapped == "/dags/d/runs/r/tasks/c/mapped/3/plugin/elspeth-audit-task"
    # A coalesce that has not run yet (it registers on its first poke): the run, and a notice.
    early = client.get(
        run_path(CONSENSUS_DAG, CONSENSUS_RUN) + "?coalesce=not_started", headers=auth("viewer")
    )
    assert early.status_code == 200
    assert "Coalesce <code>not_started</code> has not recorded anything in this audit run yet" in early.text


def test_coalesce_numbers_are_the_coalesce_summary(client: Any, store: StoreRuns, auth: Auth) -> None:
    """The page's counts and matrix are those of the summary the coalesce pushes to XCom."""
    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.read.decisions import coalesce_summary
    from airflow_elspeth.audit.read.runs import coalesce_spec

    engine = engine_for_url(store.url, upgrade=False)
    for built, coalesce in [
        (store.consensus_try2, "consensus"),
        (store.consensus_try2, "any_answer"),
        (store.xss, "consensus"),
    ]:
        summary = coalesce_summary(engine, coalesce_spec(engine, built.run_id, coalesce), built.run_id)
        overview = api_json(
            client,
            auth,
            f"/coalesces/{coalesce}?audit_run={built.run_id}",
            built.dag_id,
            built.airflow_run_id,
        )
        for key in ("rows_total", "rows_merged", "rows_failed", "late_arrivals", "failure_reasons"):
            assert overview[key] == summary[key], key
        if summary["merge"] == "union":
            assert overview["field_collisions"] == summary["field_collisions"]
        if built is store.xss:
            assert overview["field_collisions"]["n"]["branches"] == XSS_BRANCHES[:2]
        cells = overview["missing_matrix"]["cells"]
        assert {b: {r: c["rows"] for r, c in reasons.items()} for b, reasons in cells.items()} == {
            b: info["reasons"] for b, info in summary["missing_branches"].items()
        }
        assert overview["deadline"].replace("Z", "+00:00") == summary["deadline"]


def test_consensus_run_page_shows_matrix_failed_rows_and_late_arrivals(
    client: Any, store: StoreRuns, auth: Auth
) -> None:
    page = client.get(
        run_path(CONSENSUS_DAG, CONSENSUS_RUN) + "?coalesce=consensus", headers=auth("viewer")
    ).text
    overview = api_json(client, auth, "/coalesces/consensus")
    assert overview["rows_failed"] > 0 and overview["late_arrivals"] > 0 and overview["late_after_write"] == 5
    assert f'<div class="n">{overview["rows_failed"]}</div><div class="l">failed' in page
    assert "quorum 2 of 3" in page
    assert "<svg" in page and "deadline +1 s" in page
    # The matrix: claude's losses and gemini's reasons, each cell linking to its rows.
    assert "error:RateLimitError" in page and "late_arrival_after_failure" in page and "not_arrived" in page
    assert "branch=claude&amp;branch_reason=error%3ARateLimitError" in page
    # Failed rows list and the late arrivals (recorded with the decision, and after it was written).
    failed = api_json(client, auth, "/coalesces/consensus/rows")
    assert failed["total"] == overview["rows_failed"]
    for row in failed["rows"][:5]:
        assert f">{row['row_key']}</a>" in page
    assert "Arrived after the decision was written (5)" in page


def test_row_filters_and_pagination(client: Any, store: StoreRuns, auth: Auth) -> None:
    overview = api_json(client, auth, "/coalesces/consensus")
    for branch, reasons in overview["missing_matrix"]["cells"].items():
        for reason, cell in reasons.items():
            page = api_json(
                client,
                auth,
                f"/coalesces/consensus/rows?decision=all&branch={quote(branch)}&branch_reason={quote(reason)}&limit=500",
            )
            assert page["total"] == cell["rows"] == len(page["rows"])
            assert all(row["missing"][branch] == reason for row in page["rows"])
            failed = api_json(
                client,
                auth,
                f"/coalesces/consensus/rows?branch={quote(branch)}&branch_reason={quote(reason)}&limit=500",
            )
            assert failed["total"] == cell["failed_rows"]
    for reason, n in overview["failure_reasons"].items():
        page = api_json(client, auth, f"/coalesces/consensus/rows?reason={reason}&limit=500")
        assert page["total"] == n and {r["failure_reason"] for r in page["rows"]} == {reason}
    # Pages of 7 cover every row once, in (chunk, row key) order.
    everything = api_json(client, auth, "/coalesces/consensus/rows?decision=all&limit=500")["rows"]
    paged: list[str] = []
    for offset in range(0, 40, 7):
        page = api_json(client, auth, f"/coalesces/consensus/rows?decision=all&limit=7&offset={offset}")
        assert page["total"] == 40
        paged += [r["row_key"] for r in page["rows"]]
    assert paged == [r["row_key"] for r in everything] == sorted(paged)
    # The HTML pager links to the next page with the filter kept.
    html = client.get(
        run_path(CONSENSUS_DAG, CONSENSUS_RUN) + "?coalesce=consensus&decision=all&branch=gemini",
        headers=auth("viewer"),
    ).text
    assert "rows 1\N{EN DASH}" in html
    bad = client.get(run_path(CONSENSUS_DAG, CONSENSUS_RUN) + "?decision=bogus", headers=auth("viewer"))
    assert bad.status_code == 400
    assert (
        client.get(run_path(CONSENSUS_DAG, CONSENSUS_RUN) + "?page=0", headers=auth("viewer")).status_code
        == 400
    )


def test_row_lineage_page_explains_a_failed_row(client: Any, store: StoreRuns, auth: Auth) -> None:
    failed = api_json(client, auth, "/coalesces/consensus/rows?reason=quorum_not_met_at_timeout")["rows"][0]
    key = failed["row_key"]
    lineage = api_json(client, auth, f"/lineage?key={quote(key)}")
    consensus = next(d for d in lineage["decisions"] if d["coalesce"] == "consensus")
    assert consensus["decision"] == "failed" and consensus["failure_reason"] == "quorum_not_met_at_timeout"
    assert consensus["replay"]["agrees"] is True
    assert [e["type"] for e in consensus["replay"]["timeline"]].count("deadline") == 1
    assert {b["branch"] for b in lineage["branches"]} == {"gpt", "claude", "gemini"}
    claude = next(b for b in lineage["branches"] if b["branch"] == "claude")
    assert claude["states"][0]["error"]["type"] == "RateLimitError"
    assert claude["outcome"] == "lost"
    page = client.get(
        run_path(CONSENSUS_DAG, CONSENSUS_RUN, f"/lineage?key={quote(key)}"), headers=auth("viewer")
    ).text
    assert "the quorum was not reached by the deadline" in page
    assert "429 Too Many Requests for " + key in page
    assert "Replaying this event log under the coalesce" in page
    assert "Source row" in page and f'"id": "{key}"' in page.replace("&#34;", '"')
    missing = client.get(run_path(CONSENSUS_DAG, CONSENSUS_RUN, "/lineage?key=nope"), headers=auth("viewer"))
    assert missing.status_code == 404 and "nope" in missing.text


def test_merged_row_shows_its_output(client: Any, store: StoreRuns, auth: Auth) -> None:
    merged = api_json(client, auth, "/coalesces/consensus/rows?decision=merged")["rows"][0]
    lineage = api_json(client, auth, f"/lineage?key={quote(merged['row_key'])}")
    consensus = next(d for d in lineage["decisions"] if d["coalesce"] == "consensus")
    assert set(consensus["merged_output"]) == set(consensus["consumed"])
    assert consensus["replay"]["agrees"] is True


def test_task_tabs(client: Any, store: StoreRuns, auth: Auth) -> None:
    """Each task instance's tab shows that task's part of the trail."""
    headers = auth("viewer")
    coalesce = client.get(
        run_path(CONSENSUS_DAG, CONSENSUS_RUN, "/tasks/any_answer?map_index=-1"), headers=headers
    )
    assert coalesce.status_code == 200
    assert "Coalesce <code>any_answer</code>" in coalesce.text and 'id="matrix-title"' in coalesce.text
    assert "Audit run of fork" not in coalesce.text and "Coalesce <code>consensus</code>" not in coalesce.text
    # Its filters stay on the task's tab.
    task_url = run_path(CONSENSUS_DAG, CONSENSUS_RUN, "/tasks/any_answer")
    assert f'action="{task_url}#rows"' in coalesce.text
    filtered = client.get(task_url + "?decision=all&page=1", headers=headers)
    assert filtered.status_code == 200 and "Decided rows" in filtered.text
    fork = client.get(run_path(CONSENSUS_DAG, CONSENSUS_RUN, "/tasks/fork"), headers=headers)
    assert fork.status_code == 200
    assert "Fork <code>fork</code>" in fork.text and "chunks" in fork.text
    assert "Coalesce <code>" not in fork.text
    branch = client.get(
        run_path(CONSENSUS_DAG, CONSENSUS_RUN, "/tasks/ask_1?map_index={MAP_INDEX}"), headers=headers
    )
    assert branch.status_code == 200
    assert "RateLimitError" in branch.text and "Branch step" in branch.text
    stats = api_json(client, auth, "/tasks/ask_1")
    assert stats["kind"] == "branch" and stats["branch"] == "claude"
    assert stats["by_status"]["failed"] == stats["errors"]["RateLimitError"]["rows"] == 20
    assert stats["delivers_to"] == ["any_answer", "consensus"]
    other = client.get(run_path(CONSENSUS_DAG, CONSENSUS_RUN, "/tasks/publish"), headers=headers)
    assert other.status_code == 200 and "has no audit records" in other.text


def test_dag_run_without_audit_runs_and_missing_store(
    client: Any, store: StoreRuns, auth: Auth, use_store: Any
) -> None:
    empty = client.get(run_path(CONSENSUS_DAG, "manual__nothing"), headers=auth("viewer"))
    assert empty.status_code == 200 and "No Elspeth fork ran in this DAG run" in empty.text
    assert api_json(client, auth, "", CONSENSUS_DAG, "manual__nothing")["audit_runs"] == []
    use_store(None)
    none = client.get(run_path(CONSENSUS_DAG, CONSENSUS_RUN), headers=auth("viewer"))
    assert none.status_code == 200 and "No Elspeth audit data yet" in none.text
    gone = client.get(
        run_path(CONSENSUS_DAG, CONSENSUS_RUN, "/coalesces/consensus", api=True), headers=auth("viewer")
    )
    assert gone.status_code == 404


def test_the_store_is_found_the_way_the_operators_find_it(
    client: Any, ui_store: StoreRuns, auth: Auth, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """No override: the app resolves the store through ElspethAuditHook (here the default connection)."""
    from airflow_elspeth.plugins import app as ui

    def connection(url: str) -> str:
        return json.dumps({"conn_type": "elspeth", "extra": {"sqlalchemy_url": url}})

    monkeypatch.setattr(ui, "_url_cache", None)
    monkeypatch.setenv("AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT", connection(ui_store.url))
    page = client.get(run_path(CONSENSUS_DAG, CONSENSUS_RUN), headers=auth("viewer"))
    assert page.status_code == 200 and "Coalesce <code>any_answer</code>" in page.text

    missing = tmp_path / "not-created.db"
    monkeypatch.setattr(ui, "_url_cache", None)
    monkeypatch.setenv("AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT", connection(f"sqlite:///{missing}"))
    page = client.get(run_path(CONSENSUS_DAG, CONSENSUS_RUN), headers=auth("viewer"))
    assert page.status_code == 200 and "No Elspeth audit data yet" in page.text
    assert not missing.exists(), "the UI must not create the audit store"
    monkeypatch.setattr(ui, "_url_cache", None)
