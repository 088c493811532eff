"""E2E: the enrichment example of the repository's ``dags/``, as it is, under a DAG id of its own.

(Airflow's safe mode parses a file only if it names both "airflow" and "dag": this line does.)

``dags/example_enrichment_require_all.py`` is executed as a module of its own and its ``dag`` exposed
here, so the backfill test runs exactly the README's backfill story: the example's outage days fail
their first run and succeed when reprocessed. Two changes: the DAG id ``e2e_backfill``, so its audit
runs are apart from those of the example's other copy (tests/e2e/dags/e2e_faults_examples.py), and an
``end_date`` before today, so unpausing it schedules no run of its own: the test's runs are the
backfill's.
"""

from __future__ import annotations

from datetime import datetime, timezone

from example_modules import EXAMPLES, load_example

EXAMPLE = EXAMPLES / "example_enrichment_require_all.py"
DAG_ID = "e2e_backfill"
END_DATE = datetime(2026, 11, 30, tzinfo=timezone.utc)  # after the test's dates, before today

example = load_example(EXAMPLE, DAG_ID)
dag = example.dag
dag.dag_id = DAG_ID
dag.end_date = END_DATE
