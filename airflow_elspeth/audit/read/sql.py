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
