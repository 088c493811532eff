"""Build one customer profile from whatever the CRM, billing and support systems know.

``best_effort`` merges every branch that answered; ``union`` overlays fields in branch order
(``crm``, then ``billing``, then ``support``: the later one wins) and records each field more than one
system supplied, so a reviewer can see where ``email`` or ``status`` disagreed. Support has no
record of some customers (the callable returns ``None``: the row is dropped on that branch, not an
error). The billing branch is mapped over the fork's chunks: one task instance per chunk.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator


def accounts() -> list[dict]:
    return [{"account": f"A{n:03d}", "n": n} for n in range(1, 31)]


def from_crm(row: dict) -> dict:
    return {"name": f"Customer {row['n']}", "email": f"c{row['n']}@crm.example", "status": "active"}


def from_billing(row: dict) -> dict:
    return {
        "plan": "pro" if row["n"] % 4 == 0 else "basic",
        "status": "overdue" if row["n"] % 6 == 0 else "paid",
    }


def from_support(row: dict) -> dict | None:
    if row["n"] % 5 == 0:
        return None
    return {"open_tickets": row["n"] % 3, "email": f"customer{row['n']}@support.example"}


with DAG(
    dag_id="example_best_effort_union",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["elspeth", "example"],
    doc_md=__doc__,
) as dag:
    fork = ForkOperator(
        task_id="fork",
        rows=accounts,
        row_key="account",
        branches=["crm", "billing", "support"],
        chunk_size=10,
    )
    crm = BranchOperator(task_id="crm", fork=fork, branch="crm", python_callable=from_crm)
    billing = BranchOperator.partial(
        task_id="billing", fork=fork, branch="billing", python_callable=from_billing
    ).expand(chunk=fork.chunks)
    support = BranchOperator(task_id="support", fork=fork, branch="support", python_callable=from_support)
    profile = CoalesceSensor(
        task_id="profile",
        fork=fork,
        policy="best_effort",
        merge="union",
        timeout=timedelta(minutes=5),
        deferrable=True,  # waits in the triggerer: no worker slot while the branches work
    )
    fork >> [crm, support]
    [crm, billing, support] >> profile
