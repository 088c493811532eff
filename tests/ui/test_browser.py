"""A person's path through the real UI, in headless Chromium: log in, open a DAG run, click its
"Fork/join audit" tab, read the missing-branches matrix, click a failed row and read why it failed;
then the index and the coalesce tab in Airflow's light and dark themes; the tab's address following
the page shown in it (a row's lineage reopened from its address), row keys on one line, no warning
for a branch step that lost nothing; and pages opened on their own in the theme stored by Airflow.

Everything is real: ``airflow db migrate`` and ``dag.test()`` of dags/example_llm_consensus.py in a
temporary AIRFLOW_HOME, then ``airflow api-server`` with the plugin loaded from the installed entry
point, the SimpleAuthManager's login form, and Chromium driven by Selenium through chromedriver.
Screenshots go to ``test-artifacts/ui/``.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the pip package ``selenium``
(the ``test`` extra). Without them the test is skipped, or fails when ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest

from .conftest import artifacts_dir

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "example_llm_consensus"
USER, PASSWORD = "viewer", "viewer-browser-pw"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1500,1400",
]


def _require(condition: bool, what: str) -> None:
    if condition:
        return
    message = f"{what}; install the Debian packages chromium and chromium-driver and pip install selenium"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _browser_tools() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    _require(chromium is not None, "chromium not found on PATH")
    _require(driver is not None, "chromedriver not found on PATH")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _require(False, "the selenium package is not installed")
    assert chromium is not None and driver is not None
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Server:
    base: str
    run_id: str
    home: Path


def _airflow_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_")) and k != "AIRFLOW_HOME"
    }
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({USER: PASSWORD, "admin": "admin-browser-pw"}))
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{USER}:viewer,admin:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="False",
        AIRFLOW__API_AUTH__JWT_SECRET="elspeth-browser-test-" + "0123456789abcdef" * 4,
        AIRFLOW__API__WORKERS="1",
    )
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


EXAMPLE = REPO / "dags" / "example_llm_consensus.py"
DAG_TEST = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("example_llm_consensus", {str(EXAMPLE)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
run = module.dag.test()
print("ELSPETH_RUN", run.state, run.run_id)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _browser_tools()
    home = tmp_path_factory.mktemp("browser-airflow-home")
    env = _airflow_env(home)
    started = time.monotonic()
    _run([sys.executable, "-m", "airflow", "db", "migrate"], env, 300)
    out = _run([sys.executable, "-c", DAG_TEST], env, 600)
    line = next(x for x in out.splitlines() if x.startswith("ELSPETH_RUN "))
    _, state, run_id = line.split(" ", 2)
    assert state == "success", out[-3000:]
    print(f"\nexample DAG ran in {time.monotonic() - started:.0f}s: {run_id}", file=sys.stderr)

    port = _free_port()
    log = (home / "api-server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped with everything it started
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(base + "/api/v2/monitor/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "api-server did not start:\n" + (home / "api-server.log").read_text()[-4000:]
                )
            time.sleep(1)
        yield Server(base, run_id, home)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


@pytest.fixture
def browser(server: Server) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_tools()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='elspeth-chromium-')}"]:
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


def _full_page_screenshot(browser: Any, path: Path) -> None:
    """The whole scrollable page (CDP), not just the window."""
    import base64

    metrics = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def test_a_person_finds_why_a_row_failed_in_the_real_ui(server: Server, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.read.lineage import row_view
    from airflow_elspeth.audit.read.runs import audit_runs, pick_audit_run
    from airflow_elspeth.plugins.series import coalesce_page_overview
    from airflow_elspeth.sensors.coalesce import CoalesceAuditLink

    artifacts = artifacts_dir("ui")
    wait = WebDriverWait(browser, 60)
    run_path = f"/dags/{DAG_ID}/runs/{quote(server.run_id, safe='')}"

    # What the audit store says, to compare the page with.
    engine = engine_for_url(f"sqlite:///{server.home / 'elspeth_audit.db'}", upgrade=False)
    runs = audit_runs(engine, DAG_ID, server.run_id)
    audit_run = pick_audit_run(runs, coalesce="consensus")
    assert audit_run is not None
    overview = coalesce_page_overview(engine, audit_run, "consensus")
    matrix = overview.missing_matrix
    assert overview.rows_failed >= 1, "the example run should have failed rows"

    # Not logged in: the audit page refuses.
    browser.get(server.base + "/elspeth" + run_path)
    assert "Not logged in" in browser.find_element(By.TAG_NAME, "body").text

    _log_in(server, browser, wait)

    # The DAG run page, then its "Audit" tab.
    browser.get(server.base + run_path)
    tab = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "a[href$='plugin/elspeth-audit']")))
    assert tab.text.strip() == TAB
    tab.click()
    frame = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, FRAME)))
    browser.switch_to.frame(frame)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table.matrix")))

    # The missing-branches matrix: every branch x reason cell, as the audit store counts it.
    table = browser.find_element(By.CSS_SELECTOR, "table.matrix")
    headers = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert headers == ["Branch", *matrix.reasons, "Rows missing"]
    body_rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [r.find_element(By.TAG_NAME, "th").text.strip() for r in body_rows] == matrix.branches
    for row, branch in zip(body_rows, matrix.branches, strict=True):
        cells = row.find_elements(By.TAG_NAME, "td")
        for cell, reason in zip(cells, matrix.reasons, strict=False):
            expected = matrix.cells[branch].get(reason)
            shown = cell.text.split("\n")[0].strip()
            assert shown == (f"{expected.rows:,}" if expected else "·"), (branch, reason, cell.text)
        assert cells[-1].text.strip() == f"{matrix.branch_totals[branch]:,}"
    assert "claude" in matrix.branches and "error:RateLimitError" in matrix.reasons
    browser.switch_to.default_content()
    browser.save_screenshot(str(artifacts / "elspeth-audit-tab.png"))

    # A failed row: click it in the tab, and read its lineage and why it failed.
    browser.switch_to.frame(browser.find_element(By.CSS_SELECTOR, FRAME))
    first_failed = browser.find_element(By.CSS_SELECTOR, "#rows table tbody tr a.rowkey")
    key = first_failed.text.strip()
    first_failed.click()
    wait.until(ec.presence_of_element_located((By.ID, "row-title")))
    text = browser.find_element(By.TAG_NAME, "body").text
    assert f"Row {key}" in text and "failed" in text
    assert "Event log, replayed" in text
    assert "Replaying this event log under the coalesce's policy gives the recorded decision." in text
    assert "Source row" in text and "Fork fork" in text and "Branches" in text
    lineage = row_view(engine, audit_run, key)
    decision = lineage.decisions[0]
    assert decision.decision == "failed"
    assert decision.explanation is not None and decision.explanation in text
    for branch in lineage.branches:
        for state in branch["states"]:
            assert state["node_id"] in text
            if state["error"]:
                assert state["error"]["message"] in text
    browser.switch_to.default_content()
    browser.save_screenshot(str(artifacts / "elspeth-row-lineage-tab.png"))

    # The task instance tab of the coalesce shows that coalesce's part, not the whole run page.
    browser.get(server.base + run_path + "/tasks/consensus")
    task_tab = wait.until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "a[href$='plugin/elspeth-audit-task']"))
    )
    assert task_tab.text.strip() == TAB
    task_tab.click()
    _in_frame(browser, wait, "coalesce-title")
    assert " ".join(browser.find_element(By.ID, "coalesce-title").text.split()).startswith(
        "Coalesce consensus"
    )
    assert not browser.find_elements(By.ID, "audit-run")
    assert "success" in browser.find_element(By.ID, "coalesce-task-state").text  # Airflow's state
    browser.switch_to.default_content()

    # The extra link lands inside the Airflow UI, on that coalesce's tab.
    link = CoalesceAuditLink().get_link(
        SimpleNamespace(task_id="consensus"),
        ti_key=SimpleNamespace(dag_id=DAG_ID, run_id=server.run_id, map_index=-1),
    )
    browser.get(server.base + link)
    _in_frame(browser, wait, "coalesce-title")
    assert "consensus" in browser.find_element(By.ID, "coalesce-title").text
    browser.switch_to.default_content()

    # Whole pages, outside the tab, for a person to look at.
    browser.get(server.base + "/elspeth" + run_path + "?coalesce=consensus")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table.matrix")))
    _full_page_screenshot(browser, artifacts / "elspeth-run-page.png")
    browser.get(server.base + "/elspeth" + run_path + "/lineage?key=" + quote(key))
    wait.until(ec.presence_of_element_located((By.ID, "row-title")))
    _full_page_screenshot(browser, artifacts / "elspeth-row-page.png")
    print(f"\nscreenshots in {artifacts}", file=sys.stderr)


TAB = "Fork/join audit"
FRAME = f"iframe[title='{TAB}']"


def _in_frame(browser: Any, wait: Any, element_id: str) -> None:
    """Into the plugin's frame, once it shows ``element_id``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    browser.switch_to.default_content()
    frame = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, FRAME)))
    browser.switch_to.frame(frame)
    wait.until(ec.presence_of_element_located((By.ID, element_id)))


