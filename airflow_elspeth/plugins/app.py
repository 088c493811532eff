"""The Elspeth audit UI: a FastAPI app the Airflow API server mounts at ``/elspeth``.

Server-rendered HTML (Jinja2, autoescaped) over a JSON API (``/elspeth/api/...``); both read the
same read models (:mod:`airflow_elspeth.audit.read`; the arrival curves through
:mod:`airflow_elspeth.plugins.series`). Read-only: only GET routes. The pages carry one script of
their own (``static/page.js``, inlined and allowed by its hash, no other script runs) and work
without it: it applies Airflow's theme to a page opened on its own, and keeps the address of a DAG
run's or task instance's tab on the page shown in it.

Plugin apps are open by default in Airflow 3, so every route declares its access check: the routes
under ``/dags/{dag_id}/...`` require an authenticated user with read access to that DAG (Airflow's
own ``requires_access_dag("GET")``, which reads ``dag_id`` from the path), and the index lists only
DAGs the user may read. Authentication is Airflow's: the UI's ``_token`` cookie or a bearer JWT.

Every query is scoped by the DAG and DAG run in the path, so an audit run id from another DAG is
not found rather than shown.

Light and dark: CSS variables for both. Airflow 3.3's UI (next-themes, ``attribute="class"``,
localStorage key ``theme``: ``light``, ``dark`` or ``system``) sets ``color-scheme`` on its ``<html>``;
the tab's iframe inherits it and the framed page's ``prefers-color-scheme`` follows it. A page opened
on its own reads the stored theme (same origin) into ``data-theme``; ``system`` or none leaves
``prefers-color-scheme`` (the OS's) in charge.

Addresses: Airflow's UI frames a DAG run's or task instance's tab at its href and, unlike a menu
view's, never moves its own address with the frame. The page script does it the way the UI does
for menu views: ``.../plugin/<url_route>`` followed by the framed page's path, query and fragment
(``history.replaceState``, same origin). A tab first opened on such an address shows the page it
names, if that page belongs to the tab's DAG run.

Errors: a page that fails on the audit store says what failed and a reference; the driver's text
(which can name the store's host and port) goes only to the API server's log, under that reference.

Airflow task states (the coalesce's, shown beside its counts) are read from the metadata DB through
:mod:`airflow_elspeth.airflow_states`, the API server's own database; when they cannot be read the
pages say so and show the audit-side facts alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from airflow_elspeth.audit.read import decisions, index, lineage, tasks
from airflow_elspeth.audit.read.cache import coalesce_ref
from airflow_elspeth.audit.read.records import AuditRunView, IndexedRun, TaskView, to_json
from airflow_elspeth.audit.read.runs import audit_runs, pick_audit_run
from airflow_elspeth.core import vocabulary
from airflow_elspeth.core.canonical import canonical_json
from airflow_elspeth.core.vocabulary import DecisionStatus, NodeType, ReasonKind
from airflow_elspeth.exceptions import NoAuditStore, NotFound
from airflow_elspeth.plugins import chart, series

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
PAGE_SCRIPT = (Path(__file__).parent / "static" / "page.js").read_text(encoding="utf-8")
# A value (source row, output, merged output) longer than this, as shown, is cut on the row page:
# its size and a link to the whole value stand in for the rest (a 1 MB field made a 3 MB page).
VALUE_PREVIEW_CHARS = 2048
PAGE_SIZE = 50
LATE_PAGE_SIZE = 20
URL_CACHE_SECONDS = 60.0
ALL_DECISIONS = "all"
DECISIONS = (DecisionStatus.FAILED.value, DecisionStatus.MERGED.value, ALL_DECISIONS)


def _script_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode() + "'"


# Airflow renders plugin pages in an iframe of its own origin; the page script is the only script.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_script_hash(PAGE_SCRIPT)}; style-src 'unsafe-inline'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------------------------------
# The audit store


_url_lock = threading.Lock()
_url_cache: tuple[float, URL] | None = None


def resolve_audit_url() -> URL:
    """The audit store's URL, the way the operators find it (ElspethAuditHook), cached a minute."""
    global _url_cache
    with _url_lock:
        if _url_cache is not None and time.monotonic() - _url_cache[0] < URL_CACHE_SECONDS:
            return _url_cache[1]
    from airflow_elspeth.hooks.audit import ElspethAuditHook

    url = ElspethAuditHook().get_url()
    with _url_lock:
        _url_cache = (time.monotonic(), url)
    return url


