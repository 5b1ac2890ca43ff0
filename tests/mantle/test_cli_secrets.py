"""``mantle secrets`` through the real command line (SPEC 13.2), on SQLite and PostgreSQL:
exact output, errors that store nothing, values absent from the database's bytes, rotation
(old key refused, new key used by a real run), and a rotation killed half-way."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from mantle import credentials
from mantle.db import write_transaction
from mantle.db.models import AuditEvent, WorkflowExecution
from mantle.db.models import Credential as CredentialRow
from tests.helpers.waiting import apply_yaml, wait_until
from tests.pg import PG_BIN
from tests.web.support import REPO, cli

OLD = "0123456789abcdef" * 4
NEW = "fedcba9876543210" * 4
TOKEN = "tok-Vq81-zzKp0-secret"


@pytest.fixture
def secrets_cli(tmp_path, db, migrated_db_url):
    """``mantle <args>`` on this case's database with MANTLE_ENCRYPTION_KEY=OLD (or ``key``)."""
    def run(*args: str, key: str | None = OLD) -> subprocess.CompletedProcess:
        env = {} if key is None else {"MANTLE_ENCRYPTION_KEY": key}
        return cli(tmp_path, migrated_db_url, *args, env=env)
    return run


def _ok(result: subprocess.CompletedProcess) -> str:
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return result.stdout


def test_create_list_and_delete_print_the_specs_lines(secrets_cli):
    assert _ok(secrets_cli("secrets", "list")) == "(no credentials)\n"
    assert _ok(secrets_cli("secrets", "create", "--name", "github-token", "--type", "bearer",
                           "--field", f"token={TOKEN}")) == \
        'Created credential "github-token" (type: bearer)\n'
    assert _ok(secrets_cli("secrets", "create", "--name", "db", "--type", "postgres",
                           "--field", "url=postgresql://u:p@h/d")) == \
        'Created credential "db" (type: postgres)\n'
    listed = _ok(secrets_cli("secrets", "list")).splitlines()
    # Columns padded to the longest value plus 2; names in order; never a value.
    assert listed[0] == "NAME          TYPE      CREATED"
    assert re.fullmatch(r"db            postgres  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", listed[1])
    assert re.fullmatch(r"github-token  bearer    \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", listed[2])
    assert len(listed) == 3
    assert _ok(secrets_cli("secrets", "delete", "--name", "db")) == 'Deleted credential "db"\n'
    assert [row.name for row in CredentialRow.select()] == ["github-token"]


def test_bad_secrets_commands_answer_the_specs_errors_and_store_nothing(secrets_cli):
    cases = [
        (["create", "--name", "a", "--type", "ssh", "--field", "key=v"], OLD,
         'unknown credential type "ssh": must be one of generic, bearer, openai, basic, '
         "postgres"),
        (["create", "--name", "a", "--type", "basic", "--field", "username=u"], OLD,
         'field "password" is required for credential type "basic"'),
        (["create", "--name", "a", "--type", "generic", "--field", "key=v"], None,
         "encryption key is not configured — set MANTLE_ENCRYPTION_KEY"),
        (["create", "--name", "a", "--type", "generic", "--field", "key=v"], "abc",
         "invalid encryption key: must be 64 hex characters"),
        (["create", "--name", "Bad_Name", "--type", "generic", "--field", "key=v"], OLD,
         'invalid credential name "Bad_Name": must match ^[a-z][a-z0-9-]*$'),
        (["create", "--name", "a", "--type", "generic", "--field", "v-without-key"], OLD,
         "invalid --field argument: expected key=value"),
        # bytes that are not UTF-8: stored, they would be another secret than the one given
        (["create", "--name", "a", "--type", "generic", "--field", os.fsdecode(b"key=v\xff")],
         OLD, 'field "key" must be UTF-8 text'),
        (["delete", "--name", "ghost"], OLD, 'credential "ghost" not found'),
        (["rotate-key"], None, "encryption key is not configured — set MANTLE_ENCRYPTION_KEY"),
        (["rotate-key", "--new-key", "xyz"], OLD,
         "invalid encryption key: must be 64 hex characters"),
    ]
    for args, key, message in cases:
        result = secrets_cli("secrets", *args, key=key)
        assert (result.returncode, result.stdout, result.stderr) == \
            (1, "", f"Error: {message}\n"), args
    assert CredentialRow.select().count() == 0
    assert AuditEvent.select().count() == 0

    _ok(secrets_cli("secrets", "create", "--name", "a", "--type", "generic", "--field", "key=v"))
    again = secrets_cli("secrets", "create", "--name", "a", "--type", "generic",
                        "--field", "key=other")
    assert (again.returncode, again.stderr) == (1, 'Error: credential "a" already exists\n')


def test_unknown_fields_are_ignored_with_a_warning_on_stderr(secrets_cli):
    result = secrets_cli("secrets", "create", "--name", "ai", "--type", "openai",
                         "--field", "api_key=sk-1", "--field", "org_id=org-1",
                         "--field", "colour=red")
    assert result.returncode == 0 and result.stdout == 'Created credential "ai" (type: openai)\n'
    assert '"msg":"unknown credential field ignored","field":"colour","type":"openai"' in \
        result.stderr
    stored = credentials.read("ai", credentials.parse_key(OLD))
    assert dict(stored.fields) == {"api_key": "sk-1", "org_id": "org-1"}


def _database_bytes(backend: str, url: str, tmp_path: Path) -> bytes:
    """Everything the database holds on disk (SQLite: the file and its WAL) or in a pg_dump."""
    if backend == "sqlite":
        path = Path(url[len("sqlite:///"):])
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    dump = subprocess.run([str(PG_BIN / "pg_dump"), "--no-owner", url], capture_output=True,
                          timeout=60, check=True)
    return dump.stdout


