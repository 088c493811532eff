"""Run one example DAG through Airflow's dag.test() and show what a user needs to see.

Called by scripts/demo.sh, which sets AIRFLOW_HOME and the DAGs folder. Airflow's own task logs go
to a file; the terminal gets the run's task states, the coalesce report and one failed row
explained, each printed by the ``airflow-elspeth`` command a user would run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

DAGS = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
HOME = Path(os.environ["AIRFLOW_HOME"])


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run_cli(*args: str) -> str:
    command = ["airflow-elspeth", *args]
    print(f"$ {shlex.join(command)}", flush=True)
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120")}
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    print(done.stdout, end="", flush=True)
    return done.stdout


def main(dag_id: str) -> int:
    HOME.mkdir(parents=True, exist_ok=True)
    log_file = HOME / "dag_test.log"
    step(f"Preparing Airflow in {HOME}")
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    path = DAGS / f"{dag_id}.py"
    spec = importlib.util.spec_from_file_location(dag_id, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.dag

    step(f"Running {dag_id} with dag.test() (Airflow's task logs: {log_file})")
    started = time.monotonic()
    handler = logging.FileHandler(log_file, mode="w")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    with open(log_file, "a") as sink:
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = sink
        try:
            dag_run = dag.test()
        finally:
            sys.stdout, sys.stderr = stdout, stderr
    print(f"DAG run {dag_run.run_id}: {dag_run.state} in {time.monotonic() - started:.1f} s")
    for ti in sorted(dag_run.get_task_instances(), key=lambda ti: (ti.start_date or ti.end_date, ti.task_id)):
        name = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        print(f"  {name:<18} {ti.state}")

    step("The coalesce report")
    run_cli("report", "--dag-id", dag_id, "--airflow-run-id", dag_run.run_id)

    from airflow_elspeth.sensors.coalesce import SUMMARY_XCOM_KEY, CoalesceSensor

    coalesces = [task.task_id for task in dag.tasks if isinstance(task, CoalesceSensor)]
    for task_id in coalesces:
        summary = dag_run.get_task_instance(task_id).xcom_pull(task_ids=task_id, key=SUMMARY_XCOM_KEY)
        failed = (summary or {}).get("failed_rows") or []
        if failed:
            step(f"Why row {failed[0]['row_key']!r} failed at {task_id}")
            run_cli("explain", failed[0]["row_key"], "--run-id", summary["audit_run_id"])
    step("Integrity check of the audit store")
    run_cli("verify", "--dag-id", dag_id, "--airflow-run-id", dag_run.run_id)
    return 0 if str(dag_run.state) == "success" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