def _luminance(css_colour: str) -> float:
    """Relative luminance (0 black .. 1 white) of ``rgb(...)`` / ``rgba(...)``."""
    parts = [float(x) for x in css_colour[css_colour.index("(") + 1 : -1].split(",")[:3]]
    r, g, b = (c / 255 for c in parts)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _colours(browser: Any) -> dict[str, float]:
    """Luminance of the framed page's background, a card's background and the text."""
    script = """
        const style = (el) => getComputedStyle(el);
        const card = document.querySelector('.card');
        return [style(document.documentElement).backgroundColor, style(card).backgroundColor,
                style(document.body).color];
    """
    page, card, text = browser.execute_script(script)
    return {"page": _luminance(page), "card": _luminance(card), "text": _luminance(text)}


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_the_tabs_follow_airflows_theme(server: Server, browser: Any, theme: str) -> None:
    """Airflow's theme (next-themes: localStorage ``theme``, ``color-scheme`` on its <html>) reaches
    the plugin's frame: the index (Browse menu entry) and the coalesce's task tab, light and dark."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.read.index import audit_index

    artifacts = artifacts_dir("ui")
    wait = WebDriverWait(browser, 60)
    _log_in(server, browser, wait)
    browser.execute_script("localStorage.setItem('theme', arguments[0])", theme)

    # The Browse menu's entry: Airflow's nav route for it frames the index.
    browser.get(server.base + "/plugin/fork-join-audit")
    wait.until(lambda b: theme in (b.find_element(By.TAG_NAME, "html").get_attribute("class") or ""))
    _in_frame(browser, wait, "index")
    engine = engine_for_url(f"sqlite:///{server.home / 'elspeth_audit.db'}", upgrade=False)
    expected = audit_index(engine, None)[0].outcomes[0]
    rows = browser.find_elements(By.CSS_SELECTOR, "#index tbody tr")
    cells = [c.text.strip() for c in rows[0].find_elements(By.TAG_NAME, "td")]
    assert cells[0].startswith("rows failed" if expected.failed else "all merged"), cells
    assert cells[3].startswith("consensus"), cells
    numbers = [f"{n:,}" for n in (expected.rows, expected.merged, expected.failed)]
    assert cells[4:7] == numbers, (cells, expected)
    # Why rows failed: each failure reason beside its row count (at most three shown).
    why = [word for reason, n in list(expected.failure_reasons.items())[:3] for word in (reason, f"{n:,}")]
    assert cells[7].split()[: len(why)] == why and bool(why) == bool(expected.failed), (cells, expected)
    assert cells[8] == f"{expected.undecided:,}", (cells, expected)
    assert cells[9] == "success", cells  # the coalesce's Airflow task state, read by the API server
    index_colours = _colours(browser)
    browser.switch_to.default_content()
    browser.save_screenshot(str(artifacts / f"index-{theme}.png"))

    run_path = f"/dags/{DAG_ID}/runs/{quote(server.run_id, safe='')}"
    browser.get(server.base + run_path + "/tasks/consensus/plugin/elspeth-audit-task")
    _in_frame(browser, wait, "matrix-title")
    coalesce_colours = _colours(browser)
    browser.switch_to.default_content()
    browser.save_screenshot(str(artifacts / f"coalesce-{theme}.png"))

    for where, found in (("index", index_colours), ("coalesce tab", coalesce_colours)):
        if theme == "dark":
            assert found["page"] < 0.15 and found["card"] < 0.15, (where, found)
            assert found["text"] > 0.6, (where, found)
        else:
            assert found["page"] > 0.85 and found["card"] > 0.85, (where, found)
            assert found["text"] < 0.3, (where, found)


def _log_in(server: Server, browser: Any, wait: Any) -> None:
    """Through the SimpleAuthManager's form, as a person does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    browser.get(server.base + "/auth/login")
    wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys(USER)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda b: b.get_cookie("_token") is not None)


