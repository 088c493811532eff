"""airflow-elspeth: audited per-row fork/join for Apache Airflow 3.

The public API is imported lazily so that the pure core (``airflow_elspeth.core``) and the audit
store can be used without loading Airflow.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "ForkOperator": "airflow_elspeth.operators.fork",
    "BranchOperator": "airflow_elspeth.operators.branch",
    "CoalesceSensor": "airflow_elspeth.sensors.coalesce",
    "CoalesceTrigger": "airflow_elspeth.triggers.coalesce",
    "ElspethAuditHook": "airflow_elspeth.hooks.audit",
    "read_merged_rows": "airflow_elspeth.merged_rows",
    "fork_join": "airflow_elspeth.operators.group",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'airflow_elspeth' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
