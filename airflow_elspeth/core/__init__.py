"""The pure core: policy replay, merging, configuration and hashing.

Nothing in this package imports Airflow or SQL; the shells (operators, sensor, trigger, CLI, UI) read
the audit store, call into here, and write what comes back.
"""
