"""The audit database (DuckDB): schema, versioning, writers and views (docs/database.md)."""

from memaudit.store.db import AuditStore
from memaudit.store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "AuditStore"]
