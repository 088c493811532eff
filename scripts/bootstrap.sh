# shellcheck shell=bash
# Make sure the project's virtualenv exists and has the project installed (editable).
#
# Source it (test.sh and the demo do), or run it:
#     source scripts/bootstrap.sh      # then use "$ELSPETH_PY"
#
# Sets ELSPETH_ROOT (the checkout), ELSPETH_VENV and ELSPETH_PY (the venv's python).
# Knobs: ELSPETH_VENV (default <checkout>/.venv), PYTHON (interpreter that creates the venv,
# default python3), ELSPETH_EXTRAS (default "test").
#
# The install is skipped when pyproject.toml has not changed since the last one (the install is
# editable, so code changes need no reinstall).

ELSPETH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ELSPETH_VENV="${ELSPETH_VENV:-$ELSPETH_ROOT/.venv}"
ELSPETH_PY="$ELSPETH_VENV/bin/python"
export ELSPETH_ROOT ELSPETH_VENV ELSPETH_PY

if [ ! -x "$ELSPETH_PY" ]; then
    echo "bootstrap: creating $ELSPETH_VENV" >&2
    "${PYTHON:-python3}" -m venv "$ELSPETH_VENV"
    "$ELSPETH_PY" -m pip install --quiet --upgrade pip
fi

_elspeth_extras="${ELSPETH_EXTRAS:-test}"
_elspeth_stamp="$ELSPETH_VENV/.airflow-elspeth-installed"
_elspeth_want="$(cat "$ELSPETH_ROOT/pyproject.toml") [$_elspeth_extras]"
if [ ! -f "$_elspeth_stamp" ] || [ "$(cat "$_elspeth_stamp")" != "$_elspeth_want" ]; then
    echo "bootstrap: pip install -e \".[$_elspeth_extras]\"" >&2
    "$ELSPETH_PY" -m pip install --quiet -e "$ELSPETH_ROOT[$_elspeth_extras]"
    printf '%s' "$_elspeth_want" >"$_elspeth_stamp"
fi
unset _elspeth_extras _elspeth_stamp _elspeth_want
