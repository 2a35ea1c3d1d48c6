"""The job store: SQLAlchemy models and API for instances, series, jobs,
result objects and deliveries (SQLite by default, PostgreSQL by URL)."""
