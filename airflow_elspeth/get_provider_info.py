"""Provider metadata, read by Airflow's ProvidersManager through the ``apache_airflow_provider``
entry point. Kept free of imports so that reading it never loads the provider itself.

The connection form (``ui-field-behaviour``, ``conn-fields``) is declared here because Airflow 3.2+
reads it from provider info instead of importing the hook; it mirrors
``ElspethAuditHook.get_ui_field_behaviour`` (a test keeps the two in step).
"""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-elspeth",
        "name": "Elspeth",
        "description": (
            "Audited per-row fork/join for Apache Airflow 3: N-of-M coalesce with deadlines and an "
            "audit trail of every decision.\n"
        ),
        "versions": ["0.1.0"],
        "integrations": [
            {
                "integration-name": "Elspeth",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": "Elspeth",
                "python-modules": [
                    "airflow_elspeth.operators.fork",
                    "airflow_elspeth.operators.branch",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": "Elspeth",
                "python-modules": ["airflow_elspeth.sensors.coalesce"],
            }
        ],
        "triggers": [
            {
                "integration-name": "Elspeth",
                "python-modules": ["airflow_elspeth.triggers.coalesce"],
            }
        ],
        "hooks": [
            {
                "integration-name": "Elspeth",
                "python-modules": ["airflow_elspeth.hooks.audit"],
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_elspeth.hooks.audit.ElspethAuditHook",
                "hook-name": "Elspeth Audit Store",
                "connection-type": "elspeth",
                "ui-field-behaviour": {
                    "hidden-fields": [],
                    "relabeling": {"schema": "Database"},
                    "placeholders": {
                        "host": "postgres.example.com",
                        "port": "5432",
                        "schema": "elspeth_audit",
                        "login": "elspeth",
                        "sqlalchemy_url": (
                            "postgresql+psycopg2://user:password@host:5432/database (overrides the fields)"
                        ),
                        "drivername": "postgresql+psycopg2",
                    },
                },
                "conn-fields": {
                    "sqlalchemy_url": {
                        "label": "SQLAlchemy URL",
                        "description": "Complete SQLAlchemy URL; when set, the fields above are ignored.",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "drivername": {
                        "label": "SQLAlchemy driver",
                        "description": "Dialect+driver for host/port/login/password/schema.",
                        "schema": {"type": ["string", "null"], "default": "postgresql+psycopg2"},
                    },
                },
            }
        ],
        "plugins": [
            {"name": "elspeth", "plugin-class": "airflow_elspeth.plugins.elspeth.ElspethPlugin"},
        ],
        "extra-links": ["airflow_elspeth.sensors.coalesce.CoalesceAuditLink"],
        "config": {
            "elspeth": {
                "description": "Options of the Elspeth fork/join provider (airflow-elspeth).",
                "options": {
                    "audit_conn_id": {
                        "description": (
                            "Connection id of the audit store, used when an operator gives no "
                            "``audit_conn_id``. Empty: the connection ``elspeth_audit_default`` if it "
                            "exists, else the embedded SQLite file ``$AIRFLOW_HOME/elspeth_audit.db`` "
                            "(one machine only; use PostgreSQL with several workers).\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "elspeth_audit_pg",
                        "default": "",
                    },
                    "chunk_size": {
                        "description": (
                            "Rows per chunk when an operator gives no ``chunk_size``: the unit of "
                            "transactions, of mapped branch tasks and of the coalesce's bookkeeping. "
                            "Memory stays bounded by it.\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "5000",
                        "default": "1000",
                    },
                    "max_row_bytes": {
                        "description": (
                            "The largest source row, and the largest branch output, as canonical JSON "
                            "(bytes). A fork given a larger row fails naming the row key and the limit, "
                            "keeping nothing of its audit run; a larger branch output is that row's "
                            "loss ``error:PayloadLimitExceeded``. Checked by a walk that stops at the "
                            "limit, so a row of any shape (a shared-reference structure expanding to "
                            "2**50 values included) costs at most this much work and memory. A task "
                            "holds up to a write of rows (the fork whole chunks, a branch step "
                            "``batch_size`` results): this times that many rows bounds its memory.\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "10485760",
                        "default": "1048576",
                    },
                },
            }
        },
    }
