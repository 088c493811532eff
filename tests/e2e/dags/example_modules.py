"""The repository's example files (``dags/example_*.py``) loaded as modules of their own, for the
e2e files beside this one that deploy them unchanged (e2e_faults_examples.py, e2e_backfill.py),
which import it as the folder they are parsed from is on ``sys.path``. It defines nothing to
schedule."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[3] / "dags"


def load_example(path: Path, prefix: str) -> ModuleType:
    """Execute ``path`` as the module ``<prefix>__<its stem>`` (registered, as an import would be).

    :param path: an example file.
    :param prefix: what sets this loading apart, so two DAG files can load the same example.
    """
    name = f"{prefix}__{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
