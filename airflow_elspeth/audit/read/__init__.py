"""Read models of the audit store, one module per question; nothing here writes or imports Airflow.

* ``runs``: which audit runs a DAG run has, the newest runs, the one to show, their coalesces.
* ``decisions``: what a coalesce decided: the summary (the one source of counts), pages of rows,
  filters, the missing-branch matrix, late arrivals, events per time slot.
* ``lineage``: one row from source to decision (the row page, ``explain``).
* ``tasks``: what one task is in the trail and what a branch step did.
* ``verify``: a stored decision against the replay of its stored log; every ``verify`` finding.
* ``limbo``: open work nothing will close (part of ``verify``).
* ``rows``: merged and source rows, streamed.
* ``work``: what a branch step still has to process.
* ``cache``: whole-run aggregates cached under a fingerprint of the run's progress.
"""
