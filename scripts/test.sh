#!/usr/bin/env bash
# Run the test suite: bash scripts/test.sh [pytest arguments...]
# Creates .venv and installs the project with its test extras on first use (scripts/bootstrap.sh).
# The whole suite (no test paths, no -m/-k) runs on 4 pytest-xdist workers, the e2e tests in groups
# of one worker each (each group shares one Airflow deployment, tests/conftest.py xdist_scope); a
# selection runs in this one process, the quick tier (-m quick) on 2 workers.
# ELSPETH_TEST_WORKERS=N sets the workers either way (0: one process); -n/--numprocesses or
# -p no:xdist passed here win. Exits with pytest's exit code.
set -euo pipefail

# shellcheck source=scripts/bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

cd "$ELSPETH_ROOT"

workers="${ELSPETH_TEST_WORKERS:-}"
previous=""
quick_tier=yes  # only "-m quick" narrows the run (no other -m, no -k, no test path, no -n)
marker=""
for arg in "$@"; do
    case "$arg" in
        -n | -n* | --numprocesses | --numprocesses=* | no:xdist | -pno:xdist)
            workers=0
            quick_tier=""
            ;;
        -m | -k | -m* | -k*) [ -n "${ELSPETH_TEST_WORKERS:-}" ] || workers=0 ;;
        -*) ;;
        *)
            case "$previous" in
                -m) marker="$arg" ;;
                -p | -o | -c | -W | --*) ;;
                *) quick_tier="" ;; # a test path, or the value of -k
            esac
            # a test path (not the value of an option such as -p, -o, --durations ...)
            case "$previous" in
                -p | -o | -c | -W | --*) ;;
                *) [ -n "${ELSPETH_TEST_WORKERS:-}" ] || workers=0 ;;
            esac
            ;;
    esac
    case "$arg" in -m?* | -k*) quick_tier="" ;; esac
    previous="$arg"
done
# The quick tier on its own runs on two workers, one per core of the two-core machine its minute is
# meant for (in one process it took about that minute; xdist's start-up costs a few seconds).
if [ -n "$quick_tier" ] && [ "$marker" = "quick" ] && [ -z "${ELSPETH_TEST_WORKERS:-}" ]; then
    workers=2
fi
xdist=()
if [ "${workers:-4}" != "0" ]; then
    xdist=("-n" "${workers:-4}" "--dist" "load")
fi

exec "$ELSPETH_PY" -m pytest "${xdist[@]}" "$@"
