#!/usr/bin/env bash
# Run the test suite: bash scripts/test.sh [pytest arguments...]
# Creates .venv and installs the project with its test extras on first use (scripts/bootstrap.sh).
# The whole suite (no test paths, no -m/-k) runs on 4 pytest-xdist workers, the e2e tests in groups
# of one worker each (each group shares one Airflow deployment, tests/conftest.py xdist_scope); a
# selection runs in this one process.
# ELSPETH_TEST_WORKERS=N sets the workers either way (0: one process); -n/--numprocesses or
# -p no:xdist passed here win. Exits with pytest's exit code.
set -euo pipefail

# shellcheck source=scripts/bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

cd "$ELSPETH_ROOT"

workers="${ELSPETH_TEST_WORKERS:-}"
previous=""
for arg in "$@"; do
    case "$arg" in
        -n | -n* | --numprocesses | --numprocesses=* | no:xdist | -pno:xdist) workers=0 ;;
        -m | -k | -m* | -k*) [ -n "${ELSPETH_TEST_WORKERS:-}" ] || workers=0 ;;
        -*) ;;
        *)
            # a test path (not the value of an option such as -p, -o, --durations ...)
            case "$previous" in
                -p | -o | -c | -W | --*) ;;
                *) [ -n "${ELSPETH_TEST_WORKERS:-}" ] || workers=0 ;;
            esac
            ;;
    esac
    previous="$arg"
done
xdist=()
if [ "${workers:-4}" != "0" ]; then
    xdist=("-n" "${workers:-4}" "--dist" "load")
fi

exec "$ELSPETH_PY" -m pytest "${xdist[@]}" "$@"
