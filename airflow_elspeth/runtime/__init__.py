"""Runtimes of the tasks, without Airflow: the threads a task runs on, over the audit store."""