def audit_engine() -> Engine:
    """The audit store's Engine, never migrated from here (the UI only reads).

    An embedded SQLite file that does not exist yet is not created: :class:`NoAuditStore`.
    """
    from airflow_elspeth.audit.engine import engine_for_url

    url = resolve_audit_url()
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or not Path(database).exists():
            raise NoAuditStore(f"no audit store at {database or '(memory)'} yet")
    return engine_for_url(url, upgrade=False)


def optional_engine() -> Engine | None:
    try:
        return audit_engine()
    except NoAuditStore:
        return None


EngineDep = Annotated[Any, Depends(optional_engine)]
IndexLimit = Annotated[int, Query(ge=1, le=index.MAX_LIMIT)]


class TaskStateReader:
    """Reads Airflow task states once per request, remembering whether it could (``note``)."""

    def __init__(self) -> None:
        self.note: str | None = None
        self.known = False

    def __call__(self, wanted: index.WantedTasks) -> dict[tuple[str, str, str], str] | None:
        from airflow_elspeth.airflow_states import airflow_task_states
        from airflow_elspeth.exceptions import AirflowStatesUnavailable

        try:
            states, _ = airflow_task_states(wanted)
        except AirflowStatesUnavailable as err:
            # Its text names the metadata database (host, port): the log has it, the page a reference.
            reference = error_reference()
            log.warning("Elspeth UI: Airflow task states unavailable [reference %s]: %s", reference, err)
            self.note = (
                f"Airflow task states could not be read (reference {reference} in the API server's log); "
                "showing the audit trail's facts only."
            )
            return None
        self.known = True
        return states

    def state(self, dag_id: str, run_id: str, task_id: str) -> str | None:
        states = self({(dag_id, run_id): {task_id}})
        return None if states is None else states.get((dag_id, run_id, task_id))


# --------------------------------------------------------------------------------------------------
# Formatting helpers (Jinja filters; output is escaped by the template)


def fmt_time(value: datetime | None) -> str:
    if value is None:
        return "—"
    value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d} UTC"


def fmt_hms(value: datetime | None) -> str:
    """``14:03:07 UTC`` (a deadline, to the second)."""
    if value is None:
        return "—"
    return value.astimezone(timezone.utc).strftime("%H:%M:%S UTC")


_TASK_BADGES = {
    "success": "ok",
    "failed": "failed",
    "upstream_failed": "failed",
    "up_for_retry": "late",
    "skipped": "neutral",
    "removed": "neutral",
}


def task_badge(state: str | None) -> str:
    """The badge class of an Airflow task state (anything still in progress: ``running``)."""
    return _TASK_BADGES.get(state or "", "running")


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    value = abs(seconds)
    sign = "-" if seconds < 0 else ""
    if value < 1:
        return f"{sign}{value * 1000:.0f} ms"
    if value < 120:
        return f"{sign}{value:.2f} s".replace(".00 s", " s")
    if value < 7200:
        minutes, secs = divmod(value, 60)
        return f"{sign}{int(minutes)} min {secs:.0f} s"
    hours, rest = divmod(value, 3600)
    return f"{sign}{int(hours)} h {rest / 60:.0f} min"


def fmt_relative(value: datetime | None, origin: datetime | None) -> str:
    """``+1.25 s`` after ``origin`` (the fork's completion)."""
    if value is None or origin is None:
        return ""
    seconds = (value - origin).total_seconds()
    return ("+" if seconds >= 0 else "") + fmt_seconds(seconds)


def fmt_number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def fmt_percent(part: float, whole: float) -> str:
    if not whole:
        return "0%"
    share = 100 * part / whole
    if 0 < share < 0.1:
        return "<0.1%"
    return f"{share:.1f}%".replace(".0%", "%")


_SHADES = {
    ReasonKind.LOSS.value: (207, 34, 46, 0.06, 0.34),
    ReasonKind.LATE.value: (212, 167, 44, 0.10, 0.34),
    ReasonKind.WAITING.value: (87, 96, 106, 0.06, 0.26),
    # Airflow's own colour for a skipped task (pink): a skip of a decided row is no loss.
    ReasonKind.SKIPPED.value: (219, 39, 119, 0.05, 0.22),
}


