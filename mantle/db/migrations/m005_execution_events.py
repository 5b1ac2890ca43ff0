"""Execution events from stored state (SPEC 13.8, ``/api/v1/.../events``; issue 15).

The audit trail already records, in the engine's own transactions, when an execution starts
running (``workflow.executed``) and every step and hook attempt (``step.started``,
``step.completed`` ...); the event streams read it in ``id`` order. Two things were missing:

- the end of an execution: a trigger on ``workflow_executions`` appends an
  ``execution.finished`` row (metadata ``workflow``, ``status``, ``error``) in the same
  transaction as the change of ``status`` to ``completed``, ``failed`` or ``cancelled``,
  whoever writes it (the owner, a cancel from any process or host);
- finding one execution's rows: an index on the execution id, which is the ``resource_id`` of
  ``workflow_execution`` rows and the ``execution_id`` in the metadata of the others.

Frozen like 001: plain SQL per engine, nothing imported from the live models.
"""

from __future__ import annotations

import peewee

__all__ = ["NAME", "up", "down", "EXECUTION_KEY_SQLITE", "EXECUTION_KEY_POSTGRES"]

NAME = "005_execution_events"

# The indexed expression; queries must spell it the same way to use the index.
EXECUTION_KEY_SQLITE = ("(CASE WHEN resource_type = 'workflow_execution' THEN resource_id "
                        "ELSE json_extract(metadata, '$.execution_id') END)")
# A pattern on the text, not ``metadata::json``: PostgreSQL's JSON operators refuse a document
# holding an escaped NUL (a step error may, SPEC 13.1.12), and an index expression that fails
# makes the engine's insert fail. Metadata is compact JSON (``"execution_id":"<uuid>"``), and
# a ``"`` inside a JSON string is escaped, so the pattern matches the key itself only.
EXECUTION_KEY_POSTGRES = ("(CASE WHEN resource_type = 'workflow_execution' THEN resource_id "
                          "ELSE substring(metadata from '\"execution_id\":\"([0-9a-f-]{36})\"')"
                          " END)")

_FINAL = "('completed', 'failed', 'cancelled')"


def _is_postgres(database: peewee.Database) -> bool:
    return isinstance(database, peewee.PostgresqlDatabase)


def up(database: peewee.Database) -> None:
    run = database.execute_sql
    if _is_postgres(database):
        run(f"CREATE INDEX audit_events_execution ON audit_events ({EXECUTION_KEY_POSTGRES}, id)")
        run("""CREATE FUNCTION mantle_execution_finished() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO audit_events (timestamp, actor, action, resource_type, resource_id,
                                          metadata)
                VALUES (COALESCE(NEW.completed_at, now() AT TIME ZONE 'UTC'), 'engine',
                        'execution.finished', 'workflow_execution', NEW.id,
                        json_build_object('workflow', NEW.workflow_name, 'status', NEW.status,
                                          'error', NEW.error)::text);
                RETURN NULL;
            END $$""")
        run(f"""CREATE TRIGGER workflow_executions_finished
            AFTER UPDATE OF status ON workflow_executions FOR EACH ROW
            WHEN (NEW.status IN {_FINAL} AND OLD.status NOT IN {_FINAL})
            EXECUTE FUNCTION mantle_execution_finished()""")
        return
    run(f"CREATE INDEX audit_events_execution ON audit_events ({EXECUTION_KEY_SQLITE}, id)")
    # Stored times have six fractional digits (mantle.db.fields.SQLITE_DATETIME_FORMAT).
    run(f"""CREATE TRIGGER workflow_executions_finished
        AFTER UPDATE OF status ON workflow_executions FOR EACH ROW
        WHEN NEW.status IN {_FINAL} AND OLD.status NOT IN {_FINAL}
        BEGIN
            INSERT INTO audit_events (timestamp, actor, action, resource_type, resource_id,
                                      metadata)
            VALUES (COALESCE(NEW.completed_at, strftime('%Y-%m-%d %H:%M:%f000', 'now')),
                    'engine', 'execution.finished', 'workflow_execution', NEW.id,
                    json_object('workflow', NEW.workflow_name, 'status', NEW.status,
                                'error', NEW.error));
        END""")


def down(database: peewee.Database) -> None:
    run = database.execute_sql
    run("DROP TRIGGER workflow_executions_finished" +
        (" ON workflow_executions" if _is_postgres(database) else ""))
    if _is_postgres(database):
        run("DROP FUNCTION mantle_execution_finished()")
    run("DROP INDEX audit_events_execution")
