"""Side-by-side benchmarks of airflow-elspeth (issue 6): ``python -m benchmarks --help``.

Not part of the test suite and not shipped in the distribution (``pyproject`` packages only
``airflow_elspeth*``).
"""