def _frame_address(browser: Any) -> str:
    """Path, query and fragment of the page shown in the current frame."""
    address: str = browser.execute_script("return location.pathname + location.search + location.hash")
    return address


def test_the_tabs_address_follows_the_page_it_shows(server: Server, browser: Any) -> None:
    """Inside a DAG run's or task instance's tab, Airflow's address follows the page shown, so a
    row's lineage can be bookmarked: reopening the address opens that page in the tab. Row keys in
    the tables stay on one line, and a branch step that lost nothing shows no warning."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    _log_in(server, browser, wait)
    browser.set_window_size(1000, 1200)  # narrow: the rows table has no room to spare
    run_path = f"/dags/{DAG_ID}/runs/{quote(server.run_id, safe='')}"
    run_tab = server.base + run_path + "/plugin/elspeth-audit"

    browser.get(run_tab)
    _in_frame(browser, wait, "rows-title")
    keys = browser.execute_script(
        """return [...document.querySelectorAll('#rows table a.rowkey')].map(a => ({
             height: a.getBoundingClientRect().height, line: parseFloat(getComputedStyle(a).lineHeight),
             title: a.title, text: a.textContent}));"""
    )
    assert keys, "the failed rows table lists row keys"
    for key in keys:
        assert key["height"] <= key["line"] + 1, key  # one line, never wrapped
        assert key["title"] == key["text"], key  # the whole key, even when cut
    entry = _frame_address(browser)
    browser.switch_to.default_content()
    assert browser.current_url == run_tab  # the tab's first page: the address is left alone

    # A failed row, clicked in the tab: the address names it.
    browser.switch_to.frame(browser.find_element(By.CSS_SELECTOR, FRAME))
    first = browser.find_element(By.CSS_SELECTOR, "#rows table a.rowkey")
    key = first.text.strip()
    first.click()
    wait.until(ec.presence_of_element_located((By.ID, "row-title")))
    row_address = _frame_address(browser)
    assert "/lineage?key=" in row_address
    browser.switch_to.default_content()
    wait.until(lambda b: b.current_url == run_tab + row_address)

    # Reopened (a bookmark, a shared link): the tab opens on that row.
    browser.get(run_tab + row_address)
    _in_frame(browser, wait, "row-title")
    assert _frame_address(browser) == row_address
    assert key in browser.find_element(By.ID, "row-title").text
    # Back to the run from the breadcrumb: the address is the tab's own again.
    browser.find_element(By.CSS_SELECTOR, "nav.crumbs a[href$='" + run_path.rsplit("/", 1)[1] + "']").click()
    wait.until(ec.presence_of_element_located((By.ID, "rows-title")))
    assert _frame_address(browser) == entry
    browser.switch_to.default_content()
    wait.until(lambda b: b.current_url == run_tab)

    # An address naming a page outside the tab's DAG run is not followed.
    browser.get(run_tab + f"/elspeth/dags/{DAG_ID}/runs/other_run/lineage?key={quote(key)}")
    _in_frame(browser, wait, "rows-title")
    assert _frame_address(browser) == entry
    browser.switch_to.default_content()
    wait.until(lambda b: b.current_url == run_tab)

    # A branch step's tab: its ended task lost nothing, so no warning; a failed row's lineage from it
    # is addressable too.
    task_tab = server.base + run_path + "/tasks/ask_claude/plugin/elspeth-audit-task"
    browser.get(task_tab)
    _in_frame(browser, wait, "errors-title")
    assert not browser.find_elements(By.ID, "task-ends-title")
    assert not browser.find_elements(By.CSS_SELECTOR, ".notice")
    browser.find_element(By.CSS_SELECTOR, "#errors-title ~ .table-wrap a.rowkey").click()
    wait.until(ec.presence_of_element_located((By.ID, "row-title")))
    failed_address = _frame_address(browser)
    browser.switch_to.default_content()
    wait.until(lambda b: b.current_url == task_tab + failed_address)
    browser.get(task_tab + failed_address)
    _in_frame(browser, wait, "row-title")
    assert _frame_address(browser) == failed_address


@pytest.mark.parametrize(
    ("stored", "system", "expected"),
    [("light", "dark", "light"), ("dark", "light", "dark"), ("system", "dark", "dark")],
)
def test_pages_opened_on_their_own_follow_airflows_theme(
    server: Server, browser: Any, stored: str, system: str, expected: str
) -> None:
    """An /elspeth page opened directly (not in Airflow's tab) takes the theme the user chose in
    Airflow (localStorage ``theme``); "system" leaves it to prefers-color-scheme. The row page, the
    run page, a branch step's page and an error page, each in a screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.read.decisions import RowFilter, decision_rows
    from airflow_elspeth.audit.read.runs import audit_runs, pick_audit_run

    artifacts = artifacts_dir("ui")
    wait = WebDriverWait(browser, 60)
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": system}]}
    )
    _log_in(server, browser, wait)
    browser.execute_script("localStorage.setItem('theme', arguments[0])", stored)
    engine = engine_for_url(f"sqlite:///{server.home / 'elspeth_audit.db'}", upgrade=False)
    audit_run = pick_audit_run(audit_runs(engine, DAG_ID, server.run_id), coalesce="consensus")
    assert audit_run is not None
    failed = decision_rows(engine, audit_run.audit_run_id, "consensus", RowFilter(decision="failed"), limit=1)
    key = failed.rows[0].row_key

    app_path = f"/elspeth/dags/{DAG_ID}/runs/{quote(server.run_id, safe='')}"
    pages = {
        "row": (app_path + "/lineage?key=" + quote(key), "row-title"),
        "run": (app_path + "?coalesce=consensus", "rows-title"),
        "branch-step": (app_path + "/tasks/ask_claude", "errors-title"),
        "error": (app_path + "/lineage?key=no-such-row", None),
    }
    for name, (path, landmark) in pages.items():
        browser.get(server.base + path)
        if landmark:
            wait.until(ec.presence_of_element_located((By.ID, landmark)))
        else:
            assert "Not found" in browser.find_element(By.TAG_NAME, "body").text
        found = _colours(browser)
        _full_page_screenshot(browser, artifacts / f"direct-{name}-{stored}-{expected}.png")
        if expected == "dark":
            assert found["page"] < 0.15 and found["card"] < 0.15 and found["text"] > 0.6, (name, found)
        else:
            assert found["page"] > 0.85 and found["card"] > 0.85 and found["text"] < 0.3, (name, found)
    if stored != "system":
        # The branch step's tab inside Airflow, in the same theme.
        browser.get(
            server.base + f"/dags/{DAG_ID}/runs/{quote(server.run_id, safe='')}"
            "/tasks/ask_claude/plugin/elspeth-audit-task"
        )
        _in_frame(browser, wait, "errors-title")
        in_tab = _colours(browser)
        browser.switch_to.default_content()
        browser.save_screenshot(str(artifacts / f"branch-step-tab-{expected}.png"))
        assert (in_tab["page"] < 0.15) == (expected == "dark"), in_tab


