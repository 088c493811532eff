#!/usr/bin/env bash
# Run the test suite: bash scripts/test.sh [pytest arguments...]
# Creates .venv and installs the project with its test extras on first use (scripts/bootstrap.sh).
# Exits with pytest's exit code.
set -euo pipefail

# shellcheck source=scripts/bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

cd "$ELSPETH_ROOT"
exec "$ELSPETH_PY" -m pytest "$@"