def shade(kind: str, rows: int, total: int) -> str:
    """Background of a matrix cell: the colour of its kind, stronger with its share of the rows."""
    red, green, blue, low, span = _SHADES.get(kind, _SHADES[ReasonKind.WAITING.value])
    share = rows / total if total else 0
    return f"rgba({red},{green},{blue},{low + span * min(share, 1):.2f})"


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def fmt_bytes(size: int) -> str:
    """``812 B``, ``2.0 KB``, ``1.0 MB`` (powers of 1024)."""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


@dataclass(frozen=True)
class ValuePreview:
    """A stored value as the row page shows it: pretty JSON, cut past ``VALUE_PREVIEW_CHARS``."""

    text: str
    truncated: bool
    size: int  # bytes of the whole value as stored (canonical JSON), which its link serves


def value_preview(value: Any) -> ValuePreview:
    """The pretty JSON of ``value``, whole when short, else its first ``VALUE_PREVIEW_CHARS`` characters."""
    text = pretty_json(value)
    truncated = len(text) > VALUE_PREVIEW_CHARS
    return ValuePreview(text[:VALUE_PREVIEW_CHARS], truncated=truncated, size=len(canonical_json(value)))


def error_reference() -> str:
    """A short random id naming one failure on the page and in the log line that holds its error."""
    return secrets.token_hex(4)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # every template, whatever its extension
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ts=fmt_time,
        hms=fmt_hms,
        secs=fmt_seconds,
        rel=fmt_relative,
        num=fmt_number,
        json=pretty_json,
        bytes=fmt_bytes,
    )
    env.globals.update(
        pct=fmt_percent,
        reason_text=vocabulary.missing_reason_text,
        reason_kind=lambda reason: vocabulary.reason_kind(reason).value,
        outcome_text=vocabulary.outcome_text,
        shade=shade,
        failure_text=vocabulary.failure_reason_text,
        task_badge=task_badge,
        preview=value_preview,
        page_script=Markup(PAGE_SCRIPT),
    )
    return env


templates = Jinja2Templates(env=_environment())


# --------------------------------------------------------------------------------------------------
# Links


class Links:
    """URLs of this app's pages, under wherever it is mounted (``root_path``)."""

    def __init__(self, request: Request, dag_id: str, run_id: str) -> None:
        self.root = request.scope.get("root_path", "").rstrip("/")
        self.dag_id, self.run_id = dag_id, run_id
        self.base = f"{self.root}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"

    @staticmethod
    def _query(params: Mapping[str, Any]) -> str:
        kept = {k: v for k, v in params.items() if v not in (None, "")}
        return ("?" + urlencode(kept)) if kept else ""

    def run(self, **params: Any) -> str:
        return self.base + self._query(params)

    def row(self, key: str, **params: Any) -> str:
        return f"{self.base}/lineage" + self._query({"key": key, **params})

    def task(self, task_id: str, **params: Any) -> str:
        return f"{self.base}/tasks/{quote(task_id, safe='')}" + self._query(params)

    def api(self, suffix: str = "", **params: Any) -> str:
        base = f"{self.root}/api/dags/{quote(self.dag_id, safe='')}/runs/{quote(self.run_id, safe='')}"
        return base + suffix + self._query(params)

    def coalesce_api(self, coalesce: str, suffix: str = "", **params: Any) -> str:
        return self.api(f"/coalesces/{quote(coalesce, safe='')}{suffix}", **params)

    def payload(self, payload_hash: str, key: str, audit_run: str) -> str:
        """One whole value of a row (its source, an output, a merged output), as JSON."""
        return self.api(f"/lineage/payloads/{quote(payload_hash, safe='')}", key=key, audit_run=audit_run)

    def index(self) -> str:
        return f"{self.root}/"


def _render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def _blank(value: str | None) -> str | None:
    """Empty form fields mean "no filter"."""
    return value if value not in (None, "") else None


# --------------------------------------------------------------------------------------------------
# Shared lookups


def _runs_and_selection(
    engine: Engine | None, dag_id: str, run_id: str, audit_run: str | None, coalesce: str | None
) -> tuple[list[AuditRunView], AuditRunView | None]:
    runs = audit_runs(engine, dag_id, run_id) if engine is not None else []
    selected = pick_audit_run(runs, audit_run_id=audit_run, coalesce=coalesce)
    if audit_run and selected is None:
        raise HTTPException(404, f"No audit run {audit_run!r} in DAG run {run_id!r} of {dag_id!r}")
    return runs, selected


