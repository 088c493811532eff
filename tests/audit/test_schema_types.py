"""The audit timestamp type: aware UTC in, aware UTC out, and the write paths' fused SQLite
conversion storing exactly what the type's own bind processor stores."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from airflow_elspeth.audit.schema import UTCDateTime, utc_sqlite_text

_dialect = sqlite.dialect()
_type_processor = UTCDateTime().dialect_impl(_dialect).bind_processor(_dialect)

OFFSETS = st.integers(-23 * 60, 23 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes)))


@settings(max_examples=500, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.one_of(st.just(timezone.utc), OFFSETS),
    )
)
def test_the_fused_sqlite_conversion_stores_what_the_type_stores(value: datetime) -> None:
    assert _type_processor is not None
    assert utc_sqlite_text(value) == _type_processor(value)


def test_the_fused_sqlite_conversion_refuses_naive_times_like_the_type() -> None:
    naive = datetime(2026, 12, 7, 8, 0)
    assert _type_processor is not None
    for convert in (utc_sqlite_text, _type_processor):
        with pytest.raises(ValueError, match="naive datetime"):
            convert(naive)
    assert utc_sqlite_text(None) is None
