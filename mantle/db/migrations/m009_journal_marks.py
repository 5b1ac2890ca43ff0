"""One round trip per journal transaction on PostgreSQL (issue 12.7): the checks that opened
each transaction go with its writes and COMMIT, and a mark says whether it committed.

A journal transaction used to open with a message of its own: BEGIN, its transaction id (to
ask, should the connection break while COMMIT is in flight, whether it committed), the
fencing check of its operations' executions and the current versions of the workflows its
runs start. The operations ran once the answer came, and their writes went with COMMIT in a
second message. The first round trip was half the journal's time under load.

Now one message, ``BEGIN; SELECT mantle_journal_check(...); <writes>; COMMIT``, does it
all. The operations run first, on the versions the process read before (a version changes
only on ``apply``); ``mantle_journal_check``:

- share-locks the executions the operations write for, and raises ``MJ001`` if one of
  them has another epoch than expected, or if a workflow's current version is not the one
  used: the transaction rolls back, and the journal writes the batch again the old way,
  which tells the refused operations apart (``mantle.services.journal``). It does not
  wait for those locks: one held by another writer (a cancel's, a takeover's) fails it at
  once (``55P03``), and the batch is written the old way too. Its operations asked their
  gates before the message went out (a run commits only while its caller waits, 1 s
  before its deadline), so the message must not wait after them; the old way waits for
  the locks before the gates are asked;
- sets the journal's mark (``journal_marks``: one row per journal, the number of its last
  committed transaction): when the connection breaks with COMMIT in flight, the mark tells
  whether it committed, where the transaction id is not known yet.

``journal_marks`` rows of journals gone for a week are deleted with dead nodes' rows
(``mantle.retention.prune_nodes``). PostgreSQL only: on SQLite a transaction's checks cost
no round trip, and its COMMIT either happens or fails there and then.
"""

from __future__ import annotations

import peewee

__all__ = ["NAME", "up", "down", "REFUSED_SQLSTATE", "check_function"]

NAME = "009_journal_marks"

# Raised by mantle_journal_check when a fence or a version no longer holds.
REFUSED_SQLSTATE = "MJ001"


def _is_postgres(database: peewee.Database) -> bool:
    return isinstance(database, peewee.PostgresqlDatabase)


def up(database: peewee.Database) -> None:
    if not _is_postgres(database):
        return
    run = database.execute_sql
    run("CREATE TABLE journal_marks (journal TEXT PRIMARY KEY, seq BIGINT NOT NULL, "
        "written_at TIMESTAMP NOT NULL)")
    run(check_function(starting=False))


def check_function(starting: bool) -> str:
    """``CREATE OR REPLACE`` of ``mantle_journal_check`` as this migration made it, or, with
    ``starting``, as migration 010 does: a fence's third value 1 also needs the execution
    ``running`` (the write starts an attempt: nothing starts after a cancel, SPEC 4.6)."""
    code = f"'{REFUSED_SQLSTATE}'"
    # fences: [{"c0": execution id, "c1": epoch(, "c2": 1 if starting)}] (no "c2" from a
    # node of the release before 010: a plain fence); versions: [{"c0": workflow, "c1":
    # version}] (the journal's JSON rows, mantle.store.statements).
    columns, status, held = "c0 TEXT, c1 INT", "", ""
    if starting:
        columns, status = "c0 TEXT, c1 INT, c2 INT", ", status"
        held = "\n                    AND (coalesce(f.c2, 0) = 0 OR e.status = 'running')"
    return f"""CREATE OR REPLACE FUNCTION mantle_journal_check(mark TEXT, mark_seq BIGINT,
                                                            fences JSON, versions JSON)
        RETURNS VOID LANGUAGE plpgsql AS $$
        DECLARE
            wanted INT := json_array_length(fences);
            held INT;
        BEGIN
            IF wanted > 0 THEN
                SELECT count(*) INTO held
                FROM (SELECT id, epoch{status} FROM workflow_executions
                      WHERE id IN (SELECT c0 FROM json_to_recordset(fences) AS f(c0 TEXT))
                      ORDER BY id FOR SHARE NOWAIT) AS e
                JOIN json_to_recordset(fences) AS f({columns})
                    ON f.c0 = e.id AND f.c1 = e.epoch{held};
                IF held <> wanted THEN
                    RAISE EXCEPTION 'an execution changed owner' USING ERRCODE = {code};
                END IF;
            END IF;
            IF json_array_length(versions) > 0 THEN
                SELECT count(*) INTO held
                FROM workflows AS w JOIN json_to_recordset(versions) AS v(c0 TEXT, c1 INT)
                    ON v.c0 = w.name AND v.c1 = w.current_version;
                IF held <> json_array_length(versions) THEN
                    RAISE EXCEPTION 'a workflow has a new version' USING ERRCODE = {code};
                END IF;
            END IF;
            INSERT INTO journal_marks (journal, seq, written_at)
            VALUES (mark, mark_seq, now() AT TIME ZONE 'UTC')
            ON CONFLICT (journal) DO UPDATE SET seq = excluded.seq,
                                                written_at = excluded.written_at;
        END $$"""


def down(database: peewee.Database) -> None:
    if not _is_postgres(database):
        return
    database.execute_sql("DROP FUNCTION mantle_journal_check(TEXT, BIGINT, JSON, JSON)")
    database.execute_sql("DROP TABLE journal_marks")
