"""Side-by-side benchmarks of airflow-elspeth (issue 6): ``python -m benchmarks --help``.

Not part of the test suite and not shipped in the distribution (``pyproject`` packages only
``airflow_elspeth*``).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any


def run_for_json(command: list[str], what: str, **kwargs: Any) -> dict[str, Any]:
    """Run ``command`` (``subprocess.run`` keyword arguments allowed) and return the JSON object on
    the last line of its output.

    :raises RuntimeError: the command failed; the message names ``what`` and ends with its stderr.
    """
    proc = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result