def _require_selected(
    engine: Engine | None, dag_id: str, run_id: str, audit_run: str | None, coalesce: str | None = None
) -> tuple[Engine, list[AuditRunView], AuditRunView]:
    runs, selected = _runs_and_selection(engine, dag_id, run_id, audit_run, coalesce)
    if engine is None or selected is None:
        raise HTTPException(404, f"No Elspeth audit runs for DAG run {run_id!r} of {dag_id!r}")
    if coalesce is not None and coalesce not in selected.coalesces:
        raise HTTPException(404, f"No coalesce {coalesce!r} in audit run {selected.audit_run_id}")
    return engine, runs, selected


def _row_filter(
    decision: str | None, reason: str | None, branch: str | None, branch_reason: str | None
) -> decisions.RowFilter:
    decision = _blank(decision) or DecisionStatus.FAILED.value
    if decision not in DECISIONS:
        raise HTTPException(400, f"decision must be one of {list(DECISIONS)}, got {decision!r}")
    branch = _blank(branch)
    return decisions.RowFilter(
        decision=None if decision == ALL_DECISIONS else decision,
        reason=_blank(reason),
        branch=branch,
        branch_reason=_blank(branch_reason) if branch is not None else None,
    )


def _map_index(value: str | None) -> int | None:
    """The UI substitutes ``{MAP_INDEX}``; anything that is not a number means "not mapped"."""
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


class SectionQuery:
    """The coalesce section's filters and pages: query parameters of the run page and of a
    coalesce's task tab (validated before anything is read)."""

    def __init__(
        self,
        decision: str | None = None,
        reason: str | None = None,
        branch: str | None = None,
        branch_reason: str | None = None,
        page: Annotated[int, Query(ge=1)] = 1,
        late_page: Annotated[int, Query(ge=1)] = 1,
    ) -> None:
        self.flt = _row_filter(decision, reason, branch, branch_reason)
        self.asked_decision = _blank(decision)
        self.page, self.late_page = page, late_page


SectionDep = Annotated[SectionQuery, Depends()]


