"""A per-process cache of whole-run aggregates, keyed by a fingerprint of the run's progress.

Whole-run aggregates (the missing-branch matrix, the counts, the arrival curves) need one scan of
the run; they are computed once and cached under a fingerprint (decision counts and the writers'
``chunk_progress``) that changes whenever something new is written, with a TTL as a safety net.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine, func, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.model import CoalesceSpec, run_number
from airflow_elspeth.audit.read.runs import coalesce_spec

CACHE_SIZE = 64
CACHE_TTL_S = 300.0

T = TypeVar("T")


class _Cache:
    """A small LRU of aggregates keyed by (what, store, run, node, fingerprint), with a TTL as a
    safety net should a writer ever change data without moving the fingerprint."""

    def __init__(self, size: int = CACHE_SIZE, ttl: float = CACHE_TTL_S) -> None:
        self._data: OrderedDict[tuple[Any, ...], tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.size, self.ttl = size, ttl

    def get_or_compute(self, key: tuple[Any, ...], compute: Callable[[], T]) -> T:
        now = time.monotonic()
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                self._data.move_to_end(key)
                return hit[1]  # type: ignore[no-any-return]
        value = compute()
        with self._lock:
            self._data[key] = (now, value)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_cache = _Cache()


def clear_cache() -> None:
    _cache.clear()


def _store_key(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _fingerprint(engine: Engine, run_id: str, spec: CoalesceSpec) -> tuple[Any, ...]:
    """Cheap reads that change whenever the coalesce decides rows or a branch delivers more."""
    cd, cp = t.decisions.c, t.chunk_progress.c
    nodes = [spec.node_id, *spec.delivering.values()]
    with engine.connect() as conn:
        decided = tuple(
            conn.execute(
                select(cd.decision, cd.failure_reason, func.count())
                .where(cd.run_no == run_number(conn, run_id), cd.node_id == spec.node_id)
                .group_by(cd.decision, cd.failure_reason)
                .order_by(cd.decision, cd.failure_reason)
            ).all()
        )
        progress = tuple(
            conn.execute(
                select(cp.node_id, func.sum(cp.rows_done), func.max(cp.updated_at), func.count())
                .where(cp.run_id == run_id, cp.node_id.in_(nodes))
                .group_by(cp.node_id)
                .order_by(cp.node_id)
            ).all()
        )
    return decided, progress


def run_reads(engine: Engine, *calls: Callable[[], Any]) -> list[Any]:
    """Run independent read queries, side by side on a server database (each on its own pooled
    connection), one after the other on SQLite: its connections each keep their own page cache, and
    in-process threads contend for it."""
    if len(calls) == 1 or engine.dialect.name != "postgresql":
        return [call() for call in calls]
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="elspeth-report") as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


@dataclass(frozen=True)
class CoalesceRef:
    """One coalesce of one audit run, with its spec and cache key looked up once per request."""

    engine: Engine
    run_id: str
    node_id: str
    spec: CoalesceSpec
    key: tuple[Any, ...]

    def cached(self, what: str, compute: Callable[[], T]) -> T:
        return _cache.get_or_compute((what, *self.key), compute)


def coalesce_ref(engine: Engine, run_id: str, node_id: str) -> CoalesceRef:
    """:raises NotFound: ``node_id`` is not a coalesce of the audit run."""
    spec = coalesce_spec(engine, run_id, node_id)
    key = (_store_key(engine), run_id, node_id, _fingerprint(engine, run_id, spec))
    return CoalesceRef(engine, run_id, node_id, spec, key)
