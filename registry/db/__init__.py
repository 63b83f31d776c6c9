"""Database layer: ORM models, engine construction and the migration state check."""
