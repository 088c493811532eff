"""SQL helpers the read models share (per dialect)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, cast, func


def json_field(engine: Engine, column: Any, key: str) -> Any:
    """The text of ``key`` in a JSON object column, per dialect."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB

        return cast(column, JSONB).op("->>")(key)
    return func.json_extract(column, f"$.{key}")


def json_list_elements(engine: Engine, column: Any) -> Any:
    """The elements of a JSON list column as a table of one text column, ``value``, per dialect: a
    FROM item that reads ``column`` of the FROM items before it (both dialects allow that without
    ``LATERAL``)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import JSON

        return func.json_array_elements_text(cast(column, JSON)).table_valued("value")
    return func.json_each(column).table_valued("value")
