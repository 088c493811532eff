"""The integration suite's test DAGs: one factory, many scenarios (no copy-pasted DAG files).

Every DAG is ``load >> fork >> branches >> coalesce >> publish`` over six rows ``r0..r5`` and the
branches ``a``, ``b``, ``c``, with deterministic simulated callables (no network, no randomness).
A scenario says what each branch does on which row (``error``, ``drop``, ``hang`` past the deadline,
crash on the first try), which branch task fails wholesale, which branches are two-step chains
(their delivering step runs after the one-step branches under ``dag.test()``), which are mapped
over the fork's chunks, and the coalesce's policy, merge and tolerance.

``dag.test()`` re-parses the DAG folder before each run; this module then builds only the DAGs
named in ``ELSPETH_IT_DAGS`` (comma-separated), so a run parses one DAG, not the whole suite.
Imported by the tests (environment variable unset), it builds every scenario, which also checks
that they all construct.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, task
from integration.support import DAG_MODULE_NAME, integration_dag, selected

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

BRANCHES = ("a", "b", "c")
ROW_COUNT = 6


def row_key(n: int) -> str:
    return f"r{n}"


def source_rows(count: int = ROW_COUNT) -> list[dict[str, Any]]:
    return [{"id": row_key(n), "n": n} for n in range(count)]


@dataclass(frozen=True)
class Spec:
    """One test DAG. ``actions`` maps branch -> {row number: action} at the branch's delivering step.

    Actions: ``error`` (ValueError: a per-row loss), ``drop`` (returns None), ``hang`` (sleeps past the
    deadline, then delivers), ``crash_first_try`` (SystemExit on the task's first try: the task dies
    half way), ``error_first_try`` (ValueError on the first try only), ``flaky_once`` (ValueError
    on the row's first call in a DAG run, then fine: a ``row_retries`` retry succeeds).
    """

    dag_id: str
    policy: str = "require_all"
    quorum: int | None = None
    merge: str = "union"
    select_branch: str | None = None
    timeout: float = 30.0
    actions: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    fail_task: str | None = None  # this branch errors on every row with max_failed_rows=0
    two_step: tuple[str, ...] = ()  # branches with a preparation step before the delivering one
    mapped: tuple[str, ...] = ()  # branches mapped over the fork's chunks
    mapped_fail_chunk: int | None = None  # the chunk whose mapped task fails (max_failed_rows=0)
    chunk_size: int = 4
    rows: int = ROW_COUNT
    coalesce_trigger_rule: str | None = None  # default: the sensor's own ("always")
    tolerated_failures: int = 0
    tolerated_failure_rate: float | None = None
    soft_fail: bool = False  # the coalesce ends skipped, not failed, beyond the tolerance
    retries: Mapping[str, int] = field(default_factory=dict)
    max_failed_rows: Mapping[str, int] = field(default_factory=dict)
    row_retries: Mapping[str, int] = field(default_factory=dict)
    prep_actions: Mapping[str, Mapping[int, str]] = field(default_factory=dict)  # at two-step preps
    batch_size: int = 500
    concurrency: Mapping[str, int] = field(default_factory=dict)
    bad_rows: str | None = None  # duplicate_key | not_a_dict | nan: the fork must fail
    nested: bool = False  # a second fork/coalesce over the merged rows
    # A second coalesce "coalesce_ab" on the same fork: CoalesceSensor arguments (incl. branches),
    # and the branches whose delivering step waits for it ("gated": they run once it has decided).
    second: Mapping[str, Any] | None = None
    gated: tuple[str, ...] = ()
    prep_fails: str | None = None  # this branch's preparation step fails wholesale
    deferrable: bool = False
    # The coalesce's first try dies (no retries): "before_pass" raises before it decides anything,
    # "mid_pass" after it wrote its first chunk of decisions. Its finalizer closes what is left.
    coalesce_fault: str | None = None

    @property
    def hang_seconds(self) -> float:
        return self.timeout + 0.5

    def delivering_task(self, branch: str) -> str:
        return f"ask_{branch}"

    def with_(self, **changes: Any) -> Spec:
        return replace(self, **changes)


# Calls made by the simulated callables in this process: (dag_id, task_id, row id, try number).
_FLAKY_SEEN: set[tuple[str, str, str, str]] = set()
CALLS: list[tuple[str, str, str, int | None]] = []
_calls_lock = threading.Lock()
# The exception each failed fork reported, by dag_id (its on_failure_callback records it).
FORK_ERRORS: dict[str, str] = {}


def _try_number() -> int | None:
    try:
        from airflow.sdk import get_current_context

        return int(get_current_context()["ti"].try_number)
    except Exception:  # outside a task context (e.g. a worker thread of a concurrent branch)
        return None


def _run_id() -> str:
    from airflow.sdk import get_current_context

    return str(get_current_context()["ti"].run_id)


class BranchCall:
    """The simulated external call of one branch step: deterministic output, scripted failures."""

    def __init__(self, spec: Spec, branch: str, task_id: str, *, delivering: bool) -> None:
        self.dag_id = spec.dag_id
        self.branch = branch
        self.task_id = task_id
        self.hang_seconds = spec.hang_seconds
        self.actions: Mapping[int, str] = (spec.actions if delivering else spec.prep_actions).get(branch, {})
        self.fail_all = delivering and spec.fail_task == branch
        self.fail_chunk_rows: set[int] = set()
        if delivering and branch in spec.mapped and spec.mapped_fail_chunk is not None:
            first = spec.mapped_fail_chunk * spec.chunk_size
            self.fail_chunk_rows = set(range(first, first + spec.chunk_size))
        self.delivering = delivering
        self.__qualname__ = f"BranchCall[{spec.dag_id}.{task_id}]"

    def __call__(self, row: dict[str, Any]) -> dict[str, Any] | None:
        n = int(row["n"])
        action = self.actions.get(n)
        try_number = _try_number()
        with _calls_lock:
            CALLS.append((self.dag_id, self.task_id, str(row["id"]), try_number))
        if action == "flaky_once":
            key = (self.dag_id, _run_id(), self.task_id, str(row["id"]))
            if key not in _FLAKY_SEEN:
                _FLAKY_SEEN.add(key)
                raise ValueError(f"{self.branch}: connection reset while answering {row['id']}")
        if not self.delivering:
            if self.fail_all:
                raise RuntimeError(f"{self.branch}: preparation service down for {row['id']}")
            if action == "drop":
                return None
            if action == "error":
                raise ValueError(f"{self.branch} cannot prepare {row['id']}")
            return {**row, "prepared_by": self.task_id}
        if self.fail_all or n in self.fail_chunk_rows:
            raise RuntimeError(f"{self.branch}: service unavailable for {row['id']}")
        if action == "error":
            raise ValueError(f"{self.branch} cannot answer {row['id']}")
        if action == "drop":
            return None
        if action == "hang":
            time.sleep(self.hang_seconds)
        if action == "crash_first_try" and try_number == 1:
            # The worker dies half way through the task (in-process under dag.test, so no os._exit:
            # SystemExit is what Airflow's task runner sees when a task process exits).
            raise SystemExit(f"{self.branch}: worker lost while processing {row['id']}")
        if action == "error_first_try" and try_number == 1:
            raise ValueError(f"{self.branch}: transient outage on try 1 for {row['id']}")
        return {
            "id": row["id"],
            "source": self.branch,
            f"{self.branch}_value": n * 10 + BRANCHES.index(self.branch),
        }


def _bad_rows(kind: str) -> Iterator[dict[str, Any]]:
    """Rows whose fifth or sixth row is bad: the first chunk (of 2) is already written by then."""
    for n in range(ROW_COUNT):
        if kind == "duplicate_key" and n == 4:
            yield {"id": row_key(1), "n": n}
        elif kind == "not_a_dict" and n == 4:
            yield ["r4", 4]  # type: ignore[misc]
        elif kind == "nan" and n == 5:
            yield {"id": row_key(n), "n": n, "score": math.nan}
        else:
            yield {"id": row_key(n), "n": n}


def _record_fork_error(context: Any) -> None:
    exception = context.get("exception")
    FORK_ERRORS[context["ti"].dag_id] = str(exception) if exception is not None else "<no exception>"


class FaultyCoalesce(CoalesceSensor):
    """A coalesce whose first try dies in its pass (see ``Spec.coalesce_fault``); later tries work."""

    def __init__(self, *, fault: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fault = fault

    def decide(self, context: Any, run_id: str) -> bool:
        if context["ti"].try_number > 1:
            return super().decide(context, run_id)
        if self.fault == "before_pass":
            raise RuntimeError("injected: the coalesce dies before its pass")
        import airflow_elspeth.audit.coalesce as pass_module

        real_write = pass_module.write_decisions
        written: list[int] = []

        def write_then_die(*args: Any, **kwargs: Any) -> int:
            if written:
                raise RuntimeError("injected: the coalesce dies half way through its pass")
            written.append(1)
            return real_write(*args, **kwargs)

        pass_module.write_decisions = write_then_die
        try:
            return super().decide(context, run_id)
        finally:
            pass_module.write_decisions = real_write


def build_dag(spec: Spec) -> DAG:
    """Build the DAG of one scenario."""
    with integration_dag(spec.dag_id) as dag:

        @task
        def load(count: int) -> list[dict[str, Any]]:
            return source_rows(count)

        if spec.bad_rows:
            kind = spec.bad_rows
            fork = ForkOperator(
                task_id="fork",
                rows=lambda: _bad_rows(kind),
                row_key="id",
                branches=list(BRANCHES),
                chunk_size=spec.chunk_size,
                on_failure_callback=_record_fork_error,
            )
        else:
            fork = ForkOperator(
                task_id="fork",
                rows=load(spec.rows),
                row_key="id",
                branches=list(BRANCHES),
                chunk_size=spec.chunk_size,
                on_failure_callback=_record_fork_error,
            )

        delivering = []
        for branch in BRANCHES:
            task_id = spec.delivering_task(branch)
            options: dict[str, Any] = {
                "batch_size": spec.batch_size,
                "concurrency": spec.concurrency.get(branch, 1),
            }
            if spec.fail_task == branch or (branch in spec.mapped and spec.mapped_fail_chunk is not None):
                options["max_failed_rows"] = 0
            if branch in spec.max_failed_rows:
                options["max_failed_rows"] = spec.max_failed_rows[branch]
            if branch in spec.row_retries:
                options["row_retries"] = spec.row_retries[branch]
            retries = spec.retries.get(branch, 0)
            if retries:
                options["retries"] = retries
                options["retry_delay"] = timedelta(0)
            call = BranchCall(spec, branch, task_id, delivering=True)
            if branch in spec.mapped:
                step: Any = BranchOperator.partial(
                    task_id=task_id, fork=fork, branch=branch, python_callable=call, **options
                ).expand(chunk=fork.chunks)
            else:
                step = BranchOperator(
                    task_id=task_id, fork=fork, branch=branch, python_callable=call, **options
                )
            if branch in spec.two_step:
                prep_id = f"prep_{branch}"
                prep_call = BranchCall(spec, branch, prep_id, delivering=False)
                prep_options: dict[str, Any] = {}
                if spec.prep_fails == branch:
                    prep_call.fail_all = True
                    prep_options["max_failed_rows"] = 0
                prep = BranchOperator(
                    task_id=prep_id, fork=fork, branch=branch, python_callable=prep_call, **prep_options
                )
                fork >> prep >> step
            else:
                fork >> step
            delivering.append(step)

        if spec.second is not None:
            options2 = dict(spec.second)
            coalesce_ab = CoalesceSensor(
                task_id="coalesce_ab",
                fork=fork,
                timeout=timedelta(seconds=spec.timeout),
                poke_interval=1,
                **options2,
            )
            steps = dict(zip(BRANCHES, delivering, strict=True))
            [steps[b] for b in options2["branches"]] >> coalesce_ab
            coalesce_ab >> [steps[b] for b in spec.gated]

        sensor_options: dict[str, Any] = {}
        if spec.coalesce_trigger_rule:
            sensor_options["trigger_rule"] = spec.coalesce_trigger_rule
        if spec.coalesce_fault:
            sensor_options.update(fault=spec.coalesce_fault, retries=0)
        coalesce = (FaultyCoalesce if spec.coalesce_fault else CoalesceSensor)(
            task_id="coalesce",
            fork=fork,
            policy=spec.policy,
            quorum=spec.quorum,
            merge=spec.merge,
            select_branch=spec.select_branch,
            timeout=timedelta(seconds=spec.timeout),
            tolerated_failures=spec.tolerated_failures,
            tolerated_failure_rate=spec.tolerated_failure_rate,
            soft_fail=spec.soft_fail,
            poke_interval=1,
            deferrable=spec.deferrable,
            **sensor_options,
        )
        delivering >> coalesce

        @task
        def publish(summary: dict[str, Any]) -> list[dict[str, Any]]:
            from airflow_elspeth import read_merged_rows

            return list(read_merged_rows(summary))

        publish(coalesce.output)

        if spec.nested:
            fork2 = ForkOperator(
                task_id="fork2", rows=coalesce.output, row_key="id", branches=["x", "y"], chunk_size=4
            )
            steps2 = [
                BranchOperator(
                    task_id=f"ask2_{b}",
                    fork=fork2,
                    branch=b,
                    python_callable=NestedCall(spec.dag_id, b),
                )
                for b in ("x", "y")
            ]
            coalesce2 = CoalesceSensor(
                task_id="coalesce2",
                fork=fork2,
                policy="require_all",
                merge="nested",
                timeout=timedelta(seconds=spec.timeout),
                poke_interval=1,
            )
            fork2 >> steps2 >> coalesce2
    return dag


class NestedCall:
    def __init__(self, dag_id: str, branch: str) -> None:
        self.branch = branch
        self.__qualname__ = f"NestedCall[{dag_id}.{branch}]"

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], "second_pass": self.branch}


# ------------------------------------------------------------------------------------------------
# The scenarios

ROW_ERRORS = "row_errors"
TASK_FAILS = "task_fails"
HANG = "hang"
LATE = "late"
ALL_ARRIVE = "all_arrive"
SELECT_MISSING = "select_missing"

POLICIES: dict[str, dict[str, Any]] = {
    "require_all": {"policy": "require_all"},
    "quorum": {"policy": "quorum", "quorum": 2},
    "best_effort": {"policy": "best_effort"},
    "first": {"policy": "first"},
}
# The deadline of the hang and late scenarios: every other branch must have delivered well before it,
# also on a loaded machine (the test asserts which rows fail, so a slow branch would change them).
HANG_TIMEOUT = 15.0


# A branch task that fails wholesale (fail_task="a") under a policy that can decide a row without a
# (quorum, first): b and c deliver only after ask_a ended (their delivering steps run a dag.test()
# pass later). Were one of them to deliver first, the coalesce could decide every row from their
# arrivals, ask_a would skip all its rows and succeed, and a's losses would not be tested at all.
AFTER_A = ("b", "c")


def _spec(policy: str, case: str, **extra: Any) -> Spec:
    return Spec(dag_id=f"elspeth_it_{policy}_{case}", **POLICIES[policy], **extra)


SCENARIOS: dict[str, Spec] = {}


def _add(spec: Spec) -> None:
    assert spec.dag_id not in SCENARIOS, spec.dag_id
    SCENARIOS[spec.dag_id] = spec


# require_all
_add(_spec("require_all", ALL_ARRIVE))
_add(_spec("require_all", ROW_ERRORS, actions={"a": {1: "error", 4: "error"}}, tolerated_failures=2))
_add(_spec("require_all", TASK_FAILS, fail_task="a", soft_fail=True))
_add(_spec("require_all", HANG, timeout=HANG_TIMEOUT, two_step=("c",), actions={"c": {5: "hang"}}))
_add(
    _spec(
        "require_all",
        LATE,
        two_step=("c",),
        coalesce_trigger_rule="all_done",
        actions={"a": {1: "error"}},
        tolerated_failure_rate=0.2,
    )
)
# quorum (2 of 3)
_add(_spec("quorum", ALL_ARRIVE, merge="nested"))
_add(
    _spec(
        "quorum",
        ROW_ERRORS,
        actions={"a": {1: "error", 4: "error"}, "b": {4: "drop"}},
        tolerated_failures=1,
    )
)
_add(_spec("quorum", TASK_FAILS, fail_task="a", merge="nested", two_step=AFTER_A))
_add(
    _spec(
        "quorum",
        HANG,
        timeout=HANG_TIMEOUT,
        two_step=("c",),
        actions={"a": {5: "error"}, "c": {5: "hang"}},
        tolerated_failure_rate=0.1,
    )
)
_add(_spec("quorum", LATE, two_step=("c",), coalesce_trigger_rule="all_done"))
# best_effort
_add(_spec("best_effort", ALL_ARRIVE))
_add(
    _spec(
        "best_effort",
        ROW_ERRORS,
        actions={"a": {1: "error", 2: "error", 4: "error"}, "b": {2: "error"}, "c": {2: "drop"}},
        tolerated_failures=1,
    )
)
_add(_spec("best_effort", TASK_FAILS, fail_task="a"))
_add(
    _spec(
        "best_effort",
        HANG,
        timeout=HANG_TIMEOUT,
        two_step=("c",),
        actions={"a": {4: "error", 5: "error"}, "b": {4: "error"}, "c": {4: "hang", 5: "hang"}},
        concurrency={"c": 2},
        soft_fail=True,
    )
)
_add(_spec("best_effort", LATE, timeout=HANG_TIMEOUT, two_step=("c",), actions={"c": {5: "hang"}}))
# first
_add(_spec("first", ALL_ARRIVE, merge="nested"))
_add(
    _spec(
        "first",
        ROW_ERRORS,
        actions={"a": {1: "error", 2: "error"}, "b": {2: "error"}, "c": {2: "error"}},
        tolerated_failures=0,
    )
)
_add(_spec("first", TASK_FAILS, fail_task="a", two_step=AFTER_A))
_add(
    _spec(
        "first",
        HANG,
        timeout=HANG_TIMEOUT,
        two_step=("c",),
        actions={"a": {5: "error"}, "b": {5: "drop"}, "c": {5: "hang"}},
        tolerated_failures=1,
    )
)
_add(_spec("first", LATE, two_step=("c",), coalesce_trigger_rule="all_done", merge="nested"))
# select with the selected branch missing (never substituted)
_add(
    _spec(
        "quorum",
        SELECT_MISSING,
        merge="select",
        select_branch="a",
        two_step=("b",),
        actions={"a": {1: "error", 4: "error"}},
        tolerated_failures=2,
    )
)
_add(
    _spec(
        "best_effort",
        SELECT_MISSING,
        merge="select",
        select_branch="c",
        actions={"c": {1: "error", 4: "drop"}},
    )
)
_add(
    _spec(
        "first",
        SELECT_MISSING,
        merge="select",
        select_branch="a",
        two_step=("b", "c"),
        actions={"a": {1: "error", 4: "error"}},
        tolerated_failure_rate=0.5,
    )
)

# Retries and re-runs
_add(
    Spec(
        dag_id="elspeth_it_retry_crash",
        policy="require_all",
        actions={"b": {4: "crash_first_try"}},
        retries={"b": 1},
        batch_size=2,
    )
)
_add(
    Spec(
        dag_id="elspeth_it_retry_threshold",
        policy="require_all",
        actions={"b": {n: "error_first_try" for n in range(ROW_COUNT)}},
        max_failed_rows={"b": 0},
        retries={"b": 1},
        batch_size=2,
    )
)
_add(Spec(dag_id="elspeth_it_rerun", policy="require_all", actions={"a": {3: "error"}}, tolerated_failures=1))
# A branch mapped over the fork's chunks; one map index fails. Its delivering step runs a dag.test()
# pass after a's and c's (a preparation step first): under require_all b's loss decides its rows at
# once, and were it seen before a and c had delivered, those rows would miss them too (not_arrived).
# Every row is decided by its branches, none by the deadline: a long one costs nothing, and a
# loaded machine's stall (a task's start once took 26 s in a full run) cannot reach it.
_add(
    Spec(
        dag_id="elspeth_it_mapped_chunk_fails",
        policy="require_all",
        chunk_size=2,
        mapped=("b",),
        mapped_fail_chunk=1,
        tolerated_failures=2,
        two_step=("b",),
        timeout=120.0,
    )
)
_add(
    Spec(
        dag_id="elspeth_it_mapped_best_effort",
        policy="best_effort",
        chunk_size=2,
        mapped=("a", "b"),
        mapped_fail_chunk=2,
    )
)
# Bad input rows
for _kind in ("duplicate_key", "not_a_dict", "nan"):
    _add(Spec(dag_id=f"elspeth_it_bad_rows_{_kind}", bad_rows=_kind, chunk_size=2))
# Two coalesces on one fork: a quick "first" over a and b, then a full require_all; c's delivering
# step runs once the quick one has decided every row (an expensive branch after a cheap consensus).
_add(
    Spec(
        dag_id="elspeth_it_two_coalesces",
        policy="require_all",
        two_step=("c",),
        second={"policy": "first", "branches": ["a", "b"], "merge": "nested"},
        gated=("c",),
    )
)
# Multi-step losses and per-row retries: c's preparation step drops r1 and fails r2 (lost at the
# delivering step with the same reason); b's r3 fails once and succeeds on its row retry; a's r4
# fails all three attempts.
_add(
    Spec(
        dag_id="elspeth_it_chain_and_row_retries",
        policy="best_effort",
        two_step=("c",),
        prep_actions={"c": {1: "drop", 2: "error"}},
        actions={"b": {3: "flaky_once"}, "a": {4: "error"}},
        row_retries={"a": 2, "b": 1},
    )
)
# A branch whose first step fails wholesale: its delivering step ends upstream_failed.
# b is two-step too, so that prep_c fails before b arrives: quorum 2 of a's and b's arrivals would
# otherwise decide every row first, prep_c would skip them all and succeed.
_add(Spec(dag_id="elspeth_it_prep_fails", policy="quorum", quorum=2, two_step=("b", "c"), prep_fails="c"))
# The deferrable sensor under dag.test() (it reschedules itself there: an inline trigger would
# block the branches), at the deadline.
_add(SCENARIOS["elspeth_it_quorum_hang"].with_(dag_id="elspeth_it_quorum_hang_deferrable", deferrable=True))
# No rows at all
_add(Spec(dag_id="elspeth_it_empty", policy="quorum", quorum=2, rows=0, mapped=("b",)))
# A nested fork over merged rows
_add(Spec(dag_id="elspeth_it_nested", policy="best_effort", nested=True, actions={"c": {2: "error"}}))


# The coalesce dies (no retries): its finalizer closes every row it left.
for _fault in ("before_pass", "mid_pass"):
    _add(
        Spec(
            dag_id=f"elspeth_it_coalesce_dies_{_fault}",
            coalesce_fault=_fault,
            actions={"c": {1: "error"}},
            timeout=600.0,
            tolerated_failures=6,
        )
    )


# Imported as the scenario library (support.dag_module) the module builds no DAG: Airflow registers
# every DAG built while a file is parsed with that file, so elspeth_it_labels_dags.py, which imports
# it, would otherwise hold a second copy of each DAG here.
if __name__ != DAG_MODULE_NAME:
    for _dag_id in selected(SCENARIOS):
        globals()[_dag_id] = build_dag(SCENARIOS[_dag_id])