def test_after_secrets_create_the_value_is_nowhere_in_the_database(
        secrets_cli, backend, migrated_db_url, tmp_path):
    if backend == "postgres" and not (PG_BIN / "pg_dump").is_file():
        pytest.skip("pg_dump not installed")
    _ok(secrets_cli("secrets", "create", "--name", "vault-token", "--type", "basic",
                    "--field", "username=deploy-bot", "--field", f"password={TOKEN}"))
    data = _database_bytes(backend, migrated_db_url, tmp_path)
    assert b"vault-token" in data  # the row is in what was read
    assert TOKEN.encode() not in data
    assert b"deploy-bot" not in data
    assert OLD.encode() not in data


CALL = """
    name: call
    steps:
      - name: fetch
        action: http/request
        credential: api
        params: {{url: "{url}"}}
"""


def test_after_rotate_key_the_old_key_fails_the_step_and_the_new_one_works(
        secrets_cli, http_target):
    http_target.route("/whoami", json={"ok": True})
    apply_yaml(CALL.format(url=http_target.url("/whoami")))
    _ok(secrets_cli("secrets", "create", "--name", "api", "--type", "bearer",
                    "--field", f"token={TOKEN}"))
    rotated = _ok(secrets_cli("secrets", "rotate-key", "--new-key", NEW))
    assert rotated == ("Re-encrypted 1 credential(s).\n"
                       "Update MANTLE_ENCRYPTION_KEY to the new key and restart.\n")

    old = secrets_cli("run", "call", key=OLD)
    assert old.returncode == 1
    assert old.stderr.splitlines()[-1] == ('Error: step "fetch" failed: credential "api" '
                                           "cannot be decrypted with the configured key")
    assert http_target.hits("/whoami") == 0
    new = secrets_cli("run", "call", key=NEW)
    assert new.returncode == 0, new.stderr
    assert http_target.requests("/whoami")[0].header("Authorization") == f"Bearer {TOKEN}"

    generated = _ok(secrets_cli("secrets", "rotate-key", key=NEW)).splitlines()
    assert generated[0] == "Re-encrypted 1 credential(s)."
    assert re.fullmatch(r"New key: [0-9a-f]{64}", generated[1])
    assert generated[2] == "Update MANTLE_ENCRYPTION_KEY to the new key and restart."
    newest = generated[1].split(": ")[1]
    assert credentials.read("api", credentials.parse_key(newest)).fields == {"token": TOKEN}


# --- a rotation killed in the middle of its transaction ---

def _in_rotation_transaction(backend: str, url: str):
    """A probe: True once another process is inside the rotation's write transaction
    (PostgreSQL: it holds a row lock on credentials, i.e. it has updated a row; SQLite: it
    holds the file's write lock)."""
    if backend == "postgres":
        conn = psycopg.connect(url, autocommit=True)

        def probe() -> bool:
            return conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE c.relname = 'credentials' AND l.mode = 'RowExclusiveLock' "
                "AND l.granted AND l.pid <> pg_backend_pid()").fetchone()[0] > 0
        return probe, conn.close
    conn = sqlite3.connect(url[len("sqlite:///"):], timeout=0, isolation_level=None)

    def probe() -> bool:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc)
            return True
        conn.execute("ROLLBACK")
        return False
    return probe, conn.close


def _readable_with(names: list[str]) -> set[str]:
    """Which of OLD/NEW opens each credential ("mixed" would be a broken rotation)."""
    opened = set()
    for name in names:
        for label, text in (("old", OLD), ("new", NEW)):
            try:
                credentials.read(name, credentials.parse_key(text))
                opened.add(label)
                break
            except credentials.CannotDecrypt:
                continue
        else:
            opened.add("unreadable")
    return opened


@pytest.mark.timeout(300)
def test_sigkill_during_rotation_of_1000_credentials_leaves_all_readable_with_one_key(
        backend, db, migrated_db_url, tmp_path):
    names = [f"cred-{i:04d}" for i in range(1000)]
    old = credentials.parse_key(OLD)
    with write_transaction():
        for name in names:
            credentials.create(name, "generic", {"key": f"value-of-{name}"}, old)
    argv = [sys.executable, "-m", "mantle", "secrets", "rotate-key", "--new-key", NEW,
            "--database-url", migrated_db_url]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
           "MANTLE_ENCRYPTION_KEY": OLD}
    killed_mid_way = 0
    # Kill ever later into the transaction until the commit wins the race: every kill before
    # it must leave all 1,000 readable with the old key, the one after it all with the new.
    for delay in (0.0, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56):
        process = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        probe, close = _in_rotation_transaction(backend, migrated_db_url)
        try:
            wait_until(lambda: probe() or process.poll() is not None, timeout=60,
                       interval=0.001, message="the rotation never began")
        finally:
            close()
        time.sleep(delay)  # where in the transaction the kill lands; any place must be safe
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        opened = _readable_with(names)
        assert len(opened) == 1, f"after a kill {delay}s in: {opened}"
        if opened == {"new"}:
            break  # the commit came first
        assert opened == {"old"}
        killed_mid_way += 1
        # A killed rotation left no partial state behind: it can simply be run again.
    assert killed_mid_way >= 1, "no kill landed inside the transaction"
    finished = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    assert finished.stdout.startswith("Re-encrypted 1000 credential(s).\n"), finished
    assert _readable_with(names) == {"new"}
    assert credentials.read("cred-0999", credentials.parse_key(NEW)).fields == \
        {"key": "value-of-cred-0999"}
    assert WorkflowExecution.select().count() == 0