def _coalesce_section(
    engine: Engine,
    selected: AuditRunView,
    node: str,
    view: Callable[..., str],
    query: SectionQuery,
    task_state: str | None,
) -> dict[str, Any]:
    """What run.html's coalesce section shows: overview, chart, rows, late arrivals, and why rows
    are undecided; ``view(**params)`` is the URL of the page it is on (the run page or a task tab)."""
    flt, page, late_page = query.flt, query.page, query.late_page
    ref = coalesce_ref(engine, selected.audit_run_id, node)
    overview = series.coalesce_page_overview(engine, selected, node, ref=ref)
    if query.asked_decision is None and not overview.rows_failed:
        # Nothing failed: list every decided row rather than an empty list.
        flt = _row_filter(ALL_DECISIONS, flt.reason, flt.branch, flt.branch_reason)
    rows = decisions.decision_rows(
        engine, selected.audit_run_id, node, flt, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE, ref=ref
    )
    late = decisions.late_arrivals(
        engine, selected, node, limit=LATE_PAGE_SIZE, offset=(late_page - 1) * LATE_PAGE_SIZE, ref=ref
    )
    filters = {
        "audit_run": selected.audit_run_id,
        "coalesce": node,
        "decision": ALL_DECISIONS if flt.decision is None else flt.decision,
        "reason": flt.reason,
        "branch": flt.branch,
        "branch_reason": flt.branch_reason,
    }
    return {
        "here": view,
        "page_link": lambda p: view(**filters, page=p, late_page=late_page) + "#rows",
        "late_page_link": lambda p: view(**filters, page=page, late_page=p) + "#late",
        "coalesce": node,
        "overview": overview,
        "chart": chart.arrivals_chart(overview.arrivals, overview.branches, chart.colours(selected.branches)),
        "flt": flt,
        "decision_param": ALL_DECISIONS if flt.decision is None else flt.decision,
        "rows": rows,
        "page": page,
        "pages": max(1, -(-rows.total // PAGE_SIZE)),
        "late": late,
        "late_page": late_page,
        "late_pages": max(1, -(-late.total_rows // LATE_PAGE_SIZE)),
        "page_size": PAGE_SIZE,
        "late_page_size": LATE_PAGE_SIZE,
        "task_state": task_state,
        "undecided": index.undecided_status(
            undecided=overview.rows_undecided,
            deadline=overview.deadline,
            task_state=task_state,
            current=bool(selected.current),
            now=datetime.now(timezone.utc),
        ),
    }


# --------------------------------------------------------------------------------------------------
# HTML pages


def _access_dependencies() -> list[Any]:
    """Authenticated, with read access to the DAG named in the path (Airflow's own check)."""
    return [Depends(requires_access_dag(method="GET"))]


def build_pages() -> APIRouter:
    router = APIRouter(dependencies=_access_dependencies())

    @router.get("/dags/{dag_id}/runs/{run_id}", response_class=HTMLResponse, name="run_page")
    def run_page(
        request: Request,
        dag_id: str,
        run_id: str,
        engine: EngineDep,
        query: SectionDep,
        audit_run: str | None = None,
        coalesce: str | None = None,
    ) -> HTMLResponse:
        """The DAG run's audit: its audit runs, then one coalesce in full."""
        links = Links(request, dag_id, run_id)
        audit_run, coalesce = _blank(audit_run), _blank(coalesce)
        runs, selected = _runs_and_selection(engine, dag_id, run_id, audit_run, coalesce)
        context: dict[str, Any] = {
            "dag_id": dag_id,
            "run_id": run_id,
            "links": links,
            "runs": runs,
            "selected": selected,
            "store_missing": engine is None,
            "asked_coalesce": coalesce,
            "coalesce": None,
            "task_only": False,
            "colours": chart.colours(selected.branches) if selected else {},
        }
        if engine is not None and selected is not None and selected.coalesces:
            node = coalesce if coalesce in selected.coalesces else selected.coalesces[0]
            context.update(
                _coalesce_section(
                    engine,
                    selected,
                    node,
                    lambda **params: links.run(**params),
                    query,
                    task_state=TaskStateReader().state(dag_id, run_id, node),
                )
            )
        return _render(request, "run.html", context)

    @router.get("/dags/{dag_id}/runs/{run_id}/lineage", response_class=HTMLResponse, name="row_page")
    def row_page(
        request: Request,
        dag_id: str,
        run_id: str,
        engine: EngineDep,
        key: str,
        audit_run: str | None = None,
        coalesce: str | None = None,
    ) -> HTMLResponse:
        """One row: lineage from the source row to the decision and the merged output."""
        links = Links(request, dag_id, run_id)
        engine, _, selected = _require_selected(engine, dag_id, run_id, _blank(audit_run))
        try:
            row = lineage.row_view(engine, selected, key)
        except NotFound as err:
            raise HTTPException(404, f"No row {key!r} in audit run {selected.audit_run_id}") from err
        return _render(
            request,
            "row.html",
            {
                "dag_id": dag_id,
                "run_id": run_id,
                "links": links,
                "selected": selected,
                "row": row,
                "coalesce": _blank(coalesce) or (row.decisions[0].coalesce if row.decisions else None),
                "colours": chart.colours(selected.branches),
            },
        )

    @router.get("/dags/{dag_id}/runs/{run_id}/tasks/{task_id}", name="task_page")
    def task_page(
        request: Request,
        dag_id: str,
        run_id: str,
        task_id: str,
        engine: EngineDep,
        query: SectionDep,
        map_index: str | None = None,
        audit_run: str | None = None,
    ) -> Response:
        """A task instance's tab, that task's part: a fork's rows and chunks, a branch step's results
        and losses, a coalesce's decisions (the run page's coalesce section, without the rest)."""
        links = Links(request, dag_id, run_id)
        found, _ = _runs_and_selection(engine, dag_id, run_id, None, None)
        if _blank(audit_run):
            found = [r for r in found if r.audit_run_id == audit_run] or found
        view = tasks.task_view(engine, found, task_id, _map_index(map_index)) if engine is not None else None
        selected = next((r for r in found if view and r.audit_run_id == view.audit_run_id), None)
        context: dict[str, Any] = {
            "dag_id": dag_id,
            "run_id": run_id,
            "task_id": task_id,
            "links": links,
            "view": view,
            "runs": found,
            "selected": selected,
            "store_missing": engine is None,
            "coalesce": None,
            "task_only": True,
            "asked_coalesce": None,
            "colours": chart.colours(selected.branches) if selected else {},
        }
        if (
            engine is not None
            and selected is not None
            and view is not None
            and view.kind == NodeType.COALESCE
        ):

            def here(**params: Any) -> str:
                params.pop("coalesce", None)
                return links.task(task_id, **params)

            context.update(
                _coalesce_section(
                    engine,
                    selected,
                    task_id,
                    here,
                    query,
                    task_state=TaskStateReader().state(dag_id, run_id, task_id),
                )
            )
            return _render(request, "run.html", context)
        return _render(request, "task.html", context)

    return router


# --------------------------------------------------------------------------------------------------
# JSON API


def build_api() -> APIRouter:
    router = APIRouter(prefix="/api", dependencies=_access_dependencies())

    @router.get("/dags/{dag_id}/runs/{run_id}")
    def api_run(dag_id: str, run_id: str, engine: EngineDep) -> dict[str, Any]:
        """The audit runs of a DAG run (newest try of each fork first), with their coalesces."""
        found = audit_runs(engine, dag_id, run_id) if engine is not None else []
        return {"dag_id": dag_id, "run_id": run_id, "audit_runs": to_json(found)}

    @router.get("/dags/{dag_id}/runs/{run_id}/coalesces/{coalesce}")
    def api_coalesce(
        dag_id: str, run_id: str, coalesce: str, engine: EngineDep, audit_run: str | None = None
    ) -> dict[str, Any]:
        """Configuration, deadline, counts, failure reasons, missing-branch matrix, arrival curves."""
        engine, _, selected = _require_selected(engine, dag_id, run_id, audit_run, coalesce)
        overview: dict[str, Any] = to_json(series.coalesce_page_overview(engine, selected, coalesce))
        return overview

    @router.get("/dags/{dag_id}/runs/{run_id}/coalesces/{coalesce}/rows")
    def api_rows(
        dag_id: str,
        run_id: str,
        coalesce: str,
        engine: EngineDep,
        audit_run: str | None = None,
        decision: str | None = None,
        reason: str | None = None,
        branch: str | None = None,
        branch_reason: str | None = None,
        limit: Annotated[int, Query(ge=1, le=decisions.MAX_PAGE_SIZE)] = PAGE_SIZE,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """A page of decided rows (default: failed), filtered by reason, missing branch and why."""
        engine, _, selected = _require_selected(engine, dag_id, run_id, audit_run, coalesce)
        flt = _row_filter(decision, reason, branch, branch_reason)
        page: dict[str, Any] = to_json(
            decisions.decision_rows(engine, selected.audit_run_id, coalesce, flt, limit=limit, offset=offset)
        )
        return page

    @router.get("/dags/{dag_id}/runs/{run_id}/coalesces/{coalesce}/late-arrivals")
    def api_late(
        dag_id: str,
        run_id: str,
        coalesce: str,
        engine: EngineDep,
        audit_run: str | None = None,
        limit: Annotated[int, Query(ge=1, le=decisions.MAX_PAGE_SIZE)] = PAGE_SIZE,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """Arrivals after their row's decision (recorded, never merged)."""
        engine, _, selected = _require_selected(engine, dag_id, run_id, audit_run, coalesce)
        late: dict[str, Any] = to_json(
            decisions.late_arrivals(engine, selected, coalesce, limit=limit, offset=offset)
        )
        return late

    @router.get("/dags/{dag_id}/runs/{run_id}/lineage")
    def api_lineage(
        dag_id: str, run_id: str, key: str, engine: EngineDep, audit_run: str | None = None
    ) -> dict[str, Any]:
        """One row's lineage and decisions, each replayed from its event log."""
        engine, _, selected = _require_selected(engine, dag_id, run_id, audit_run)
        try:
            row: dict[str, Any] = to_json(lineage.row_view(engine, selected, key))
            return row
        except NotFound as err:
            raise HTTPException(404, f"No row {key!r} in audit run {selected.audit_run_id}") from err

    @router.get("/dags/{dag_id}/runs/{run_id}/lineage/payloads/{payload_hash}")
    def api_payload(
        dag_id: str,
        run_id: str,
        payload_hash: str,
        key: str,
        engine: EngineDep,
        audit_run: str | None = None,
    ) -> Response:
        """One whole value of a row (its source row, a step's output, a merged output), as stored:
        the row page shows values cut past ``VALUE_PREVIEW_CHARS`` and links here."""
        engine, _, selected = _require_selected(engine, dag_id, run_id, _blank(audit_run))
        try:
            body = lineage.row_payload(engine, selected.audit_run_id, key, payload_hash)
        except NotFound as err:
            raise HTTPException(
                404, f"No value {payload_hash!r} of row {key!r} in audit run {selected.audit_run_id}"
            ) from err
        return Response(body, media_type="application/json")

    @router.get("/dags/{dag_id}/runs/{run_id}/tasks/{task_id}")
    def api_task(
        dag_id: str, run_id: str, task_id: str, engine: EngineDep, map_index: str | None = None
    ) -> dict[str, Any]:
        """What a task is in the audit trail and, for a branch step, what it did."""
        if engine is None:
            view: dict[str, Any] = to_json(TaskView(kind=None, task_id=task_id, audit_run_id=None))
        else:
            found = audit_runs(engine, dag_id, run_id)
            view = to_json(tasks.task_view(engine, found, task_id, _map_index(map_index)))
        return view

    return router


# --------------------------------------------------------------------------------------------------
# The app


def _route_path(request: Request) -> str:
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _login_url(request: Request) -> str | None:
    try:
        return get_auth_manager().get_url_login(next_url=str(request.url))
    except Exception:  # no auth manager (tests of templates alone)
        return None


def _error_page(
    request: Request, status: int, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    if _route_path(request).startswith("/api/"):
        return JSONResponse({"detail": detail}, status_code=status, headers=dict(headers or {}))
    titles = {
        400: "Bad request",
        401: "Not logged in",
        403: "Not allowed",
        404: "Not found",
        405: "Read-only",
        422: "Bad request",
        503: "Audit store unavailable",
    }
    return _render(
        request,
        "error.html",
        {
            "status": status,
            "title": titles.get(status, "Error"),
            "detail": detail,
            "login_url": _login_url(request) if status == 401 else None,
            "root": request.scope.get("root_path", "").rstrip("/"),
        },
        status_code=status,
    )


@dataclass(frozen=True)
class IndexPage:
    """One page of the index: its runs, how many the filters select, the DAG filter's choices."""

    runs: list[IndexedRun]
    total: int
    dag_ids: list[str]
    reader: TaskStateReader


def _instant(name: str, value: str | None) -> datetime | None:
    """An ISO date or date-time from the address (a naive one is UTC); blank is no bound.

    :raises ValueError: not an ISO date or date-time.
    """
    if _blank(value) is None:
        return None
    try:
        found = datetime.fromisoformat(str(value))
    except ValueError as err:
        raise ValueError(f"{name} must be an ISO date or date-time, got {value!r}") from err
    return found if found.tzinfo is not None else found.replace(tzinfo=timezone.utc)


def create_app() -> FastAPI:
    """The app ElspethPlugin mounts at ``/elspeth`` (no docs or OpenAPI routes: nothing unguarded)."""
    app = FastAPI(
        title="Elspeth audit",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(build_pages())
    app.include_router(build_api())

    def _selection(
        dag_id: str | None, since: str | None, until: str | None, outcome: str | None
    ) -> index.IndexSelection:
        try:
            return index.IndexSelection(
                dag_id=_blank(dag_id),
                since=_instant("since", since),
                until=_instant("until", until),
                outcome=_blank(outcome),
            )
        except ValueError as err:
            raise HTTPException(400, str(err)) from err

    def _index(
        engine: Engine | None,
        user: Any,
        selection: index.IndexSelection,
        sort: str,
        order: str,
        limit: int,
        offset: int,
    ) -> IndexPage:
        if sort not in index.SORT_KEYS:
            raise HTTPException(400, f"sort must be one of {list(index.SORT_KEYS)}, got {sort!r}")
        if order not in ("asc", "desc"):
            raise HTTPException(400, f"order must be asc or desc, got {order!r}")
        reader = TaskStateReader()
        if engine is None:
            return IndexPage([], 0, [], reader)
        readable = get_auth_manager().get_authorized_dag_ids(user=user, method="GET")
        runs = index.audit_index(
            engine,
            readable,
            selection=selection,
            read_task_states=reader,
            sort=sort,
            descending=order == "desc",
            limit=limit,
            offset=offset,
        )
        total = index.count_index(engine, readable, selection)
        return IndexPage(runs, total, index.index_dag_ids(engine, readable), reader)

    @app.get("/", response_class=HTMLResponse, name="index")
    def index_page(
        request: Request,
        engine: EngineDep,
        user: GetUserDep,
        sort: str = index.SORT_KEYS[0],
        order: str = "desc",
        limit: IndexLimit = 50,
        page: Annotated[int, Query(ge=1)] = 1,
        dag_id: str | None = None,
        since: str | None = None,
        until: str | None = None,
        outcome: str | None = None,
    ) -> HTMLResponse:
        """Audit runs of the DAGs this user may read, outcomes first (per coalesce), a page at a time."""
        selection = _selection(dag_id, since, until, outcome)
        found = _index(engine, user, selection, sort, order, limit, (page - 1) * limit)
        root = request.scope.get("root_path", "").rstrip("/")
        # Every link keeps the filters; a default is left out of the address.
        kept = {
            "dag_id": selection.dag_id,
            "since": _blank(since),
            "until": _blank(until),
            "outcome": selection.outcome,
            "sort": sort if sort != index.SORT_KEYS[0] else None,
            "order": order if order != "desc" else None,
            "limit": limit if limit != 50 else None,
        }

        def link(path: str = "/", **changes: Any) -> str:
            params = {k: v for k, v in {**kept, **changes}.items() if v is not None}
            return f"{root}{path}" + (f"?{urlencode(params)}" if params else "")

        pages = max(1, -(-found.total // limit))
        return _render(
            request,
            "index.html",
            {
                "runs": found.runs,
                "store_missing": engine is None,
                "root": root,
                "quote": lambda value: quote(value, safe=""),
                "sort": sort,
                "order": order,
                "sort_link": lambda key: link(
                    sort=key, order="asc" if (sort, order) == (key, "desc") else "desc", page=None
                ),
                "page_link": lambda number: link(page=number if number > 1 else None),
                "api_link": link("/api/runs", offset=(page - 1) * limit or None),
                "page": page,
                "pages": pages,
                "total": found.total,
                "limit": limit,
                "selection": selection,
                "form": {"since": _blank(since) or "", "until": _blank(until) or ""},
                "dag_ids": found.dag_ids,
                "outcomes": index.OUTCOMES,
                "filtered": any(
                    v is not None for k, v in kept.items() if k in ("dag_id", "since", "until", "outcome")
                ),
                "states_note": found.reader.note,
                "alerts": index.ALERTS,
            },
        )

    @app.get("/api/runs", name="api_index")
    def api_index(
        engine: EngineDep,
        user: GetUserDep,
        sort: str = index.SORT_KEYS[0],
        order: str = "desc",
        limit: IndexLimit = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
        dag_id: str | None = None,
        since: str | None = None,
        until: str | None = None,
        outcome: str | None = None,
    ) -> dict[str, Any]:
        """The index as JSON: a page of the audit runs of readable DAGs, with per coalesce its
        outcome, and how many runs the filters select (``total``)."""
        selection = _selection(dag_id, since, until, outcome)
        found = _index(engine, user, selection, sort, order, limit, offset)
        return {
            "sort": sort,
            "order": order,
            "filters": to_json(selection),
            "total": found.total,
            "limit": limit,
            "offset": offset,
            "task_states": "read" if found.reader.known else (found.reader.note or "not needed"),
            "audit_runs": to_json(found.runs),
        }

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error_page(request, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if _route_path(request).startswith("/api/"):
            return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in exc.errors()
        )
        return _error_page(request, 400, problems or "invalid request")

    @app.exception_handler(SQLAlchemyError)
    async def store_error(request: Request, exc: SQLAlchemyError) -> Response:
        # The driver's text can name the store's host and port: the log has it, the page a reference.
        reference = error_reference()
        log.error(
            "Elspeth UI: the audit store could not be read [reference %s] (%s): %s",
            reference,
            _route_path(request),
            exc,
            exc_info=exc,
        )
        return _error_page(
            request,
            503,
            f"The audit store could not be read. Reference {reference}: the API server's log holds the "
            "error under it.",
        )

    return app
