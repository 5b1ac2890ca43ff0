"""Credentials and inputs through the command line (SPEC 6, 11, 13.2, 13.8), each through
real ``python -m mantle`` subprocesses on a real database; the test process reads the same
database to see what was stored.

- ``secrets create`` racing ``rotate-key`` never stores a credential under the old key.
- ``run --input`` with bytes that are not UTF-8 answers an ``Error:`` line.
- A plugin's stderr cut to 64 KiB keeps no part of the credential.
- A credential that cannot be sent as a header value is not echoed in the step error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from mantle import credentials
from mantle.db.models import StepExecution, WorkflowExecution
from tests.helpers.waiting import apply_yaml, wait_until
from tests.mantle.test_cli_run import Cli, finish

REPO = Path(__file__).resolve().parents[2]
OLD = "0123456789abcdef" * 4
NEW = "fedcba9876543210" * 4


@pytest.fixture
def cli(tmp_path, db, migrated_db_url) -> Cli:
    return Cli(tmp_path, migrated_db_url)


def _start(cwd: Path, url: str, *args: str, **env: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "mantle", *args, "--database-url", url]
    environ = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(cwd), **env}
    return subprocess.Popen(argv, cwd=cwd, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# --- 1. secrets create racing rotate-key (13.2) ---------------------------------------------

@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_credential_created_while_rotate_key_runs_is_refused_not_stored_under_the_old_key(
        db, migrated_db_url, tmp_path):
    """SPEC 13.2: rotate-key re-encrypts every credential, after which the operator switches
    to the new key. A ``secrets create`` run with the old key while the rotation runs
    waited for it and then stored its credential under the old key: unreadable once the
    key is switched. It now waits, sees the store is under another key, and is refused."""
    credentials.create("first", "generic", {"key": "v1"}, credentials.parse_key(OLD))
    holder = psycopg.connect(migrated_db_url)  # holds the rotation half-way (a row lock)
    watcher = psycopg.connect(migrated_db_url, autocommit=True)

    def waiting_on_lock(statement: str) -> bool:
        return watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE %s", ("%" + statement + "%",)).fetchone()[0] > 0

    try:
        holder.execute("SELECT 1 FROM credentials WHERE name = 'first' FOR UPDATE")
        rotate = _start(tmp_path, migrated_db_url, "secrets", "rotate-key", "--new-key", NEW,
                        MANTLE_ENCRYPTION_KEY=OLD)
        # rotate-key holds its table lock and waits to re-encrypt "first"
        wait_until(lambda: waiting_on_lock("UPDATE"), message="rotation not under way")
        create = _start(tmp_path, migrated_db_url, "secrets", "create", "--name", "second",
                        "--type", "generic", "--field", "key=v2", MANTLE_ENCRYPTION_KEY=OLD)
        # create has encrypted "second" with the old key and waits for the rotation
        wait_until(lambda: waiting_on_lock("LOCK TABLE"), message="create not waiting")
        holder.rollback()
        rotated, created = finish(rotate), finish(create)
    finally:
        holder.close()
        watcher.close()
    assert (rotated.returncode, rotated.stdout) == (0, (
        "Re-encrypted 1 credential(s).\n"
        "Update MANTLE_ENCRYPTION_KEY to the new key and restart.\n")), rotated.stderr
    assert (created.returncode, created.stdout, created.stderr) == (
        1, "", "Error: the stored credentials are encrypted with another key — set "
               "MANTLE_ENCRYPTION_KEY to the key they were rotated to\n")
    new = credentials.parse_key(NEW)
    assert credentials.read("first", new).fields == {"key": "v1"}
    assert credentials.read("second", new) is None


# --- 2. a non-UTF-8 --input value (6, 11) ---------------------------------------------------

def test_run_with_an_input_value_that_is_not_utf8_answers_an_error_line(cli):
    """SPEC 6, 11: a bad input is an ``Error:`` line and exit 1 (it was a traceback)."""
    apply_yaml("""
        name: greet
        inputs:
          name: {type: string}
        steps:
          - {name: say, action: core/log, params: {message: "{{ inputs.name }}"}}
    """)
    argv, env = cli._argv(["run", "greet", "--input", os.fsdecode(b"name=Jos\xe9")])
    result = subprocess.run([os.fsencode(arg) for arg in argv], cwd=cli.cwd, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == 'Error: input "name" must be UTF-8 text\n'  # was a traceback
    assert WorkflowExecution.select().where(
        WorkflowExecution.status.in_(("pending", "running"))).count() == 0


# --- 3. a plugin's stderr cut inside the credential (13.2, 13.8) ----------------------------

SECRET = "tok-Zq8vN2kLw7pX4rT9-9f3c1a7e5b2d4680"
NOISY = """\
#!{python}
import json, sys
key = json.load(sys.stdin)["credential"]["key"]
# the credential, then enough text that the last 64 KiB begin 20 characters before its end
sys.stderr.write("debug: " + key + "." * (65536 - 20))
sys.exit(1)
"""


def test_a_plugins_stderr_cut_to_64_kib_keeps_no_part_of_the_credential(cli, tmp_path):
    """SPEC 13.2: values never reach errors. The cut to the last 64 KiB fell inside the
    credential and kept its end, which redaction could not recognise."""
    folder = tmp_path / ".mantle" / "plugins"
    folder.mkdir(parents=True)
    (folder / "noisy").write_text(NOISY.format(python=sys.executable))
    (folder / "noisy").chmod(0o755)
    apply_yaml("""
        name: noisy
        steps:
          - {name: go, action: noisy/go, credential: tok}
    """)
    argv, env = cli._argv(["run", "noisy"])
    env["MANTLE_SECRET_TOK"] = SECRET
    result = subprocess.run(argv, cwd=cli.cwd, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    error = StepExecution.get(StepExecution.step_name == "go").error
    assert error.startswith('plugin "noisy" failed: ')
    tail = SECRET[-20:]
    assert tail not in error, f"the credential's last 20 characters were stored: {error[:80]}"
    assert tail not in result.stderr


# --- 4. a credential http.client refuses as a header value (13.2, 5.3) ----------------------

def test_a_credential_that_cannot_be_a_header_value_fails_the_step_without_showing_it(
        cli, http_target):
    """SPEC 13.2, 5.3: credentials never reach errors. http.client refused the value and
    its error quoted it in Python's bytes form, which redaction does not recognise."""
    http_target.route("/x", json={"ok": True})
    apply_yaml(f"""
        name: header
        steps:
          - {{name: call, action: http/request, credential: tok,
             params: {{url: "{http_target.url('/x')}"}}}}
    """)
    secret = "p\u00e4ss-Zq8vN2kLw7pX4\r"  # a Latin-1 letter; a CR (a file saved on Windows)
    argv, env = cli._argv(["run", "header"])
    env["MANTLE_SECRET_TOK"] = secret
    result = subprocess.run(argv, cwd=cli.cwd, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    error = StepExecution.get(StepExecution.step_name == "call").error
    assert error == ('http/request: credential "tok" cannot be sent in the Authorization '
                     "header (line break, NUL or a character outside Latin-1)")
    visible = "ss-Zq8vN2kLw7pX4"  # the bulk of the credential, however it is spelled
    assert visible not in error, error
    assert visible not in result.stderr, result.stderr[-400:]
