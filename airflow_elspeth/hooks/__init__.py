"""Hooks of the Elspeth provider (``airflow_elspeth.hooks.audit.ElspethAuditHook``)."""
