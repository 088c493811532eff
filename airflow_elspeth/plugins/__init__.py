"""The Elspeth audit UI for the Airflow 3 API server (``ElspethPlugin`` in :mod:`.elspeth`)."""
