"""SQL helpers the read models share (per dialect)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, case, cast, func


def json_field(engine: Engine, column: Any, key: str) -> Any:
    """The text of ``key`` in a JSON object column, per dialect."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB

        return cast(column, JSONB).op("->>")(key)
    return func.json_extract(column, f"$.{key}")


def json_list_elements(engine: Engine, column: Any) -> Any:
    """The elements of a JSON list column as a table of one text column, ``value``, per dialect: a
    FROM item that reads ``column`` of the FROM items before it (both dialects allow that without
    ``LATERAL``). A value that is JSON but no list has no elements on either (SQLite would walk an
    object's values, PostgreSQL refuse it); JSON that does not parse raises on both, as the
    replay's ``json.loads`` does."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import JSON

        as_json = cast(column, JSON)
        a_list = case((func.json_typeof(as_json) == "array", as_json), else_=func.json_build_array())
        return func.json_array_elements_text(a_list).table_valued("value")
    a_list = case((func.json_type(column) == "array", column), else_="[]")
    return func.json_each(a_list).table_valued("value")
