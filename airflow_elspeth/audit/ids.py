"""The ids of schema 0.2: readable, and computable in SQL from the events' integer keys.

A row is ``<run_no>.<row_no>`` (its run's number in the store, its index in the fork's input); its
tokens and groups extend that id. Migration 0006's views compute the same strings in SQL (one
expression per id, spelled out there); ``tests/audit/test_ids.py`` checks that the views and these
functions agree. A retried writer computes the same ids, so its idempotent inserts store nothing
twice. SQL-free and Airflow-free.
"""

from __future__ import annotations


def row_id(run_no: int, row_no: int) -> str:
    return f"{run_no}.{row_no}"


def row_numbers(row: str) -> tuple[int, int]:
    """(run_no, row_no) of a row id made by :func:`row_id`.

    :raises ValueError: for a string that is not such an id.
    """
    run_no, separator, row_no = row.partition(".")
    if not separator or not run_no.isdigit() or not row_no.isdigit():
        raise ValueError(f"{row!r} is not an audit row id (<run_no>.<row_no>)")
    return int(run_no), int(row_no)


def source_token_id(row: str) -> str:
    return f"{row}:s"


def branch_token_id(row: str, branch: str) -> str:
    return f"{row}:b:{branch}"


def branch_of_token(token: str) -> tuple[str, str]:
    """(row id, branch) of a branch token id made by :func:`branch_token_id`.

    :raises ValueError: for a string that is not such an id.
    """
    row, separator, branch = token.partition(":b:")
    if not separator or not branch:
        raise ValueError(f"{token!r} is not a branch token id (<row>:b:<branch>)")
    row_numbers(row)
    return row, branch


def merged_token_id(row: str, coalesce: str) -> str:
    return f"{row}:m:{coalesce}"


def merged_token_of(token: str) -> tuple[str, str]:
    """(row id, coalesce) of a merged token id made by :func:`merged_token_id`.

    :raises ValueError: for a string that is not such an id.
    """
    row, separator, coalesce = token.partition(":m:")
    if not separator or not coalesce:
        raise ValueError(f"{token!r} is not a merged token id (<row>:m:<coalesce>)")
    row_numbers(row)
    return row, coalesce


def join_group_id(row: str, coalesce: str) -> str:
    return f"{row}:j:{coalesce}"


def fork_group_id(row: str) -> str:
    return f"{row}:f"


def state_id(token: str, node_id: str, attempt: int) -> str:
    """A branch token's result at a step; a merged token's state id is the token's own."""
    return f"{token}@{node_id}#{attempt}"
