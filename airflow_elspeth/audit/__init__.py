"""The audit store: schema (SQLAlchemy Core), migrations (Alembic), writes and streaming reads."""
