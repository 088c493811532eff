"""Test DAGs of tests/integration/test_branch_robustness.py: branch tasks that end abnormally.

Every DAG is ``load >> fork >> branches >> coalesce`` over six rows ``r0..r5``. ``ask_b`` is the
branch under test: it hangs past ``execution_timeout``, calls ``sys.exit``, receives SIGTERM,
raises exceptions that cannot be printed, or answers outputs over ``[elspeth] max_row_bytes`` (one
of shared references expanding to 2**50 values), on chosen rows. The unjoined DAG has a third branch
``c`` (two steps, the last one mapped over the fork's chunks) that no coalesce joins.

As in elspeth_it_dags.py, ``dag.test()`` re-parses this folder before each run, and only the DAGs
named in ``ELSPETH_IT_DAGS`` are built then; imported by the tests (variable unset), every DAG is.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, task
from integration.support import integration_dag, selected

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

ROW_COUNT = 6
HANG_LIMIT_SECONDS = 60.0  # a hung callable gives up after this, so no thread waits forever
EXECUTION_TIMEOUT = timedelta(seconds=3)
SLOW_FLUSH = 60.0  # finished rows are not written on time: only the flush at the task's end writes them

UNJOINED = "elspeth_bf_unjoined"
TIMEOUT = "elspeth_bf_timeout"
SYS_EXIT = "elspeth_bf_sys_exit"
SIGTERM = "elspeth_bf_sigterm"
UNPRINTABLE = "elspeth_bf_unprintable"
OVERSIZE = "elspeth_bf_oversize"
OVERSIZE_LIMIT = 4096  # the [elspeth] max_row_bytes its test sets

# A hanging callable sets HUNG when it starts waiting and RETURNED when it stops; RELEASE ends it.
HUNG = threading.Event()
RETURNED = threading.Event()
RELEASE = threading.Event()
CALLS: list[tuple[str, str, str]] = []  # (dag_id, task_id, row id)
_calls_lock = threading.Lock()


def reset() -> None:
    """Before a test: no hang in progress, no calls recorded."""
    release()
    for event in (HUNG, RETURNED, RELEASE):
        event.clear()
    with _calls_lock:
        CALLS.clear()


def release() -> bool:
    """After a test: end the hung callable; True once it returned (or none hung)."""
    RELEASE.set()
    return RETURNED.wait(10) if HUNG.is_set() else True


class UnprintableError(Exception):
    """str() raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ of UnprintableError raised")


class UnrenderableError(Exception):
    """str() and repr() raise."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ of UnrenderableError raised")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ of UnrenderableError raised")


def _hang(row: dict[str, Any]) -> dict[str, Any]:
    HUNG.set()
    try:
        RELEASE.wait(HANG_LIMIT_SECONDS)
    finally:
        RETURNED.set()
    return {"id": row["id"], "hung": True}


def _sigterm(row: dict[str, Any]) -> dict[str, Any]:
    """SIGTERM to this process, as the supervisor sends it, then hang.

    Only with the task runner's own handler installed (dag.test() runs tasks in the test process):
    never kill the test process itself.
    """
    handler = signal.getsignal(signal.SIGTERM)
    if not callable(handler) or "_on_term" not in getattr(handler, "__qualname__", ""):
        raise RuntimeError(f"the task runner's SIGTERM handler is not installed ({handler!r})")
    os.kill(os.getpid(), signal.SIGTERM)
    return _hang(row)


def _sys_exit(row: dict[str, Any]) -> dict[str, Any]:
    sys.exit(3)


def _unprintable(row: dict[str, Any]) -> dict[str, Any]:
    raise UnprintableError(f"cannot answer {row['id']}")


def _unrenderable(row: dict[str, Any]) -> dict[str, Any]:
    raise UnrenderableError(f"cannot answer {row['id']}")


def _shared_references(row: dict[str, Any]) -> dict[str, Any]:
    """``x = [1]``, then ``x = [x, x]`` 50 times: an output of 51 lists that expands to 2**50 leaves."""
    tree: Any = [1]
    for _ in range(50):
        tree = [tree, tree]
    return {"id": row["id"], "tree": tree}


def _oversize(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "text": "x" * OVERSIZE_LIMIT}


def _drop(row: dict[str, Any]) -> None:
    return None


def _error(row: dict[str, Any]) -> dict[str, Any]:
    raise ValueError(f"cannot answer {row['id']}")


Action = Callable[[dict[str, Any]], "dict[str, Any] | None"]


class Call:
    """A branch step's callable: ``actions[n]`` on row ``rn``, else a deterministic answer."""

    def __init__(self, dag_id: str, task_id: str, actions: Mapping[int, Action] | None = None) -> None:
        self.dag_id = dag_id
        self.task_id = task_id
        self.actions = dict(actions or {})
        self.__qualname__ = f"Call[{dag_id}.{task_id}]"

    def __call__(self, row: dict[str, Any]) -> dict[str, Any] | None:
        with _calls_lock:
            CALLS.append((self.dag_id, self.task_id, str(row["id"])))
        action = self.actions.get(int(row["n"]))
        if action is not None:
            return action(row)
        return {"id": row["id"], "n": row["n"], f"{self.task_id}_value": int(row["n"]) * 10}


