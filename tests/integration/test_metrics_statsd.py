"""The provider's metrics reach a StatsD server as Airflow sends its own: a real DAG under
``dag.test()``, in a process of its own configured only through ``AIRFLOW__METRICS__*`` (Airflow
initialises its metrics from the configuration once per process), sending to a UDP socket on
loopback that this test owns. The translation itself: tests/unit/test_metrics.py; the deferred
coalesce's trigger in a real triggerer: tests/e2e/test_e2e_metrics.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from airflow_elspeth.audit.engine import engine_for_url

from .support import run_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TESTS_DIR = Path(__file__).resolve().parents[1]
ROOT = TESTS_DIR.parent
# require_all over branches a, b and c of rows r0..r5; a's callable raises on r1 and r4 (tolerated).
DAG_ID = "elspeth_it_require_all_row_errors"
RUN_DAG = f"""
from integration.support import dag_module

module = dag_module()
dag_run = module.build_dag(module.SCENARIOS[{DAG_ID!r}]).test()
print("STATE", dag_run.state)
"""
PACKET_WAIT_SECONDS = 30.0


@pytest.fixture
def statsd_socket() -> Iterator[socket.socket]:
    """A UDP socket on a free loopback port: the StatsD server Airflow is pointed at."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def statsd_env(port: int) -> dict[str, str]:
    """Airflow's StatsD settings: tags in the InfluxDB form (``name,tag=value:1|c``)."""
    return {
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(port),
        "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True",
    }


def parse(packet: str) -> tuple[str, dict[str, str], float, str]:
    """One StatsD line ``name[,tag=value...]:value|type`` -> (name, tags, value, type)."""
    head, _, rest = packet.rpartition(":")
    value, _, kind = rest.partition("|")
    name, *tags = head.split(",")
    return name, dict(tag.split("=", 1) for tag in tags), float(value), kind


def elspeth_metrics(sock: socket.socket, until: set[str]) -> list[tuple[str, dict[str, str], float, str]]:
    """The ``airflow.elspeth.*`` metrics received, read until every name in ``until`` has come
    (the sender has finished: what it sent is in the socket's buffer, or lost)."""
    sock.settimeout(PACKET_WAIT_SECONDS)
    found: list[tuple[str, dict[str, str], float, str]] = []
    while not until <= {name for name, *_ in found}:
        try:
            datagram = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"no StatsD packet for {sorted(until - {n for n, *_ in found})}; got {found}")
        for line in datagram.decode().splitlines():
            if line.startswith("airflow.elspeth."):
                found.append(parse(line))
    sock.settimeout(0)  # and whatever else is already there
    while True:
        try:
            datagram = sock.recv(65536)
        except BlockingIOError:
            return found
        found.extend(
            parse(line) for line in datagram.decode().splitlines() if line.startswith("airflow.elspeth.")
        )


def totals(found: list[tuple[str, dict[str, str], float, str]], kind: str) -> dict[tuple[str, str], float]:
    """Summed values of one metric type per (name, task_id or reason)."""
    summed: dict[tuple[str, str], float] = {}
    for name, tags, value, metric_kind in found:
        if metric_kind == kind:
            key = (name.removeprefix("airflow.elspeth."), tags.get("reason") or tags["task_id"])
            summed[key] = summed.get(key, 0) + value
    return summed


# One backend: what is sent does not depend on the audit store's (tests/unit/test_metrics.py runs
# the passes themselves).
def test_a_dag_run_sends_its_decisions_losses_and_rows_to_statsd(
    airflow_metadata: str, sqlite_url: str, statsd_socket: socket.socket
) -> None:
    env = {
        **os.environ,
        **run_env(DAG_ID, sqlite_url),
        **statsd_env(statsd_socket.getsockname()[1]),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS_DIR)]),
    }
    done = subprocess.run(
        [sys.executable, "-c", RUN_DAG], env=env, capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert "STATE success" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]

    found = elspeth_metrics(
        statsd_socket,
        until={
            "airflow.elspeth.fork.rows",
            "airflow.elspeth.branch.rows_completed",
            "airflow.elspeth.branch.rows_lost",
            "airflow.elspeth.coalesce.rows_merged",
            "airflow.elspeth.coalesce.rows_failed",
            "airflow.elspeth.coalesce.decision_latency",
            "airflow.elspeth.coalesce.rows_undecided",
        },
    )
    counted = totals(found, "c")
    # Late arrivals (b and c answering r1 or r4 after a's loss failed it) and skips (b and c reaching
    # a row already decided) depend on the order dag.test() runs the branches in: the late ones
    # counted, by the pass that recorded them or the branch that wrote them, are the stored ones.
    with engine_for_url(sqlite_url).connect() as conn:
        stored_late = conn.execute(
            text("SELECT count(*) FROM token_outcomes WHERE outcome = 'late' AND is_terminal")
        ).scalar_one()
    late = counted.pop(("coalesce.late_arrivals", "coalesce"), 0)
    late += sum(counted.pop(("branch.rows_late", step), 0) for step in ("ask_a", "ask_b", "ask_c"))
    assert late == stored_late
    for step in ("ask_b", "ask_c"):
        done_rows = counted.pop(("branch.rows_completed", step)) + counted.pop(
            ("branch.rows_skipped", step), 0
        )
        assert done_rows == 6, step
    assert counted == {
        ("fork.rows", "fork"): 6,
        ("branch.rows_completed", "ask_a"): 4,
        ("branch.rows_lost", "error_ValueError"): 2,
        ("coalesce.rows_merged", "coalesce"): 4,
        ("coalesce.rows_failed", "branch_lost"): 2,
    }
    coalesce_tags = {"dag_id": DAG_ID, "task_id": "coalesce", "policy": "require_all"}
    for name, tags, _, _ in found:
        if name.startswith("airflow.elspeth.coalesce."):
            assert {k: v for k, v in tags.items() if k != "reason"} == coalesce_tags, (name, tags)
    # one latency per decided row (each had arrivals); the last pass (the finalizer's) left none open
    assert [kind for name, _, _, kind in found if name.endswith("decision_latency")] == ["ms"] * 6
    undecided = [value for name, _, value, _ in found if name.endswith("rows_undecided")]
    assert undecided[-1] == 0
