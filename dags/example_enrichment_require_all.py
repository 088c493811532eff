"""Daily customer enrichment that needs every source: credit score, address and churn risk.

Each run enriches the same 40 customers as of its date (``as_of``: the logical date, or for a run
without one, a manual trigger, the day it was made), and ``require_all`` merges a customer only when
all three sources answered.

* An ordinary day: 38 customers merge. The address service has no address on record for two
  postcodes (``UNKNOWN_POSTCODES``: customers C0010 and C0030), so ``lookup_address`` raises
  ``AddressNotFound`` for them and those two rows fail ``branch_lost`` (missing ``address:
  error:AddressNotFound``, with the message). The coalesce tolerates that (``tolerated_failure_rate``
  0.1), and ``publish`` reads the 38 merged rows.
* An outage day (``OUTAGE_DAYS``: 2026-11-03 and 2026-11-04): every address lookup times out
  (``TimeoutError``), so all 40 rows fail ``branch_lost`` with ``address:
  error:TimeoutError``. That is over the tolerance: the coalesce task fails, ``publish`` is
  ``upstream_failed`` and the DAG run is failed, with every decision recorded.
* Re-running an outage day succeeds: the service is back. A real outage ends with time; this
  simulation ends it at the date's first re-run, so the story stays deterministic (no clock, no
  randomness, no network): the lookups time out only while the DAG run has never been cleared
  (``dag_run.clear_number`` 0). ``airflow backfill create ... --reprocess-behavior failed`` (or
  Clear in the UI) clears the failed run in place, its ``clear_number`` becomes 1, and the fork's
  new try, a new audit run linked to the failed one, merges 38 customers again.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, get_current_context, task

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

CUSTOMERS = 40
UNKNOWN_POSTCODES = {"1070", "1210"}  # customers C0010 and C0030: no address on record
OUTAGE_DAYS = {"2026-11-03", "2026-11-04"}  # the address service times out on these dates' first run


class AddressNotFound(LookupError):
    """What the simulated address client raises for a postcode it has no address for."""


def credit_score(customer: dict) -> dict:
    return {"credit_score": 550 + (int(customer["postcode"]) % 300)}


def address_service_down(day: str) -> bool:
    """The simulated outage: on an outage day, until its DAG run is cleared (a re-run)."""
    return day in OUTAGE_DAYS and get_current_context()["dag_run"].clear_number == 0


def lookup_address(customer: dict) -> dict:
    if address_service_down(customer["as_of"]):
        raise TimeoutError("address-service: read timed out after 5 s")
    if customer["postcode"] in UNKNOWN_POSTCODES:
        raise AddressNotFound(f"address-service: no address on record for postcode {customer['postcode']}")
    return {"street": f"{int(customer['postcode']) % 90 + 1} High Street", "city": "Springfield"}


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

    @task
    def load_customers(dag_run=None) -> list[dict]:
        """The day's customers; Airflow passes ``dag_run`` from the task's context."""
        as_of = (dag_run.logical_date or dag_run.run_after).date().isoformat()
        return [
            {"customer_id": f"C{n:04d}", "as_of": as_of, "postcode": f"{1000 + n * 7}", "spend": n * 13.5}
            for n in range(1, CUSTOMERS + 1)
        ]

    fork = ForkOperator(
        task_id="fork", rows=load_customers(), row_key="customer_id", branches=["credit", "address", "churn"]
    )
    credit = BranchOperator(task_id="credit_score", fork=fork, branch="credit", python_callable=credit_score)
    address = BranchOperator(
        task_id="lookup_address", fork=fork, branch="address", python_callable=lookup_address
    )
    churn = BranchOperator(task_id="churn_risk", fork=fork, branch="churn", python_callable=churn_risk)
    enriched = CoalesceSensor(
        task_id="enriched",
        fork=fork,
        policy="require_all",
        merge="union",
        timeout=timedelta(minutes=5),
        tolerated_failure_rate=0.1,
    )

    @task
    def publish(summary: dict) -> int:
        from airflow_elspeth import read_merged_rows

        published = sum(1 for _ in read_merged_rows(summary))
        print(
            f"published {published} enriched customers of {summary['rows_total']}; "
            f"failures: {summary['failure_reasons']}; missing: {summary['missing_branches']}"
        )
        return published

    fork >> [credit, address, churn] >> enriched
    publish(enriched.output)
