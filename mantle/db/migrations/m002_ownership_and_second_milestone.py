"""The second milestone's schema (SPEC 13).

- ``nodes`` replaces ``runners``: every process that runs executions registers one row with a
  random id and a lease timed by the database's clock (13.7); ``host_key`` names the kernel
  and pid namespace it runs in, so a node can tell that another node's process is gone;
- executions get an ``owner`` node and a fencing ``epoch`` (13.7) instead of ``runner``,
  ``running_since`` and ``hooks_since`` (timeouts count from there, also after a crash: 13.1.9,
  13.1.11), and their place in a tree of sub-workflows (13.3);
- step attempts get a durable wait (``wait_kind``, ``wait_until``: a sleep or a retry back-off,
  13.1.11) and ``progress`` (a connector's checkpoint inside an attempt, e.g. AI tool rounds);
- ``credentials`` holds encrypted credentials (13.2);
- API keys get a ``role`` (existing keys become ``admin``) and an optional expiry (13.8).

Frozen like 001: plain SQL per engine, nothing imported from the live models.
"""

from __future__ import annotations

import peewee

__all__ = ["NAME", "up", "down"]

NAME = "002_ownership_and_second_milestone"


def _is_postgres(database: peewee.Database) -> bool:
    return isinstance(database, peewee.PostgresqlDatabase)


def _types(database: peewee.Database) -> dict[str, str]:
    if _is_postgres(database):
        return {"time": "TIMESTAMP", "text": "TEXT", "int": "INTEGER"}
    return {"time": "DATETIME", "text": "TEXT", "int": "INTEGER"}


def up(database: peewee.Database) -> None:
    t = _types(database)
    run = database.execute_sql
    run(f"""CREATE TABLE nodes (
        id VARCHAR(36) NOT NULL PRIMARY KEY,
        hostname VARCHAR(255) NOT NULL,
        pid {t['int']} NOT NULL,
        kind VARCHAR(16) NOT NULL,
        host_key VARCHAR(64) NOT NULL,
        channel VARCHAR(255),
        started_at {t['time']} NOT NULL,
        lease_expires_at {t['time']} NOT NULL)""")
    run("CREATE INDEX nodes_lease_expires_at ON nodes (lease_expires_at)")
    run("DROP TABLE runners")

    run("DROP INDEX workflow_executions_runner_status")
    run("ALTER TABLE workflow_executions DROP COLUMN runner")
    for column, kind in (("owner", "VARCHAR(36)"), ("epoch", f"{t['int']} NOT NULL DEFAULT 0"),
                         ("running_since", t["time"]), ("hooks_since", t["time"]),
                         ("parent_execution_id", "VARCHAR(36)"),
                         ("parent_step", "VARCHAR(255)"),
                         ("depth", f"{t['int']} NOT NULL DEFAULT 1")):
        run(f"ALTER TABLE workflow_executions ADD COLUMN {column} {kind}")
    run("CREATE INDEX workflow_executions_owner_status ON workflow_executions (owner, status)")
    run("CREATE INDEX workflow_executions_parent_execution_id "
        "ON workflow_executions (parent_execution_id)")
    run("CREATE INDEX workflow_executions_completed_at ON workflow_executions (completed_at)")

    for column, kind in (("wait_kind", "VARCHAR(16)"), ("wait_until", t["time"]),
                         ("progress", t["text"])):
        run(f"ALTER TABLE step_executions ADD COLUMN {column} {kind}")

    run(f"""CREATE TABLE credentials (
        name VARCHAR(255) NOT NULL PRIMARY KEY,
        type VARCHAR(16) NOT NULL,
        ciphertext {t['text']} NOT NULL,
        nonce VARCHAR(32) NOT NULL,
        key_id VARCHAR(16) NOT NULL,
        created_at {t['time']} NOT NULL,
        updated_at {t['time']} NOT NULL)""")

    run("ALTER TABLE api_keys ADD COLUMN role VARCHAR(16) NOT NULL DEFAULT 'admin'")
    run(f"ALTER TABLE api_keys ADD COLUMN expires_at {t['time']}")


def down(database: peewee.Database) -> None:
    t = _types(database)
    run = database.execute_sql
    run("ALTER TABLE api_keys DROP COLUMN expires_at")
    run("ALTER TABLE api_keys DROP COLUMN role")
    run("DROP TABLE credentials")
    for column in ("progress", "wait_until", "wait_kind"):
        run(f"ALTER TABLE step_executions DROP COLUMN {column}")
    for index in ("workflow_executions_completed_at", "workflow_executions_parent_execution_id",
                  "workflow_executions_owner_status"):
        run(f"DROP INDEX {index}")
    for column in ("depth", "parent_step", "parent_execution_id", "hooks_since",
                   "running_since", "epoch", "owner"):
        run(f"ALTER TABLE workflow_executions DROP COLUMN {column}")
    run("ALTER TABLE workflow_executions ADD COLUMN runner VARCHAR(255)")
    run("CREATE INDEX workflow_executions_runner_status ON workflow_executions (runner, status)")
    run("DROP TABLE nodes")
    run(f"""CREATE TABLE runners (
        id VARCHAR(255) NOT NULL PRIMARY KEY,
        hostname VARCHAR(255) NOT NULL,
        pid {t['int']} NOT NULL,
        started_at {t['time']} NOT NULL,
        heartbeat_at {t['time']} NOT NULL)""")
