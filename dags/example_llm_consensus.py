"""LLM-style consensus: ask three models about each document, keep an answer two of them agree on.

The external calls are simulated deterministically (no network), with the failure modes a real
run meets: ``claude`` is rate-limited on some documents (row errors, retried then lost), and
``gemini`` is slower than the coalesce deadline on long documents. ``gemini`` first builds its own
prompt (a two-step branch: the step directly upstream of the coalesce delivers).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator

DOCUMENTS = 24
# The coalesce's deadline, from the fork's end: room for a scheduler to start the branch tasks
# (seconds each, under load), not for gemini's long documents.
DEADLINE = timedelta(seconds=30)
LONG_DOCUMENT_SECONDS = 36.0  # how long gemini takes on a long document: past the deadline


class RateLimitError(RuntimeError):
    """What the simulated claude client raises when it is throttled."""


def is_long(doc: dict) -> bool:
    return doc["pages"] > 40


def ask_gpt(doc: dict) -> dict:
    time.sleep(0.01)
    return {"label": "invoice" if doc["number"] % 3 else "contract", "gpt_confidence": 0.91}


def ask_claude(doc: dict) -> dict:
    time.sleep(0.01)
    if doc["number"] % 5 == 0:
        raise RateLimitError(f"429 Too Many Requests for {doc['id']}")
    return {"label": "invoice" if doc["number"] % 3 else "contract", "claude_confidence": 0.88}


def build_gemini_prompt(doc: dict) -> dict:
    return {**doc, "prompt": f"Classify document {doc['id']} ({doc['pages']} pages)"}


def ask_gemini(doc: dict) -> dict:
    time.sleep(LONG_DOCUMENT_SECONDS if is_long(doc) else 0.01)
    return {"label": "invoice" if doc["number"] % 3 else "contract", "gemini_confidence": 0.87}


with DAG(
    dag_id="example_llm_consensus",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["elspeth", "example"],
    doc_md=__doc__,
) as dag:

    @task
    def load_documents() -> list[dict]:
        return [
            {"id": f"doc-{n:03d}", "number": n, "pages": 60 if n in (10, 17) else 3 + n % 7}
            for n in range(1, DOCUMENTS + 1)
        ]

    fork = ForkOperator(
        task_id="fork", rows=load_documents(), row_key="id", branches=["gpt", "claude", "gemini"]
    )
    gpt = BranchOperator(task_id="ask_gpt", fork=fork, branch="gpt", python_callable=ask_gpt)
    claude = BranchOperator(
        task_id="ask_claude", fork=fork, branch="claude", python_callable=ask_claude, row_retries=2
    )
    gemini_prompt = BranchOperator(
        task_id="gemini_prompt", fork=fork, branch="gemini", python_callable=build_gemini_prompt
    )
    gemini = BranchOperator(
        task_id="ask_gemini", fork=fork, branch="gemini", python_callable=ask_gemini, concurrency=4
    )
    consensus = CoalesceSensor(
        task_id="consensus",
        fork=fork,
        policy="quorum",
        quorum=2,
        merge="nested",
        timeout=DEADLINE,
        tolerated_failure_rate=0.25,
    )

    @task
    def publish(summary: dict) -> int:
        from airflow_elspeth import read_merged_rows

        labels = [next(iter(row.values()))["label"] for row in read_merged_rows(summary)]
        print(f"published {len(labels)} consensus labels")
        return len(labels)

    fork >> [gpt, claude, gemini_prompt]
    gemini_prompt >> gemini
    [gpt, claude, gemini] >> consensus
    publish(consensus.output)
