"""The shape of an elspeth DAG: which task is a fork, a branch step or a coalesce, and how they connect.

The one module that answers graph questions (which step delivers a branch to a coalesce, which
coalesces consume a step, whether a step is its branch's last) and that checks a whole DAG's
structure at parse time (:func:`check_dag`, called by the ``airflow.policy`` cluster policy in
:mod:`airflow_elspeth.policies`).

It imports neither operator module (the operators import it): a task's role is read from the
class attribute ``_elspeth_role`` (``"fork"`` on ForkOperator, ``"branch"`` on BranchOperator,
``"coalesce"`` on CoalesceSensor); for a mapped task (Airflow's ``MappedOperator``, built by
``.partial(...).expand(...)``) from its ``operator_class``, with the constructor arguments given to
``.partial()`` in ``partial_kwargs``.

Attributes read:

* BranchOperator: ``fork_task_id``, ``branch``; mapped: ``partial_kwargs["fork"]`` (the
  ForkOperator, or its task id) and ``partial_kwargs["branch"]``.
* CoalesceSensor: ``fork_task_id``, ``coalesce.branches``; mapped: ``partial_kwargs["fork"]`` and
  ``partial_kwargs.get("branches")`` (default: the fork's branches).
* ForkOperator: ``branches``.
* For contracts and warnings, BranchOperator's ``output_fields``, ``may_drop`` and ``row_retries``
  (mapped: the same names in ``partial_kwargs``) and an unmapped CoalesceSensor's ``coalesce``.
* For the audit store, ``audit_conn_id`` of the fork, its steps, its coalesces and their finalizers
  (mapped: in ``partial_kwargs``); a finalizer's ``fork_task_id``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from airflow_elspeth.core.config import CoalesceConfig, MergeStrategy, Policy
from airflow_elspeth.core.contract import Contract, FieldKinds, MergedContract, contract_of, merge_contracts
from airflow_elspeth.exceptions import ElspethConfigError, TopologyError

ROLE_ATTR: Final = "_elspeth_role"
FORK: Final = "fork"
BRANCH: Final = "branch"
COALESCE: Final = "coalesce"
FINALIZER: Final = "finalizer"
# The roles the structure is made of; other markers (e.g. ``"finalizer"``) are elspeth tasks too.
ROLES: Final = (FORK, BRANCH, COALESCE)
# Below this reschedule poke interval Airflow's scheduler often fails a sensor on a stale executor
# event of its previous poke (README, "Running it for real"): the retry resumes, but it is noise.
RESCHEDULE_RACE_POKE_SECONDS: Final = 10.0
BranchStep = tuple[str, str, bool]  # (fork task id, branch, mapped)
Delivering = dict[str, tuple[str, bool]]  # branch -> (task id, mapped)


# -- what a task is -------------------------------------------------------------------------------


def _mapped_class(task: Any) -> type | None:
    """The operator class of a mapped task (``MappedOperator.operator_class``), else None.

    (A plain operator has an ``operator_class`` too: its own class; ``_is_mapped`` tells them apart.)
    """
    if getattr(task, "_is_mapped", False) is not True:
        return None
    operator_class = getattr(task, "operator_class", None)
    return operator_class if isinstance(operator_class, type) else None


def is_mapped(task: Any) -> bool:
    """Whether ``task`` is a mapped task (``.partial(...).expand(...)``).

    :param task: any task of a DAG.
    """
    return _mapped_class(task) is not None


def role_of(task: Any) -> str | None:
    """The elspeth role of a task (its class's ``_elspeth_role``), or None for other tasks.

    ``"fork"``, ``"branch"`` and ``"coalesce"`` make the structure :func:`check_dag` checks; any
    other marker (e.g. ``"finalizer"``) is returned as is.

    :param task: any task of a DAG, mapped or not.
    """
    source = _mapped_class(task) or task
    role = getattr(source, ROLE_ATTR, None)
    return role if isinstance(role, str) and role else None


def _partial(task: Any) -> dict[str, Any]:
    kwargs = getattr(task, "partial_kwargs", None)
    return kwargs if isinstance(kwargs, dict) else {}


def _task_id_of(fork: Any) -> str | None:
    """The task id of a fork given as an operator or as its task id."""
    task_id = fork if isinstance(fork, str) else getattr(fork, "task_id", None)
    return task_id if isinstance(task_id, str) else None


def branch_step_of(task: Any) -> BranchStep | None:
    """``(fork_task_id, branch, mapped)`` of a BranchOperator step, mapped or not; None otherwise.

    Also None for a mapped BranchOperator whose ``fork`` or ``branch`` was not given to
    ``.partial()`` (then its branch is not known at parse time: :func:`check_dag` reports it).

    :param task: any task of a DAG.
    """
    if role_of(task) != BRANCH:
        return None
    if is_mapped(task):
        kwargs = _partial(task)
        fork_task_id, branch = _task_id_of(kwargs.get("fork")), kwargs.get("branch")
        if fork_task_id is None or not isinstance(branch, str):
            return None
        return fork_task_id, branch, True
    return task.fork_task_id, task.branch, False


def coalesce_of(task: Any) -> tuple[str, tuple[str, ...]] | None:
    """``(fork_task_id, branches)`` of a CoalesceSensor (the fork it joins, the branches it joins).

    None for other tasks, and for a mapped CoalesceSensor whose ``fork`` was not given to
    ``.partial()``.

    :param task: any task of a DAG.
    """
    if role_of(task) != COALESCE:
        return None
    if is_mapped(task):
        kwargs = _partial(task)
        fork = kwargs.get("fork")
        fork_task_id = _task_id_of(fork)
        if fork_task_id is None:
            return None
        branches = kwargs.get("branches")
        if branches is None:
            branches = getattr(fork, "branches", None) or ()
        return fork_task_id, tuple(branches)
    return task.fork_task_id, tuple(task.coalesce.branches)


def _upstream(task: Any) -> list[Any]:
    return list(task.upstream_list)


def _downstream(task: Any) -> list[Any]:
    return list(task.downstream_list)


# -- branch steps ---------------------------------------------------------------------------------


def _same_branch(task: Any, fork_task_id: str, branch: str) -> bool:
    step = branch_step_of(task)
    return step is not None and step[:2] == (fork_task_id, branch)


def previous_steps(step_task: Any) -> list[str]:
    """Task ids of the steps of the same fork and branch directly upstream of a step (sorted).

    A well-formed branch has at most one: the step whose output this step takes.

    :param step_task: a BranchOperator, mapped or not.
    :raises TopologyError: if ``step_task`` is not a branch step.
    """
    fork_task_id, branch, _ = _require_step(step_task)
    return sorted(t.task_id for t in _upstream(step_task) if _same_branch(t, fork_task_id, branch))


def next_steps(step_task: Any) -> list[str]:
    """Task ids of the steps of the same fork and branch directly downstream of a step (sorted).

    :param step_task: a BranchOperator, mapped or not.
    :raises TopologyError: if ``step_task`` is not a branch step.
    """
    fork_task_id, branch, _ = _require_step(step_task)
    return sorted(t.task_id for t in _downstream(step_task) if _same_branch(t, fork_task_id, branch))


def is_last_step(step_task: Any) -> bool:
    """Whether a step is its branch's last one: no step of the same fork and branch follows it.

    Only a branch's last step delivers to a coalesce (its output is the branch's arrival).

    :param step_task: a BranchOperator, mapped or not.
    :raises TopologyError: if ``step_task`` is not a branch step.
    """
    return not next_steps(step_task)


def consuming_coalesces(step_task: Any) -> list[str]:
    """Task ids of the coalesces that join this step's branch downstream of it (sorted).

    Follows the branch's later steps (same fork, same branch) downstream and collects the
    CoalesceSensors of the same fork that join the branch; a row is unneeded on this branch only
    once all of them decided it.

    :param step_task: a BranchOperator, mapped or not.
    :raises TopologyError: if ``step_task`` is not a branch step.
    """
    fork_task_id, branch, _ = _require_step(step_task)
    found: set[str] = set()
    seen: set[str] = set()
    stack: list[Any] = [step_task]
    while stack:
        for task in _downstream(stack.pop()):
            if task.task_id in seen:
                continue
            seen.add(task.task_id)
            joined = coalesce_of(task)
            if joined is not None:
                if joined[0] == fork_task_id and branch in joined[1]:
                    found.add(task.task_id)
            elif _same_branch(task, fork_task_id, branch):
                stack.append(task)
    return sorted(found)


def _require_step(task: Any) -> BranchStep:
    step = branch_step_of(task)
    if step is None:
        raise TopologyError(f"task {getattr(task, 'task_id', task)!r} is not a BranchOperator step")
    return step


# -- coalesces ------------------------------------------------------------------------------------


def _names(task_ids: Iterable[str]) -> str:
    return ", ".join(repr(t) for t in task_ids)


def _analyse_coalesce(coalesce_task: Any) -> tuple[Delivering, list[str]]:
    """The delivering step of each branch a coalesce joins, and every problem found on the way."""
    task_id = coalesce_task.task_id
    joined = coalesce_of(coalesce_task)
    if joined is None:
        return {}, [
            f"coalesce {task_id!r}: cannot tell which fork it joins "
            "(a mapped CoalesceSensor must get fork through .partial())"
        ]
    fork_task_id, branches = joined
    same_fork: dict[str, list[Any]] = {b: [] for b in branches}
    other_fork: dict[str, list[tuple[str, str]]] = {b: [] for b in branches}
    for task in sorted(_upstream(coalesce_task), key=lambda t: t.task_id):
        step = branch_step_of(task)
        if step is None or step[1] not in same_fork:
            continue
        if step[0] == fork_task_id:
            same_fork[step[1]].append(task)
        else:
            other_fork[step[1]].append((task.task_id, step[0]))

    delivering: Delivering = {}
    problems: list[str] = []
    for branch in branches:
        steps, others = same_fork[branch], other_fork[branch]
        prefix = f"coalesce {task_id!r} joins branch {branch!r} of fork {fork_task_id!r}"
        if not steps and others:
            problems.extend(
                f"{prefix} but the BranchOperator {other_id!r} directly upstream for branch {branch!r} "
                f"belongs to fork {other_fork_id!r}, not {fork_task_id!r}"
                for other_id, other_fork_id in others
            )
        elif not steps:
            problems.append(
                f"coalesce {task_id!r} joins branch {branch!r} but no BranchOperator of fork "
                f"{fork_task_id!r} for branch {branch!r} is directly upstream (its tokens would never "
                "get an outcome)"
            )
        elif len(steps) > 1:
            problems.append(
                f"{prefix} but {len(steps)} BranchOperators of fork {fork_task_id!r} for branch "
                f"{branch!r} are directly upstream ({_names(t.task_id for t in steps)}); exactly one, "
                "the branch's last step, must be"
            )
        else:
            (step,) = steps
            later = next_steps(step)
            if later:
                problems.append(
                    f"{prefix} through {step.task_id!r}, which is not the branch's last step "
                    f"({_names(later)} follows it); only the last step delivers"
                )
            else:
                delivering[branch] = (step.task_id, is_mapped(step))
    return delivering, problems


def delivering_steps(coalesce_task: Any) -> Delivering:
    """Each joined branch's delivering step: ``{branch: (task_id, mapped)}``, in the coalesce's order.

    The delivering step of a branch is the BranchOperator of the coalesce's fork for that branch
    directly upstream of the coalesce (the branch's last step).

    :param coalesce_task: a CoalesceSensor.
    :raises TopologyError: naming the coalesce, the branch and the fork, when a joined branch has no
        such step, several, only steps of another fork, or a step that is not the branch's last.
    """
    if role_of(coalesce_task) != COALESCE:
        raise TopologyError(f"task {getattr(coalesce_task, 'task_id', coalesce_task)!r} is not a coalesce")
    delivering, problems = _analyse_coalesce(coalesce_task)
    if problems:
        raise TopologyError("; ".join(problems))
    return delivering


# -- the whole DAG --------------------------------------------------------------------------------


def has_elspeth_tasks(dag: Any) -> bool:
    """Whether any task of ``dag`` is a fork, a branch step or a coalesce.

    :param dag: a DAG.
    """
    return any(role_of(task) is not None for task in dag.tasks)


def _fork_problem(who: str, fork_task_id: str, tasks: dict[str, Any]) -> str | None:
    fork = tasks.get(fork_task_id)
    if fork is None or role_of(fork) != FORK:
        return f"{who} names fork {fork_task_id!r}, which is not a ForkOperator of this DAG"
    return None


def _fork_branches(fork: Any) -> Sequence[str] | None:
    if is_mapped(fork):
        return None
    branches = getattr(fork, "branches", None)
    return list(branches) if branches is not None else None


def _step_problems(task: Any, tasks: dict[str, Any]) -> list[str]:
    step = branch_step_of(task)
    if step is None:
        return [
            f"BranchOperator {task.task_id!r}: cannot tell its fork and branch "
            "(a mapped BranchOperator must get fork and branch through .partial())"
        ]
    fork_task_id, branch, mapped = step
    who = f"BranchOperator {task.task_id!r} (branch {branch!r})"
    missing_fork = _fork_problem(who, fork_task_id, tasks)
    if missing_fork:
        return [missing_fork]
    problems: list[str] = []
    branches = _fork_branches(tasks[fork_task_id])
    if mapped and branches is not None and branch not in branches:
        problems.append(f"{who}: branch {branch!r} is not a branch of fork {fork_task_id!r} ({branches!r})")
    if fork_task_id not in task.get_flat_relative_ids(upstream=True):
        problems.append(
            f"{who} is not downstream of its fork {fork_task_id!r}: it would run before the fork "
            "wrote its tokens"
        )
    previous = previous_steps(task)
    if len(previous) > 1:
        problems.append(
            f"{who} of fork {fork_task_id!r} follows {len(previous)} steps of the same branch "
            f"({_names(previous)}); a step takes the output of one previous step"
        )
    return problems


# -- contracts and warnings -----------------------------------------------------------------------


def _step_arg(task: Any, name: str, default: Any) -> Any:
    """A step's constructor argument: its attribute, or for a mapped step its ``.partial()`` kwarg."""
    if is_mapped(task):
        return _partial(task).get(name, default)
    return getattr(task, name, default)


def step_contract(step_task: Any) -> Contract | None:
    """The output contract a branch step declares (``output_fields``), None when it declares none.

    :param step_task: a BranchOperator, mapped or not.
    :raises ElspethConfigError: a mapped step's ``output_fields`` that is no valid contract (an
        unmapped step's constructor has refused it already).
    """
    declared = _step_arg(step_task, "output_fields", None)
    if declared is None:
        return None
    return contract_of(declared, param=f"BranchOperator {step_task.task_id!r}: output_fields")


def _coalesce_config(coalesce_task: Any) -> CoalesceConfig | None:
    """An unmapped coalesce's configuration (a mapped one's is only known once expanded)."""
    if is_mapped(coalesce_task):
        return None
    config = getattr(coalesce_task, "coalesce", None)
    return config if isinstance(config, CoalesceConfig) else None


def _delivering_tasks(coalesce_task: Any) -> dict[str, Any]:
    """Each joined branch's delivering step, as the task (branches without a sound one left out)."""
    delivering, _ = _analyse_coalesce(coalesce_task)
    upstream = {task.task_id: task for task in _upstream(coalesce_task)}
    return {branch: upstream[task_id] for branch, (task_id, _) in delivering.items()}


def coalesce_contract(coalesce_task: Any) -> MergedContract | None:
    """The contract of the rows a coalesce merges, from its branches' delivering steps.

    ``union``: the branches' contracts merged (conflicts included, see
    :func:`~airflow_elspeth.core.contract.merge_contracts`); ``select``: the selected branch's;
    ``nested`` (a row of whole branch outputs) and a mapped coalesce: None.

    :param coalesce_task: a CoalesceSensor.
    :raises ElspethConfigError: a delivering step's ``output_fields`` that is no valid contract.
    """
    config = _coalesce_config(coalesce_task)
    if config is None or config.merge is MergeStrategy.NESTED:
        return None
    steps = _delivering_tasks(coalesce_task)
    contracts = {branch: step_contract(step) for branch, step in steps.items()}
    order = [config.select_branch] if config.select_branch is not None else list(config.branches)
    return merge_contracts(contracts, order)


def _contract_problems(coalesce_task: Any) -> list[str]:
    """A union coalesce whose branches declare one field with different types, naming the coalesce,
    the field, each branch and its delivering step."""
    try:
        merged = coalesce_contract(coalesce_task)
    except ElspethConfigError as err:
        return [f"coalesce {coalesce_task.task_id!r}: {err}"]
    config = _coalesce_config(coalesce_task)
    if merged is None or config is None or config.merge is not MergeStrategy.UNION:
        return []
    steps = _delivering_tasks(coalesce_task)
    return [
        f"coalesce {coalesce_task.task_id!r} (merge='union'): {conflict.message} (steps "
        f"{_names(steps[b].task_id for b in conflict.declared)}); a union keeps one branch's value, "
        "so every branch supplying a field must declare the same type"
        for conflict in merged.conflicts
    ]


def _branch_chain(step_task: Any) -> list[Any]:
    """A branch's steps up to and including ``step_task``, first step first."""
    fork_task_id, branch, _ = _require_step(step_task)
    chain = [step_task]
    while True:
        earlier = [t for t in _upstream(chain[0]) if _same_branch(t, fork_task_id, branch)]
        if len(earlier) != 1 or earlier[0] in chain:
            return chain
        chain.insert(0, earlier[0])


def dag_warnings(dag: Any) -> list[str]:
    """Rows certain to fail that the author can see at parse time (empty when none).

    For every unmapped ``require_all`` coalesce, each joined branch's steps: one declared
    ``may_drop=True`` (each row it drops fails ``branch_lost``), and an earlier step of a multi-step
    branch without ``row_retries`` (one error there loses the row on the branch, and so fails it).
    For every unmapped ``union`` coalesce with ``on_collision="fail_row"``: a field that several
    branches' contracts declare (each row merging those branches fails ``field_collision``).
    For every unmapped coalesce waiting in reschedule mode with a ``poke_interval`` below
    :data:`RESCHEDULE_RACE_POKE_SECONDS`: Airflow's scheduler race on reschedule pokes.
    The messages name the coalesce, the branch and the step (or the field and the branches).

    :param dag: a DAG (its tasks are read, never changed).
    """
    found: list[str] = []
    for task in dag.tasks:
        config = _coalesce_config(task) if role_of(task) == COALESCE else None
        if config is None:
            continue
        found.extend(_reschedule_race_warnings(task))
        if config.policy is Policy.REQUIRE_ALL:
            found.extend(_lossy_step_warnings(task))
        if config.fails_on_collision:
            found.extend(_certain_collision_warnings(task))
    return found


def _reschedule_race_warnings(coalesce_task: Any) -> list[str]:
    """A coalesce rescheduled more often than Airflow's scheduler handles reliably (see dag_warnings)."""
    if getattr(coalesce_task, "deferrable", False) or getattr(coalesce_task, "mode", None) != "reschedule":
        return []
    interval = float(coalesce_task.poke_interval)
    if interval >= RESCHEDULE_RACE_POKE_SECONDS:
        return []
    return [
        f"coalesce {coalesce_task.task_id!r}: mode='reschedule' with poke_interval={interval:g}s: "
        "Airflow's scheduler may fail a reschedule-mode sensor on the stale executor event of its "
        "previous poke (apache/airflow#71172), more often the shorter the interval; the coalesce "
        f"retries and resumes, but use poke_interval >= {RESCHEDULE_RACE_POKE_SECONDS:g}s, mode='poke' "
        "or deferrable=True"
    ]


def _lossy_step_warnings(coalesce_task: Any) -> list[str]:
    """A ``require_all`` coalesce's branch steps that may drop or lose rows (see dag_warnings)."""
    found: list[str] = []
    for branch, delivering in _delivering_tasks(coalesce_task).items():
        prefix = f"coalesce {coalesce_task.task_id!r} (require_all) joins branch {branch!r}"
        chain = _branch_chain(delivering)
        for step in chain:
            if _step_arg(step, "may_drop", False):
                found.append(
                    f"{prefix}, whose step {step.task_id!r} may drop rows (may_drop=True): every "
                    "row it drops fails the coalesce (branch_lost)"
                )
        for step in chain[:-1]:
            if not _step_arg(step, "row_retries", 0):
                found.append(
                    f"{prefix}, whose earlier step {step.task_id!r} has no row_retries: one error "
                    "there loses the row on the branch, and so fails it (branch_lost)"
                )
    return found


def _certain_collision_warnings(coalesce_task: Any) -> list[str]:
    """Fields several branches of a ``fail_row`` union declare: every row merging them fails."""
    try:
        contracts = {b: step_contract(step) for b, step in _delivering_tasks(coalesce_task).items()}
    except ElspethConfigError:
        return []  # check_dag reports the invalid contract
    suppliers: dict[str, list[str]] = {}
    declared: dict[str, set[FieldKinds]] = {}  # field -> the kinds it is declared with
    for branch, contract in contracts.items():
        for name, kinds in contract.fields.items() if contract is not None else ():
            suppliers.setdefault(name, []).append(branch)
            declared.setdefault(name, set()).add(kinds)
    return [
        f"coalesce {coalesce_task.task_id!r} (on_collision='fail_row'): branches {_names(branches)} all "
        f"declare field {name!r}, so every row merging them fails (field_collision); drop the field "
        "from all but one contract, or choose on_collision='prefer:<branch>'"
        for name, branches in suppliers.items()
        if len(branches) > 1 and len(declared[name]) == 1  # declared unlike: check_dag's conflict
    ]


# -- the audit store ------------------------------------------------------------------------------


def _named_store(task: Any) -> str | None:
    """The ``audit_conn_id`` a task names; None (also for ``""``) when it leaves it to the default."""
    return _step_arg(task, "audit_conn_id", None) or None


def store_mismatch(task: Any, audit_conn_id: str | None, fork: Any) -> str | None:
    """Why a task of ``fork`` given ``audit_conn_id`` would write to another audit store than the fork,
    naming both tasks and both connection ids; None when it names none or the fork's.

    Only what the tasks name is compared: no name (None or ``""``) means the default store
    (``[elspeth] audit_conn_id``, else ``elspeth_audit_default``, else the embedded SQLite file),
    resolved where a task runs, not here. So a task naming a store while its fork names none is a
    mismatch too: the fork's rows would be in the default store, the task's writes in its own.

    :param task: a BranchOperator, CoalesceSensor or finalizer of ``fork``, mapped or not.
    :param audit_conn_id: the ``audit_conn_id`` the task was given.
    :param fork: its ForkOperator.
    """
    named, forks = audit_conn_id or None, _named_store(fork)
    if named is None or named == forks:
        return None
    kind = (_mapped_class(task) or type(task)).__name__
    fork_names = repr(forks) if forks else "none (the default audit store)"
    return (
        f"{kind} {task.task_id!r} names audit_conn_id {named!r} but its fork {fork.task_id!r} names "
        f"{fork_names}: a fork's branch steps, coalesces and finalizers write to the fork's audit "
        f"store; leave audit_conn_id unset on {task.task_id!r} (it then inherits the fork's)"
    )


def fork_store(task: Any, audit_conn_id: str | None, fork: Any) -> str | None:
    """The ``audit_conn_id`` a task of ``fork`` uses: the fork's, inherited when the task names none.

    :param task: the BranchOperator or CoalesceSensor being built (its constructor names its DAG:
        :func:`airflow_elspeth.config_errors.names_task`).
    :param audit_conn_id: the ``audit_conn_id`` it was given.
    :param fork: its ForkOperator.
    :raises TopologyError: the task names another store than its fork (see :func:`store_mismatch`).
    """
    problem = store_mismatch(task, audit_conn_id, fork)
    if problem is not None:
        raise TopologyError(problem)
    return _named_store(fork)


def _store_problems(task: Any, tasks: dict[str, Any]) -> list[str]:
    """A branch step, coalesce or finalizer naming another audit store than its fork of this DAG
    (a mapped task's constructor runs only when it runs, so this is what catches it at parse time)."""
    role = role_of(task)
    if role == BRANCH:
        step = branch_step_of(task)
        fork_task_id = step[0] if step is not None else None
    elif role == COALESCE:
        joined = coalesce_of(task)
        fork_task_id = joined[0] if joined is not None else None
    else:
        fork_task_id = getattr(task, "fork_task_id", None)
    fork = tasks.get(fork_task_id) if isinstance(fork_task_id, str) else None
    if fork is None or role_of(fork) != FORK:
        return []  # reported as a task whose fork is unknown or not of this DAG
    problem = store_mismatch(task, _named_store(task), fork)
    return [problem] if problem is not None else []


def check_dag(dag: Any) -> list[str]:
    """Every structure problem of a DAG's forks, branch steps and coalesces (empty when sound).

    * each coalesce joins a fork of this DAG, and each branch it joins has exactly one delivering
      step: a BranchOperator of the same fork for that branch, directly upstream, the branch's last
      step (none, several, only steps of another fork, or an earlier step are problems);
    * each branch step names a fork of this DAG, is downstream of it, follows at most one step of
      its branch, and (mapped, so not checked by its constructor) names one of the fork's branches;
    * a ``union`` coalesce's branches declare no field with different types (``output_fields``);
    * each branch step, coalesce and finalizer names no ``audit_conn_id`` but its fork's (one audit
      store per fork: :func:`store_mismatch`).

    Each message names the task(s), the branch and the fork.

    :param dag: a DAG (its tasks are read, never changed).
    """
    tasks: dict[str, Any] = dict(dag.task_dict)
    problems: list[str] = []
    for task in dag.tasks:
        role = role_of(task)
        if role == BRANCH:
            problems.extend(_step_problems(task, tasks))
        elif role == COALESCE:
            joined = coalesce_of(task)
            if joined is not None:
                missing_fork = _fork_problem(f"coalesce {task.task_id!r}", joined[0], tasks)
                if missing_fork:
                    problems.append(missing_fork)
                    continue
            problems.extend(_analyse_coalesce(task)[1])
            problems.extend(_contract_problems(task))
        if role in (BRANCH, COALESCE, FINALIZER):
            problems.extend(_store_problems(task, tasks))
    return problems
