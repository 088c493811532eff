"""DAG structure (airflow_elspeth.topology) and the cluster policy that checks it at parse time.

A coalesce over a branch that no step of its fork delivers, over a step of another fork, or over two
steps of one branch fails when the DAG is parsed (an import error naming the coalesce, the branch and
the fork), not when it runs. The valid DAGs (the integration suite's and the examples) still import.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator, fork_join, topology
from airflow_elspeth.exceptions import TopologyError
from airflow_elspeth.policies import dag_policy, structure_error

from .support import DAGS_DIR, HERE, patched_env

pytestmark = pytest.mark.integration

INVALID_TOPOLOGY_DAGS_DIR = HERE / "invalid_topology_dags"
EXAMPLE_DAGS_DIR = HERE.parent.parent / "dags"
ROLES = {ForkOperator: "fork", BranchOperator: "branch", CoalesceSensor: "coalesce"}


def test_the_operator_classes_carry_their_role() -> None:
    for cls, role in ROLES.items():
        assert getattr(cls, "_elspeth_role", None) == role, cls


# ------------------------------------------------------------------------------------------------
# Small DAGs


def _dag(dag_id: str) -> DAG:
    return DAG(dag_id=dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False)


def _fork(task_id: str = "fork", branches: tuple[str, ...] = ("a", "b")) -> ForkOperator:
    return ForkOperator(task_id=task_id, rows=[{"id": 1}], row_key="id", branches=list(branches))


def _step(task_id: str, fork: ForkOperator, branch: str) -> BranchOperator:
    return BranchOperator(task_id=task_id, fork=fork, branch=branch, python_callable=dict)


def _coalesce(fork: ForkOperator, task_id: str = "coalesce", **kwargs: Any) -> CoalesceSensor:
    return CoalesceSensor(
        task_id=task_id, fork=fork, policy="require_all", timeout=timedelta(seconds=30), **kwargs
    )


def test_a_plain_fork_join() -> None:
    with _dag("plain") as dag:
        fork = _fork()
        ask_a, ask_b = _step("ask_a", fork, "a"), _step("ask_b", fork, "b")
        coalesce = _coalesce(fork)
        fork >> [ask_a, ask_b] >> coalesce

    assert [topology.role_of(t) for t in (fork, ask_a, coalesce)] == ["fork", "branch", "coalesce"]
    assert topology.branch_step_of(ask_a) == ("fork", "a", False)
    assert topology.branch_step_of(fork) is None and topology.branch_step_of(coalesce) is None
    assert topology.coalesce_of(coalesce) == ("fork", ("a", "b"))
    assert topology.delivering_steps(coalesce) == {"a": ("ask_a", False), "b": ("ask_b", False)}
    assert topology.consuming_coalesces(ask_a) == ["coalesce"]
    assert topology.is_last_step(ask_a) and topology.previous_steps(ask_a) == []
    assert topology.has_elspeth_tasks(dag)
    assert topology.check_dag(dag) == []
    assert structure_error(dag) is None
    dag_policy(dag)  # no violation


def test_a_mapped_branch_is_read_from_its_partial_kwargs() -> None:
    with _dag("mapped") as dag:
        fork = _fork()
        ask_a = _step("ask_a", fork, "a")
        ask_b = BranchOperator.partial(task_id="ask_b", fork=fork, branch="b", python_callable=dict).expand(
            chunk=fork.chunks
        )
        coalesce = _coalesce(fork)
        fork >> ask_a
        [ask_a, ask_b] >> coalesce

    assert topology.is_mapped(ask_b) and not topology.is_mapped(ask_a)
    assert topology.role_of(ask_b) == "branch"
    assert topology.branch_step_of(ask_b) == ("fork", "b", True)
    assert topology.delivering_steps(coalesce) == {"a": ("ask_a", False), "b": ("ask_b", True)}
    assert topology.consuming_coalesces(ask_b) == ["coalesce"]
    assert topology.is_last_step(ask_b)
    assert topology.check_dag(dag) == []  # expand(chunk=fork.chunks) put ask_b downstream of the fork


def test_a_multi_step_branch_delivers_through_its_last_step_only() -> None:
    with _dag("chain") as dag:
        fork = _fork()
        prep_a, ask_a, ask_b = (
            _step("prep_a", fork, "a"),
            _step("ask_a", fork, "a"),
            _step("ask_b", fork, "b"),
        )
        finish_a = BranchOperator.partial(
            task_id="finish_a", fork=fork, branch="a", python_callable=dict
        ).expand(chunk=fork.chunks)
        coalesce = _coalesce(fork)
        fork >> prep_a >> ask_a >> finish_a >> coalesce
        fork >> ask_b >> coalesce

    assert [topology.is_last_step(t) for t in (prep_a, ask_a, finish_a)] == [False, False, True]
    assert topology.previous_steps(ask_a) == ["prep_a"]
    assert topology.previous_steps(finish_a) == ["ask_a"]
    assert topology.next_steps(prep_a) == ["ask_a"]
    assert topology.delivering_steps(coalesce) == {"a": ("finish_a", True), "b": ("ask_b", False)}
    # every step of the branch is consumed by the coalesce its last step delivers to
    assert [topology.consuming_coalesces(t) for t in (prep_a, ask_a, finish_a)] == [["coalesce"]] * 3
    assert topology.check_dag(dag) == []


def test_consuming_coalesces_are_those_of_the_fork_that_join_the_branch() -> None:
    with _dag("two_coalesces") as dag:
        fork = _fork(branches=("a", "b", "c"))
        steps = {b: _step(f"ask_{b}", fork, b) for b in ("a", "b", "c")}
        both = _coalesce(fork, "coalesce_ab", branches=["a", "b"])
        every = _coalesce(fork, "coalesce")
        fork >> list(steps.values()) >> every
        [steps["a"], steps["b"]] >> both
        both >> steps["c"]  # gated: a coalesce upstream of a step is not a step of the branch
        other = _fork("other")
        other_a, other_b = _step("other_a", other, "a"), _step("other_b", other, "b")
        other_coalesce = _coalesce(other, "other_coalesce")
        steps["a"] >> other  # the second fork runs after, over something else
        other >> [other_a, other_b] >> other_coalesce

    assert topology.consuming_coalesces(steps["a"]) == ["coalesce", "coalesce_ab"]
    assert topology.consuming_coalesces(steps["c"]) == ["coalesce"]
    assert topology.consuming_coalesces(other_a) == ["other_coalesce"]
    assert topology.delivering_steps(both) == {"a": ("ask_a", False), "b": ("ask_b", False)}
    assert topology.check_dag(dag) == []


def test_a_fork_join_group_has_group_prefixed_task_ids() -> None:
    with _dag("grouped") as dag:
        group = fork_join(
            "enrich",
            rows=[{"id": 1}],
            row_key="id",
            branches={"a": dict, "b": dict},
            policy="require_all",
            timeout=timedelta(seconds=30),
        )
    coalesce = group["coalesce"]
    assert topology.delivering_steps(coalesce) == {"a": ("enrich.a", False), "b": ("enrich.b", False)}
    assert topology.check_dag(dag) == []


def test_a_dag_without_elspeth_tasks_is_not_inspected() -> None:
    from airflow.providers.standard.operators.empty import EmptyOperator

    with _dag("plain_airflow") as dag:
        EmptyOperator(task_id="start") >> EmptyOperator(task_id="end")
    assert not topology.has_elspeth_tasks(dag)
    assert topology.check_dag(dag) == []
    assert topology.role_of(dag.get_task("start")) is None
    assert structure_error(dag) is None


def test_non_steps_and_non_coalesces_are_refused_by_the_step_and_coalesce_questions() -> None:
    with _dag("refused") as dag:
        fork = _fork()
        coalesce = _coalesce(fork)
        fork >> [_step("ask_a", fork, "a"), _step("ask_b", fork, "b")] >> coalesce
    with pytest.raises(TopologyError, match="'fork' is not a BranchOperator step"):
        topology.is_last_step(fork)
    with pytest.raises(TopologyError, match="'coalesce' is not a BranchOperator step"):
        topology.consuming_coalesces(coalesce)
    with pytest.raises(TopologyError, match="'fork' is not a coalesce"):
        topology.delivering_steps(fork)
    assert topology.check_dag(dag) == []


# -- problems ---------------------------------------------------------------------------------------


def _problems(dag: DAG) -> list[str]:
    problems = topology.check_dag(dag)
    assert problems, "no problem found"
    return problems


def test_a_branch_without_a_step() -> None:
    with _dag("no_step") as dag:
        fork = _fork(branches=("a", "b", "c"))
        coalesce = _coalesce(fork)
        fork >> [_step("ask_a", fork, "a"), _step("ask_b", fork, "b")] >> coalesce
    assert _problems(dag) == [
        "coalesce 'coalesce' joins branch 'c' but no BranchOperator of fork 'fork' for branch 'c' is "
        "directly upstream (its tokens would never get an outcome)"
    ]
    with pytest.raises(TopologyError, match="no BranchOperator of fork 'fork' for branch 'c'"):
        topology.delivering_steps(coalesce)


def test_a_step_that_exists_but_is_not_directly_upstream() -> None:
    with _dag("not_wired") as dag:
        fork = _fork()
        ask_a, ask_b = _step("ask_a", fork, "a"), _step("ask_b", fork, "b")
        coalesce = _coalesce(fork)
        fork >> [ask_a, ask_b]
        ask_a >> coalesce
    (problem,) = _problems(dag)
    assert "joins branch 'b' but no BranchOperator of fork 'fork' for branch 'b'" in problem


def test_a_step_of_another_fork() -> None:
    with _dag("other_fork") as dag:
        fork, other = _fork("fork"), _fork("other")
        ask_a, other_b = _step("ask_a", fork, "a"), _step("other_b", other, "b")
        coalesce = _coalesce(fork)
        fork >> ask_a
        other >> other_b
        [ask_a, other_b] >> coalesce
    assert _problems(dag) == [
        "coalesce 'coalesce' joins branch 'b' of fork 'fork' but the BranchOperator 'other_b' directly "
        "upstream for branch 'b' belongs to fork 'other', not 'fork'"
    ]


def test_a_step_of_another_fork_next_to_the_right_one_is_harmless() -> None:
    """Upstream of a coalesce is not only its delivering steps (e.g. waiting for another join)."""
    with _dag("other_fork_too") as dag:
        fork, other = _fork("fork"), _fork("other")
        steps = [_step("ask_a", fork, "a"), _step("ask_b", fork, "b")]
        other_steps = [_step("other_a", other, "a"), _step("other_b", other, "b")]
        fork >> steps >> _coalesce(fork)
        other >> other_steps >> _coalesce(other, "other_coalesce")
        other_steps[1] >> dag.get_task("coalesce")
    assert topology.check_dag(dag) == []
    assert topology.delivering_steps(dag.get_task("coalesce"))["b"] == ("ask_b", False)


def test_two_delivering_steps() -> None:
    with _dag("two_steps") as dag:
        fork = _fork()
        coalesce = _coalesce(fork)
        fork >> [_step("ask_a", fork, "a"), _step("ask_a2", fork, "a"), _step("ask_b", fork, "b")] >> coalesce
    assert _problems(dag) == [
        "coalesce 'coalesce' joins branch 'a' of fork 'fork' but 2 BranchOperators of fork 'fork' for "
        "branch 'a' are directly upstream ('ask_a', 'ask_a2'); exactly one, the branch's last step, must be"
    ]


def test_an_earlier_step_upstream_of_the_coalesce() -> None:
    """Both steps of a chain upstream: two delivering steps; the first step only: not the last."""
    with _dag("both_chained") as dag:
        fork = _fork()
        prep_a, ask_a, ask_b = (
            _step("prep_a", fork, "a"),
            _step("ask_a", fork, "a"),
            _step("ask_b", fork, "b"),
        )
        coalesce = _coalesce(fork)
        fork >> prep_a >> ask_a
        fork >> ask_b
        [prep_a, ask_a, ask_b] >> coalesce
    (problem,) = _problems(dag)
    assert "2 BranchOperators of fork 'fork' for branch 'a'" in problem and "('ask_a', 'prep_a')" in problem

    with _dag("first_chained") as dag:
        fork = _fork()
        prep_a, ask_a, ask_b = (
            _step("prep_a", fork, "a"),
            _step("ask_a", fork, "a"),
            _step("ask_b", fork, "b"),
        )
        coalesce = _coalesce(fork)
        fork >> prep_a >> ask_a
        fork >> ask_b
        [prep_a, ask_b] >> coalesce
    assert _problems(dag) == [
        "coalesce 'coalesce' joins branch 'a' of fork 'fork' through 'prep_a', which is not the branch's "
        "last step ('ask_a' follows it); only the last step delivers"
    ]


def test_a_step_not_downstream_of_its_fork() -> None:
    with _dag("before_fork") as dag:
        fork = _fork()
        ask_a, ask_b = _step("ask_a", fork, "a"), _step("ask_b", fork, "b")
        fork >> ask_a
        [ask_a, ask_b] >> _coalesce(fork)
    assert _problems(dag) == [
        "BranchOperator 'ask_b' (branch 'b') is not downstream of its fork 'fork': it would run before "
        "the fork wrote its tokens"
    ]


def test_a_step_following_two_steps_of_its_branch() -> None:
    with _dag("diamond") as dag:
        fork = _fork()
        left, right = _step("left_a", fork, "a"), _step("right_a", fork, "a")
        ask_a, ask_b = _step("ask_a", fork, "a"), _step("ask_b", fork, "b")
        fork >> [left, right] >> ask_a
        fork >> ask_b
        [ask_a, ask_b] >> _coalesce(fork)
    assert _problems(dag) == [
        "BranchOperator 'ask_a' (branch 'a') of fork 'fork' follows 2 steps of the same branch "
        "('left_a', 'right_a'); a step takes the output of one previous step"
    ]


def test_a_mapped_step_of_an_unknown_branch() -> None:
    with _dag("mapped_unknown") as dag:
        fork = _fork()
        ask_a, ask_b = _step("ask_a", fork, "a"), _step("ask_b", fork, "b")
        ask_z = BranchOperator.partial(task_id="ask_z", fork=fork, branch="z", python_callable=dict).expand(
            chunk=fork.chunks
        )
        fork >> [ask_a, ask_b]
        [ask_a, ask_b, ask_z] >> _coalesce(fork)
    assert _problems(dag) == [
        "BranchOperator 'ask_z' (branch 'z'): branch 'z' is not a branch of fork 'fork' (['a', 'b'])"
    ]


def test_a_mapped_step_whose_branch_is_not_known_at_parse_time() -> None:
    with _dag("mapped_over_branches") as dag:
        fork = _fork()
        steps = BranchOperator.partial(task_id="ask", fork=fork, python_callable=dict).expand(
            branch=["a", "b"]
        )
        fork >> steps >> _coalesce(fork)
    problems = _problems(dag)
    assert problems[0] == (
        "BranchOperator 'ask': cannot tell its fork and branch (a mapped BranchOperator must get fork "
        "and branch through .partial())"
    )
    assert any("no BranchOperator of fork 'fork' for branch 'a'" in p for p in problems[1:])


def test_a_coalesce_of_a_fork_of_another_dag() -> None:
    with _dag("elsewhere"):
        fork = _fork()
    with _dag("here") as dag:
        coalesce = _coalesce(fork)
    assert _problems(dag) == [
        "coalesce 'coalesce' names fork 'fork', which is not a ForkOperator of this DAG"
    ]
    assert topology.coalesce_of(coalesce) == ("fork", ("a", "b"))


def test_the_policy_lists_every_problem_in_one_violation() -> None:
    from airflow.exceptions import AirflowClusterPolicyViolation

    with _dag("many_problems") as dag:
        fork = _fork(branches=("a", "b", "c"))
        coalesce = _coalesce(fork)
        fork >> [_step("ask_a", fork, "a"), _step("ask_a2", fork, "a")] >> coalesce
    with pytest.raises(AirflowClusterPolicyViolation) as raised:
        dag_policy(dag)
    message = str(raised.value)
    assert message.startswith("DAG 'many_problems': 3 fork/branch/coalesce structure problem(s):")
    for needle in ("branch 'a'", "('ask_a', 'ask_a2')", "branch 'b'", "branch 'c'"):
        assert needle in message, message


# -- one audit store per fork --------------------------------------------------------------------


def test_a_forks_steps_coalesce_trigger_and_finalizer_inherit_its_audit_store() -> None:
    """Nothing but the fork names the store: every task of the fork writes where the fork wrote."""
    with _dag("store_inherited") as dag:
        fork = ForkOperator(
            task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b"], audit_conn_id="fork_store"
        )
        ask_a = _step("ask_a", fork, "a")
        ask_b = BranchOperator(
            task_id="ask_b", fork=fork, branch="b", python_callable=dict, audit_conn_id="fork_store"
        )  # naming the fork's own store is allowed
        coalesce = _coalesce(fork)
        fork >> [ask_a, ask_b] >> coalesce
    assert [t.audit_conn_id for t in (ask_a, ask_b, coalesce, coalesce.finalizer)] == ["fork_store"] * 4
    assert topology.check_dag(dag) == []


def test_a_fork_without_a_store_leaves_its_tasks_on_the_default_store() -> None:
    with _dag("store_default") as dag:
        fork = _fork()
        ask_a, ask_b = _step("ask_a", fork, "a"), _step("ask_b", fork, "b")
        coalesce = _coalesce(fork, audit_conn_id="")  # empty: no name, as for the hook
        fork >> [ask_a, ask_b] >> coalesce
    assert [t.audit_conn_id for t in (ask_a, ask_b, coalesce, coalesce.finalizer)] == [None] * 4
    assert topology.check_dag(dag) == []


def test_a_fork_join_groups_tasks_inherit_the_store_given_to_its_fork() -> None:
    with _dag("store_grouped") as dag:
        group = fork_join(
            "enrich",
            rows=[{"id": 1}],
            row_key="id",
            branches={"a": dict, "b": dict},
            fork_kwargs={"audit_conn_id": "fork_store"},
            policy="require_all",
            timeout=timedelta(seconds=30),
        )
    assert {t.task_id: t.audit_conn_id for t in dag.tasks} == {
        "enrich.fork": "fork_store",
        "enrich.a": "fork_store",
        "enrich.b": "fork_store",
        "enrich.coalesce": "fork_store",
        "enrich.coalesce_finalize": "fork_store",
    }
    assert group["coalesce"].finalizer.audit_conn_id == "fork_store"


@pytest.mark.parametrize(
    ("fork_store", "named_by_fork"),
    [("fork_store", "'fork_store'"), (None, "none (the default audit store)")],
)
def test_a_step_naming_another_store_than_its_fork_fails_at_parse_time(
    fork_store: str | None, named_by_fork: str
) -> None:
    with _dag("store_step_mismatch"):
        fork = ForkOperator(
            task_id="orders", rows=[{"id": 1}], row_key="id", branches=["a", "b"], audit_conn_id=fork_store
        )
        with pytest.raises(TopologyError) as raised:
            BranchOperator(
                task_id="ask_a", fork=fork, branch="a", python_callable=dict, audit_conn_id="other_store"
            )
    assert str(raised.value) == (
        "DAG 'store_step_mismatch', task 'ask_a': BranchOperator 'ask_a' names audit_conn_id "
        f"'other_store' but its fork 'orders' names {named_by_fork}: a fork's branch steps, coalesces "
        "and finalizers write to the fork's audit store; leave audit_conn_id unset on 'ask_a' (it then "
        "inherits the fork's)"
    )


def test_a_coalesce_naming_another_store_than_its_fork_fails_at_parse_time() -> None:
    with _dag("store_coalesce_mismatch"):
        fork = ForkOperator(
            task_id="orders",
            rows=[{"id": 1}],
            row_key="id",
            branches=["a", "b"],
            audit_conn_id="sqlite_store",
        )
        with pytest.raises(TopologyError) as raised:
            _coalesce(fork, "orders_joined", audit_conn_id="elspeth_audit_default")
    message = str(raised.value)
    for needle in (
        "DAG 'store_coalesce_mismatch'",
        "CoalesceSensor 'orders_joined' names audit_conn_id 'elspeth_audit_default'",
        "its fork 'orders' names 'sqlite_store'",
    ):
        assert needle in message, message


def test_a_mapped_step_or_a_finalizer_naming_another_store_is_a_structure_problem() -> None:
    """A mapped step's constructor runs only when the task runs: the parse-time check finds it."""
    from airflow_elspeth.operators.finalize import CoalesceFinalizer

    with _dag("store_mapped_mismatch") as dag:
        fork = ForkOperator(
            task_id="fork", rows=[{"id": 1}], row_key="id", branches=["a", "b"], audit_conn_id="fork_store"
        )
        ask_a = _step("ask_a", fork, "a")
        ask_b = BranchOperator.partial(
            task_id="ask_b", fork=fork, branch="b", python_callable=dict, audit_conn_id="other_store"
        ).expand(chunk=fork.chunks)
        coalesce = _coalesce(fork)
        fork >> ask_a
        [ask_a, ask_b] >> coalesce
        stray = CoalesceFinalizer(
            task_id="stray_finalize", coalesce_task_id="coalesce", fork_task_id="fork", audit_conn_id="x"
        )
        coalesce >> stray
    assert _problems(dag) == [
        "BranchOperator 'ask_b' names audit_conn_id 'other_store' but its fork 'fork' names 'fork_store': "
        "a fork's branch steps, coalesces and finalizers write to the fork's audit store; leave "
        "audit_conn_id unset on 'ask_b' (it then inherits the fork's)",
        "CoalesceFinalizer 'stray_finalize' names audit_conn_id 'x' but its fork 'fork' names 'fork_store': "
        "a fork's branch steps, coalesces and finalizers write to the fork's audit store; leave "
        "audit_conn_id unset on 'stray_finalize' (it then inherits the fork's)",
    ]


