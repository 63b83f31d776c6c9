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
                connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            else:
                for table in reversed(Base.metadata.sorted_tables):
                    connection.execute(delete(table))
    finally:
        engine.dispose()
