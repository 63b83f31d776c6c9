"""Database chores shared by the fixtures and the module-scoped apps of some tests."""

from __future__ import annotations


def empty_tables(url: str) -> None:
    """Delete every row of a migrated database (what ``database_url`` does after each
    test), so the next test starts from empty tables."""
    from sqlalchemy import delete, text

    from registry.db.engine import make_engine
    from registry.db.models import Base

    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
                # The audit log refuses TRUNCATE (docs/governance.md): its trigger is
                # disabled and enabled again inside this transaction (as the table's owner).
                connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
                connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
                connection.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
            else:
                for table in reversed(Base.metadata.sorted_tables):
                    connection.execute(delete(table))
    finally:
        engine.dispose()