# Every element of the index table whose content is wider than its box, or that reaches past the
# viewport (inline elements have no box of their own: their cell is measured).
OVERFLOWING = """
    const out = [];
    const wrap = document.querySelector('.table-wrap');
    if (wrap.scrollWidth > wrap.clientWidth) out.push(['table', wrap.scrollWidth, wrap.clientWidth]);
    const page = document.documentElement;
    if (page.scrollWidth > page.clientWidth) out.push(['page', page.scrollWidth, page.clientWidth]);
    for (const el of document.querySelectorAll('#index th, #index td, #index td *')) {
        if (getComputedStyle(el).display === 'inline') continue;
        const right = el.getBoundingClientRect().right;
        if (el.scrollWidth > el.clientWidth || right > page.clientWidth) {
            out.push([el.tagName, el.className, el.scrollWidth, el.clientWidth, right,
                      el.textContent.trim().slice(0, 60)]);
        }
    }
    return out;
"""


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_the_index_fits_1280_px_without_clipping(server: Server, browser: Any, theme: str) -> None:
    """At 1280 px the index shows every column whole, in both themes: long DAG run ids, timestamps,
    failure-reason chips and a fork failure's reason wrap in their cell; nothing scrolls sideways."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from airflow_elspeth.audit.engine import engine_for_url
    from airflow_elspeth.audit.read.runs import RunSelection, select_runs

    from .audit_data import failed_fork

    engine = engine_for_url(f"sqlite:///{server.home / 'elspeth_audit.db'}", upgrade=False)
    long_run = "backfill__2019-11-03T10:22:33.123456+00:00_" + "a_rather_long_run_identifier" * 2
    if not select_runs(engine, RunSelection(dag_id=DAG_ID, airflow_run_id=long_run)):
        # Older than the example DAG's run: the other tests' first index row stays that run.
        failed_fork(
            engine,
            dag_id=DAG_ID,
            airflow_run_id=long_run,
            logical_date=datetime(2019, 11, 3, tzinfo=timezone.utc),
            reason="the fork task ended failed: OperationalError: connection to server at "
            "audit-db.internal.example port 5432 failed: timeout expired after 30 s",
        )
    artifacts = artifacts_dir("ui")
    wait = WebDriverWait(browser, 60)
    _log_in(server, browser, wait)
    browser.execute_script("localStorage.setItem('theme', arguments[0])", theme)
    browser.set_window_size(1280, 1000)
    assert browser.execute_script("return window.innerWidth") == 1280
    browser.get(server.base + "/elspeth/")
    wait.until(ec.presence_of_element_located((By.ID, "index")))
    _full_page_screenshot(browser, artifacts / f"index-1280-{theme}.png")
    colours = _colours(browser)
    assert (colours["page"] < 0.15) == (theme == "dark"), colours
    verdicts = [
        r.get_attribute("data-verdict") for r in browser.find_elements(By.CSS_SELECTOR, "#index tbody tr")
    ]
    assert "fork_failed" in verdicts and len(verdicts) > 1, verdicts
    why = browser.find_element(By.CSS_SELECTOR, "#index tr[data-verdict='fork_failed'] td.why-failed").text
    assert why.startswith("fork failed: the fork task ended failed"), why
    assert browser.execute_script(OVERFLOWING) == []
