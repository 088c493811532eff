"""Every exception airflow-elspeth raises on purpose, in one hierarchy.

``except ElspethError`` catches all of them. Each also derives from the built-in exception a caller
would expect (``ValueError`` for bad input, ``LookupError`` for something absent), so code written
against those keeps working. This module imports nothing from Airflow: the core and the audit layer
raise these too.
"""

from __future__ import annotations


class ElspethError(Exception):
    """Base of every airflow-elspeth error."""


class ElspethConfigError(ElspethError, ValueError):
    """Invalid fork/branch/coalesce configuration; the message names the parameter and the bad value.

    Raised from a task (its constructor, or its run for the audit store's configuration), the
    message also starts with the DAG and the task (:meth:`located`): Airflow shows an import error's
    traceback cut to its last frames, which are the provider's, not the DAG file's.
    """

    dag_id: str | None = None
    task_id: str | None = None

    def located(self, dag_id: str | None, task_id: str | None) -> ElspethConfigError:
        """This error, of the same class, with the DAG and the task named in front of its message.

        An error already located is returned as it is (an inner task's names stand).

        :param dag_id: the task's DAG; None while the task has none yet (it is added to one later).
        :param task_id: the task.
        """
        if self.task_id is not None or task_id is None:
            return self
        where = f"DAG {dag_id!r}, task {task_id!r}" if dag_id is not None else f"task {task_id!r}"
        error = type(self)(f"{where}: {self}")
        error.dag_id, error.task_id = dag_id, task_id
        return error


class TopologyError(ElspethConfigError):
    """The DAG's fork/branch/coalesce structure is invalid; the message names the tasks involved."""


class PayloadError(ElspethError, ValueError):
    """A row or output that cannot be stored as canonical JSON (NaN, Infinity, non-JSON types)."""


class PayloadLimitExceeded(PayloadError):
    """A row or output larger than its limit as canonical JSON (``[elspeth] max_row_bytes`` for rows
    and branch outputs) or nested deeper than ``MAX_PAYLOAD_DEPTH``; found by a walk that stops at
    the limit, so the payload is never serialised whole."""


class ForkInputError(ElspethError, ValueError):
    """A row the fork cannot take (not a JSON object, no key, duplicate key, NaN/Infinity)."""


class BranchFailureThresholdError(ElspethError):
    """Too many rows of a branch step failed: a systematic error fails the task (its retry tries them
    again)."""


class AuditInvariantError(ElspethError):
    """The audit store holds something its own writers never produce (a decision without its fork's
    completion time, a decided row missing from its run). A bug or a hand-edited store, never input."""


class NotFound(ElspethError, LookupError):
    """The DAG run, audit run, coalesce, row or task asked for is not in the audit store."""


class NoAuditStore(NotFound):
    """Nothing has been recorded yet: the embedded SQLite file does not exist."""


class AirflowStatesUnavailable(ElspethError):
    """Airflow's metadata DB is not importable, configured or readable from here."""


class ForkRunMissing(NotFound):
    """A task needs its fork's audit run and this DAG run's fork has not pushed one (the fork has not
    succeeded in this DAG run). The task fails; Airflow retries it if it has retries left."""


class AuditStoreUnreachable(ElspethError, ConnectionError):
    """The audit store stayed unreachable past the coalesce's grace (its deadline plus
    ``TRANSIENT_ERROR_GRACE``): the try fails so that Airflow retries it. Not an ``AirflowException``,
    so a sensor's ``soft_fail`` does not turn it into a skip."""


class ElspethDagWarning(UserWarning):
    """A DAG whose structure is sound but certain to fail some rows (a ``require_all`` coalesce fed
    by a step that may drop rows, or by an earlier step without ``row_retries``). Issued by the
    cluster policy at parse time (``airflow_elspeth/policies.py``), never raised."""
