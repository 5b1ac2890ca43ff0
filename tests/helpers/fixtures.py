"""Pytest fixtures from the helpers; the root conftest imports them."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.helpers.http_target import HttpTarget

__all__ = ["http_target", "read_only_url"]


@pytest.fixture
def http_target():
    """A fresh local HTTP server (``HttpTarget``), closed after the test."""
    with HttpTarget() as target:
        yield target


@pytest.fixture
def read_only_url(migrated_db_url, pg_cluster):
    """``migrated_db_url`` (PostgreSQL) as a role that may only read its tables."""
    role = f"reader_{uuid.uuid4().hex[:8]}"
    pg_cluster.execute(f"CREATE ROLE {role} LOGIN")
    try:
        with psycopg.connect(migrated_db_url, autocommit=True) as conn:
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
        url = migrated_db_url.replace("://postgres@", f"://{role}@", 1)
        assert url != migrated_db_url
        yield url
    finally:
        with psycopg.connect(migrated_db_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")  # its grants
        pg_cluster.execute(f"DROP ROLE {role}")
