#!/usr/bin/env bash
# The main job: run the LLM-consensus example DAG end to end through Airflow (dag.test) on the
# embedded audit store, then show its coalesce report and explain one failed row.
#     bash scripts/demo.sh [dag_id]        (default: example_llm_consensus)
# Creates .venv on first use (scripts/bootstrap.sh) and keeps Airflow's state in .demo/.
set -euo pipefail

# shellcheck source=scripts/bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

cd "$ELSPETH_ROOT"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ELSPETH_ROOT/.demo/airflow_home}"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER="$ELSPETH_ROOT/dags"
export PATH="$ELSPETH_VENV/bin:$PATH"
exec "$ELSPETH_PY" scripts/run_example.py "${1:-example_llm_consensus}"