# ------------------------------------------------------------------------------------------------
# Through the DagBag: the cluster policy (airflow.policy entry point) at parse time


def _dagbag(folder: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(folder), safe_mode=False)


def test_the_policy_is_registered_through_its_entry_point() -> None:
    from airflow import settings

    names = {name for name, _ in settings.get_policy_plugin_manager().list_name_plugin()}
    assert "airflow_elspeth" in names, f"reinstall the project (source scripts/bootstrap.sh): {names}"


# file -> what its import error must name
INVALID = {
    "topology_branch_without_step.py": [
        "coalesce 'coalesce' joins branch 'c'",
        "no BranchOperator of fork 'fork' for branch 'c' is directly upstream",
    ],
    "topology_step_of_another_fork.py": [
        "coalesce 'orders_joined' joins branch 'b' of fork 'orders'",
        "'refunds_b'",
        "belongs to fork 'refunds', not 'orders'",
    ],
    "topology_two_delivering_steps.py": [
        "coalesce 'coalesce' joins branch 'a' of fork 'fork'",
        "('ask_a', 'ask_a_again')",
    ],
    "topology_earlier_step_delivers.py": [
        "coalesce 'coalesce' joins branch 'a' of fork 'fork' through 'prep_a'",
        "'ask_a' follows it",
    ],
    "topology_mapped_unknown_branch.py": ["'ask_z'", "branch 'z' is not a branch of fork 'fork'"],
    "topology_mapped_step_of_another_store.py": [
        "DAG 'topology_mapped_step_of_another_store'",
        "BranchOperator 'ask_b' names audit_conn_id 'elspeth_audit_default'",
        "its fork 'fork' names 'elspeth_sqlite'",
    ],
    "topology_conflicting_contracts.py": [
        "coalesce 'coalesce' (merge='union')",
        "field 'value' is declared int in branch 'a', str in branch 'b'",
        "(steps 'ask_a', 'ask_b')",
    ],
}


@pytest.mark.timeout(120)
def test_invalid_structures_fail_at_import_naming_coalesce_branch_and_fork() -> None:
    bag = _dagbag(INVALID_TOPOLOGY_DAGS_DIR)
    errors = {str(path).rsplit("/", 1)[-1]: message for path, message in bag.import_errors.items()}
    assert set(errors) == set(INVALID), errors
    assert not bag.dags, f"invalid DAGs were loaded: {list(bag.dags)}"
    for name, needles in INVALID.items():
        assert "AirflowClusterPolicyViolation" in errors[name], errors[name]
        for needle in needles:
            assert needle in errors[name], f"{name}: {needle!r} not in {errors[name]!r}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("folder", [DAGS_DIR, EXAMPLE_DAGS_DIR], ids=["integration", "examples"])
def test_the_valid_dags_pass_the_policy(folder: Path) -> None:
    with patched_env():
        bag = _dagbag(folder)
    assert not bag.import_errors, bag.import_errors
    assert bag.dags
    elspeth = [dag for dag in bag.dags.values() if topology.has_elspeth_tasks(dag)]
    assert elspeth, "no elspeth DAG checked"
    for dag in elspeth:
        assert topology.check_dag(dag) == [], dag.dag_id
