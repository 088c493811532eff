"""The coalesce service: everything a coalesce does with the audit store, behind one object.

The coalesce sensor (every waiting mode), its trigger and its finalizer reach the audit store only
through a :class:`CoalesceService` (``ElspethAuditHook.get_coalesce_service`` hands one out, as a
``DbApiHook`` hands out a connection) and this module's few other names (which errors of the store
are transient and for how long, the failure message of a summary): they read Airflow (XCom, task
states), call the service, and translate its answer back (XCom, a deferral, an exception). So
"register the coalesce, reopen what an earlier try's end resolved, run the pass" is written once,
here. It knows SQL and the core, not Airflow: task states come in as a plain ``{task key: state}``
mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from airflow_elspeth.audit.coalesce import (
    PassResult,
    WaitResult,
    coalesce_pass,
    supersede_resolutions,
    waiting_poll,
)
from airflow_elspeth.audit.dml import TRANSIENT_ERROR_GRACE, TRANSIENT_ERRORS
from airflow_elspeth.audit.model import CoalesceSpec
from airflow_elspeth.audit.read.decisions import coalesce_summary, failure_message
from airflow_elspeth.audit.read.runs import newest_completed_run
from airflow_elspeth.audit.store import AuditStore
from airflow_elspeth.core.vocabulary import NodeType

# What the coalesce's shells use of the audit layer, besides the service and the spec.
__all__ = [
    "TRANSIENT_ERRORS",
    "TRANSIENT_ERROR_GRACE",
    "CoalesceService",
    "CoalesceSpec",
    "Decided",
    "Finalized",
    "PassResult",
    "failure_message",
]


@dataclass(frozen=True)
class Decided:
    """One pass of :meth:`CoalesceService.decide`: what it found, and how many rows it reopened first."""

    result: PassResult
    reopened: int = 0


@dataclass(frozen=True)
class Finalized:
    """What :meth:`CoalesceService.finalize` did: its pass, and the summary after it (with
    ``coalesce_task_state`` and ``rows_resolved_by_finalizer``)."""

    summary: dict[str, Any]
    result: PassResult


class CoalesceService:
    """One coalesce's work on one audit store.

    :param engine: the audit store's engine.
    :param spec: the coalesce (its policy and the steps that deliver its branches).
    """

    def __init__(self, engine: Engine, spec: CoalesceSpec) -> None:
        self.engine = engine
        self.spec = spec
        self._store = AuditStore(engine)
        self._registered: set[str] = set()  # audit runs this service registered the coalesce in

    def _register(self, run_id: str) -> None:
        """Record the coalesce's configuration in the audit run (``verify`` and the UI replay by it)."""
        if run_id not in self._registered:
            self._store.register_node(run_id, self.spec.node_id, NodeType.COALESCE, None, self.spec.as_dict())
            self._registered.add(run_id)

    def decide(
        self, run_id: str, task_states: Mapping[str, str], *, reopen_before: datetime | None = None
    ) -> Decided:
        """Decide every row of the audit run that can be decided now (one coalesce pass).

        :param task_states: Airflow states of the delivering branch tasks (``get_task_states`` keys).
        :param reopen_before: the start of the coalesce try that asks: rows an earlier try's end
            resolved (``coalesce_task_<state>``) are reopened first and decided afresh (a person
            cleared the coalesce). None: reopen nothing (the trigger, deciding for its task's try).
        """
        self._register(run_id)
        reopened = 0
        if reopen_before is not None:
            reopened = supersede_resolutions(self._store, self.spec, run_id, before=reopen_before)
        return Decided(coalesce_pass(self._store, self.spec, run_id, task_states), reopened)

    def finalize(self, run_id: str, task_states: Mapping[str, str], ended_state: str) -> Finalized:
        """After the coalesce task ended for good (in ``ended_state``): decide what the policy can,
        close every other row (``coalesce_task_<ended_state>``); the pass and the summary, with
        ``coalesce_task_state`` and ``rows_resolved_by_finalizer``."""
        self._register(run_id)
        result = coalesce_pass(self._store, self.spec, run_id, task_states, ended_state=ended_state)
        summary = self.summary(run_id)
        summary["coalesce_task_state"] = ended_state
        summary["rows_resolved_by_finalizer"] = result.newly_decided
        return Finalized(summary, result)

    def poll(
        self, run_id: str, task_states: Mapping[str, str], undecidable: dict[int, str] | None = None
    ) -> WaitResult:
        """The waiting coalesce's poll: a read-only look (:func:`~airflow_elspeth.audit.coalesce.
        waiting_poll`), and the pass when that finds something to write, so decisions are written
        as soon as they can be made. ``reason`` says why to stop waiting (every row decided, the
        audit run gone); ``deadline`` and ``now`` are known once the fork has completed.

        :param undecidable: see :func:`~airflow_elspeth.audit.coalesce.waiting_poll`.
        """
        found = waiting_poll(self.engine, self.spec, run_id, task_states, undecidable)
        if not found.pass_writes:
            return found
        result = self.decide(run_id, task_states).result
        reason = "every row decided" if result.done else None
        return WaitResult(reason, result.deadline, result.now, pass_writes=True, passed=result)

    def summary(self, run_id: str) -> dict[str, Any]:
        """The coalesce summary of the audit run (docs/ARCHITECTURE.md, "The coalesce summary")."""
        return coalesce_summary(self.engine, self.spec, run_id)

    def newest_fork_run(self, dag_id: str, airflow_run_id: str, fork_task_id: str) -> str | None:
        """The fork's newest completed audit run in this DAG run (its current try's, once it succeeded)."""
        return newest_completed_run(self.engine, dag_id, airflow_run_id, fork_task_id)