# dag_id -> (options of ask_b, ask_b's actions by row number)
B_FAULTS: dict[str, tuple[Mapping[str, Any], Mapping[int, Action]]] = {
    TIMEOUT: ({"execution_timeout": EXECUTION_TIMEOUT, "flush_seconds": SLOW_FLUSH}, {3: _hang}),
    SYS_EXIT: ({"flush_seconds": SLOW_FLUSH}, {3: _sys_exit}),
    SIGTERM: ({"flush_seconds": SLOW_FLUSH}, {3: _sigterm}),
    UNPRINTABLE: ({}, {1: _unprintable, 4: _unrenderable}),
    OVERSIZE: ({"row_retries": 1}, {1: _shared_references, 4: _oversize}),
}
DAG_IDS = (UNJOINED, *B_FAULTS)


@task
def load(count: int) -> list[dict[str, Any]]:
    return [{"id": f"r{n}", "n": n} for n in range(count)]


def build_unjoined() -> DAG:
    """Branches a, b, c; the coalesce joins a and b only. c is ``prep_c >> ask_c`` (ask_c mapped
    over the fork's chunks): prep_c drops r4; ask_c drops r1 and fails r2."""
    with integration_dag(UNJOINED) as dag:
        fork = ForkOperator(
            task_id="fork", rows=load(ROW_COUNT), row_key="id", branches=["a", "b", "c"], chunk_size=4
        )
        steps = [
            BranchOperator(
                task_id=f"ask_{b}", fork=fork, branch=b, python_callable=Call(UNJOINED, f"ask_{b}")
            )
            for b in ("a", "b")
        ]
        prep_c = BranchOperator(
            task_id="prep_c", fork=fork, branch="c", python_callable=Call(UNJOINED, "prep_c", {4: _drop})
        )
        ask_c = BranchOperator.partial(
            task_id="ask_c",
            fork=fork,
            branch="c",
            python_callable=Call(UNJOINED, "ask_c", {1: _drop, 2: _error}),
        ).expand(chunk=fork.chunks)
        fork >> steps
        fork >> prep_c >> ask_c
        coalesce = CoalesceSensor(
            task_id="coalesce",
            fork=fork,
            policy="require_all",
            branches=["a", "b"],
            timeout=timedelta(seconds=30),
            poke_interval=1,
        )
        steps >> coalesce
    return dag


def build_b_fault(dag_id: str) -> DAG:
    """Branches a and b under a best_effort coalesce; ask_b runs the scripted fault."""
    options, actions = B_FAULTS[dag_id]
    with integration_dag(dag_id) as dag:
        fork = ForkOperator(
            task_id="fork", rows=load(ROW_COUNT), row_key="id", branches=["a", "b"], chunk_size=4
        )
        ask_a = BranchOperator(task_id="ask_a", fork=fork, branch="a", python_callable=Call(dag_id, "ask_a"))
        ask_b = BranchOperator(
            task_id="ask_b",
            fork=fork,
            branch="b",
            python_callable=Call(dag_id, "ask_b", actions),
            **options,
        )
        coalesce = CoalesceSensor(
            task_id="coalesce",
            fork=fork,
            policy="best_effort",
            timeout=timedelta(seconds=30),
            poke_interval=1,
        )
        fork >> [ask_a, ask_b] >> coalesce
    return dag


def build(dag_id: str) -> DAG:
    return build_unjoined() if dag_id == UNJOINED else build_b_fault(dag_id)


for _dag_id in selected(DAG_IDS):
    globals()[_dag_id] = build(_dag_id)
