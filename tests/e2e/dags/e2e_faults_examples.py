"""The example DAGs of the repository's ``dags/`` folder, in the e2e DAGs folder, unchanged.

(Airflow's safe mode parses a file only if it names both "airflow" and "dag": this line does.)

Each ``dags/example_*.py`` is executed as a module of its own and its ``dag`` exposed here, so the
e2e deployment parses (and its tasks run) exactly those DAGs; their DAG ids are theirs. Two changes:
``max_active_runs=MAX_ACTIVE_RUNS``, so the scheduler runs all the test's runs of a DAG side by side
(the four DAGs too), and no schedule, so the runs of a DAG are exactly the ones the test triggers
(the examples' ``@daily`` would add one on unpause).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.sdk.definitions.timetables.simple import NullTimetable
from example_modules import EXAMPLES, load_example

# Every run of the test at once (three a DAG, twelve in all): the LLM example's deadline (30 s from
# its fork's end) leaves room for the scheduler to start its tasks even then; one run after the
# other, its runs alone took three minutes of the suite.
MAX_ACTIVE_RUNS = 3


def _load(path: Path) -> Any:
    dag = load_example(path, "e2e_faults_examples").dag
    dag.max_active_runs = MAX_ACTIVE_RUNS
    dag.timetable = NullTimetable()
    return dag


for _path in sorted(EXAMPLES.glob("example_*.py")):
    globals()[_path.stem] = _load(_path)
