"""Make the checkout importable when the package is not installed into the environment."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("airflow_elspeth") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
