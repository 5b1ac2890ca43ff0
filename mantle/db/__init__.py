"""Database access: connection from a URL, models bound through a proxy, migrations.

``connect(url)`` opens SQLite or PostgreSQL, ``bind(db)`` points the models
(``mantle.db.models``) at it, ``mantle.db.migrations`` brings the schema to head. SQL that
differs between the engines lives in ``mantle.db.engine``.
"""

from __future__ import annotations

from mantle.db.connect import (OUTAGE_ERRORS, bind, close_all, connect, database_proxy, is_outage,
                               is_postgres, is_sqlite, release_connection, reserve_connection,
                               reset_connection, unwrap)
from mantle.db.engine import (claim_rows, lock_for_update, transaction, upsert,
                              write_transaction)

__all__ = [
    "database_proxy", "connect", "bind", "unwrap", "is_sqlite", "is_postgres",
    "OUTAGE_ERRORS", "is_outage", "close_all", "release_connection", "reserve_connection",
    "reset_connection", "transaction", "write_transaction", "lock_for_update", "claim_rows",
    "upsert",
]
