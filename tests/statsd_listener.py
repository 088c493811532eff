"""A StatsD server for the tests: a UDP socket on a free loopback port that Airflow is pointed at
(``[metrics] statsd_*`` through ``AIRFLOW__METRICS__*``), and a thread keeping the provider's
metrics it receives, in the order they came. Used by tests/integration/test_metrics_statsd.py and
the e2e deployments (tests/e2e/conftest.py)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import NamedTuple

PREFIX = "airflow"  # [metrics] statsd_prefix
OURS = f"{PREFIX}.elspeth."


class Metric(NamedTuple):
    """One StatsD line ``<prefix>.<name>[,tag=value...]:<value>|<kind>`` (tags in the InfluxDB form,
    ``statsd_influxdb_enabled``); ``name`` without ``airflow.elspeth.``."""

    name: str
    tags: dict[str, str]
    value: float
    kind: str  # c (counter), g (gauge), ms (timer)

    @classmethod
    def parse(cls, line: str) -> Metric:
        head, _, rest = line.rpartition(":")
        value, _, kind = rest.partition("|")
        name, *tags = head.split(",")
        return cls(name.removeprefix(OURS), dict(tag.split("=", 1) for tag in tags), float(value), kind)


class StatsdListener:
    """Receives StatsD datagrams on 127.0.0.1 until :meth:`close`; keeps the ``airflow.elspeth.*``
    metrics (:attr:`metrics`)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # a burst (a decision latency per row) must not overflow the socket buffer before it is read
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.metrics: list[Metric] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, name="statsd-listener", daemon=True)
        self._thread.start()

    def airflow_env(self, *, allow: str | None = None) -> dict[str, str]:
        """Airflow's settings that send its metrics here, tags included.

        :param allow: ``[metrics] metrics_allow_list`` (Airflow sends only the names it matches).
        """
        env = {
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(self.port),
            "AIRFLOW__METRICS__STATSD_PREFIX": PREFIX,
            "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True",
        }
        if allow is not None:
            env["AIRFLOW__METRICS__METRICS_ALLOW_LIST"] = allow
        return env

    def wait_for(self, what: str, done: Callable[[list[Metric]], bool], *, timeout: float) -> list[Metric]:
        """The metrics received, once ``done(metrics)`` holds; AssertionError naming ``what`` after
        ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: done(self.metrics), timeout):
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}; received {self.metrics}"
                )
            return list(self.metrics)

    def close(self) -> None:
        """Stop the thread (woken by a datagram of our own) and close the socket."""
        self._closed = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wake:
            wake.sendto(b"", ("127.0.0.1", self.port))
        self._thread.join(30)
        self._sock.close()

    def _receive(self) -> None:
        while not self._closed:
            datagram = self._sock.recv(65536)
            found = [Metric.parse(line) for line in datagram.decode().splitlines() if line.startswith(OURS)]
            if found:
                with self._changed:
                    self.metrics.extend(found)
                    self._changed.notify_all()
