"""Alembic migrations of the inspection database (run by ``database.migrate`` at start-up)."""
