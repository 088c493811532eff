"""Customer enrichment that needs every source: credit score, address and churn risk.

The address service is down for this whole run: every call fails, so the ``lookup_address`` task
fails wholesale on its failure threshold instead of recording hundreds of row errors. With
``require_all`` every row then fails ``branch_lost``; the coalesce records why for each row and is
skipped instead of failed (``soft_fail=True``), and ``notify`` reports the summary from XCom.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator


class ServiceUnavailable(ConnectionError):
    """What the simulated address client raises while its service is down."""


def customers() -> list[dict]:
    return [
        {"customer_id": f"C{n:04d}", "postcode": f"{1000 + n * 7}", "spend": n * 13.5} for n in range(1, 41)
    ]


def credit_score(customer: dict) -> dict:
    return {"credit_score": 550 + (int(customer["postcode"]) % 300)}


def lookup_address(customer: dict) -> dict:
    raise ServiceUnavailable("address-service: 503 Service Unavailable")


def churn_risk(customer: dict) -> dict:
    return {"churn_risk": round(1 / (1 + customer["spend"] / 100), 3)}


with DAG(
    dag_id="example_enrichment_require_all",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["elspeth", "example"],
    doc_md=__doc__,
) as dag:
    fork = ForkOperator(
        task_id="fork", rows=customers, row_key="customer_id", branches=["credit", "address", "churn"]
    )
    credit = BranchOperator(task_id="credit_score", fork=fork, branch="credit", python_callable=credit_score)
    address = BranchOperator(
        task_id="lookup_address",
        fork=fork,
        branch="address",
        python_callable=lookup_address,
        max_failed_rate=0.5,
        min_rows_for_rate=10,
    )
    churn = BranchOperator(task_id="churn_risk", fork=fork, branch="churn", python_callable=churn_risk)
    enriched = CoalesceSensor(
        task_id="enriched",
        fork=fork,
        policy="require_all",
        merge="union",
        timeout=timedelta(minutes=5),
        soft_fail=True,
    )

    @task(trigger_rule="all_done")
    def notify(ti=None) -> str:
        summary = ti.xcom_pull(task_ids="enriched", key="coalesce_summary")
        message = (
            f"enrichment: {summary['rows_merged']} of {summary['rows_total']} customers enriched; "
            f"failures: {summary['failure_reasons']}; missing: {summary['missing_branches']}"
        )
        print(message)
        return message

    fork >> [credit, address, churn] >> enriched >> notify()
