"""``mantle keys``, ``mantle audit`` and ``mantle plugins`` word for word (SPEC 6.3).

The commands run in-process through ``mantle.cli.main`` (the real parser, config and database
handling) on a migrated database of each backend.
"""

from __future__ import annotations

import logging
import os
import re
import stat

import pytest

from mantle import db as mantle_db
from mantle.cli import main
from mantle.db.models import ApiKey, AuditEvent


@pytest.fixture
def mantle(migrated_db_url, capsys, tmp_path, monkeypatch):
    """``mantle(*args)`` -> (exit code, stdout, stderr), in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("MANTLE_")]:
        monkeypatch.delenv(name)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([*args, "--database-url", migrated_db_url])
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    mantle_db.database_proxy.initialize(None)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_statement_the_database_refuses_is_an_error_line_not_a_traceback(read_only_url,
                                                                           mantle, capsys):
    """SPEC 6 (common errors): a database that fails a command's statement (here a role that
    may only read; else a statement timeout, a lock held past the busy timeout) printed a
    Python traceback; it is ``Error: failed to connect to database: <detail>``, exit 1."""
    assert main(["keys", "create", "ci", "--database-url", read_only_url]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", "Error: failed to connect to database: permission denied for "
                              "table api_keys\n")
    assert mantle("keys", "list")[1] == "(no API keys)\n"  # nothing half written


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(mantle):
    code, out, err = mantle("keys", "create", "ci-deploy")
    assert (code, err) == (0, "")
    match = re.fullmatch(r"API Key: (mk_[0-9a-f]{64})\n\nSave this key — it cannot be "
                         r"retrieved again\.\nKey prefix for reference: (mk_[0-9a-f]{6})\n", out)
    assert match, out
    key, prefix = match.groups()
    assert key.startswith(prefix)
    row = ApiKey.get(ApiKey.name == "ci-deploy")
    assert row.key_hash != key and len(row.key_hash) == 64 and row.prefix == prefix
    assert mantle("keys", "create", "ci-deploy") == \
        (1, "", 'Error: API key "ci-deploy" already exists\n')
    for bad in ("has space", "x" * 65, "", "semi;colon"):
        assert mantle("keys", "create", bad) == (1, "", f'Error: invalid key name "{bad}"\n')
    assert mantle("keys", "create", "A.b_c-9" + "x" * 57)[0] == 0


def test_keys_list_and_revoke(mantle):
    assert mantle("keys", "list") == (0, "(no API keys)\n", "")
    mantle("keys", "create", "first")
    mantle("keys", "create", "second")
    code, out, _ = mantle("keys", "list")
    lines = out.splitlines()
    row = "%-20s %-10s %-8s %-20s %-20s %-20s %s"  # SPEC 6.3 plus ROLE and EXPIRES (13.8)
    assert lines[0] == row % ("NAME", "PREFIX", "ROLE", "CREATED", "EXPIRES", "LAST USED",
                              "STATUS")
    first = ApiKey.get(ApiKey.name == "first")
    created = first.created_at.strftime("%Y-%m-%d %H:%M:%S")
    assert lines[1] == row % ("first", first.prefix, "admin", created, "never", "never",
                              "active")
    assert mantle("keys", "revoke", "first") == (0, 'Revoked key "first"\n', "")
    assert mantle("keys", "list")[1].splitlines()[1].endswith(" revoked")
    assert mantle("keys", "revoke", "second") == (0, 'Revoked key "second"\nNo active keys '
                                                  "remain — the API no longer requires "
                                                  "authentication.\n", "")
    assert mantle("keys", "revoke", "ghost") == (1, "", 'Error: API key "ghost" not found\n')
    actions = [(e.actor, e.action, e.resource_type, e.resource_id)
               for e in AuditEvent.select().order_by(AuditEvent.id)]
    assert actions == [("cli", "apikey.created", "api_key", "first"),
                       ("cli", "apikey.created", "api_key", "second"),
                       ("cli", "apikey.revoked", "api_key", "first"),
                       ("cli", "apikey.revoked", "api_key", "second")]


def test_audit_lists_events_newest_first_with_filters(mantle):
    assert mantle("audit") == (0, "(no audit events)\n", "")
    for name in ("a", "b", "c"):
        mantle("keys", "create", name)
    mantle("keys", "revoke", "b")
    code, out, err = mantle("audit")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line[22:] for line in lines] == [
        "%-12s  %-22s  %s" % ("cli", "apikey.revoked", "api_key/b"),
        "%-12s  %-22s  %s" % ("cli", "apikey.created", "api_key/c"),
        "%-12s  %-22s  %s" % ("cli", "apikey.created", "api_key/b"),
        "%-12s  %-22s  %s" % ("cli", "apikey.created", "api_key/a")]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ {2}", line[:22])
               for line in lines)
    assert len(mantle("audit", "--action", "apikey.created")[1].splitlines()) == 3
    assert len(mantle("audit", "--limit", "2")[1].splitlines()) == 2
    assert mantle("audit", "--resource", "api_key/b")[1].splitlines() == [lines[0], lines[2]]
    assert len(mantle("audit", "--resource", "api_key", "--since", "1h")[1].splitlines()) == 4
    assert mantle("audit", "--actor", "api")[1] == "(no audit events)\n"
    assert mantle("audit", "--limit", "0") == \
        (1, "", "Error: --limit must be between 1 and 1000\n")
    assert mantle("audit", "--since", "soon") == (1, "", 'Error: invalid --since value "soon": '
                                                 "must be a positive duration such as 90s, "
                                                 "30m, 1h30m or 7d\n")


def test_plugins_install_list_and_remove(mantle, tmp_path):
    assert mantle("plugins", "list") == (0, "(no plugins installed)\n", "")
    source = tmp_path / "src" / "notify"
    source.parent.mkdir()
    source.write_text("#!/bin/sh\necho '{}'\n")
    source.chmod(0o600)
    assert mantle("plugins", "install", str(source)) == \
        (0, f"Installed plugin from {source}\n", "")
    installed = tmp_path / ".mantle" / "plugins" / "notify"
    assert installed.read_text() == source.read_text()
    assert stat.S_IMODE(installed.stat().st_mode) == 0o755
    assert mantle("plugins", "list") == (0, "%-20s %s\n" % ("notify", installed), "")
    other = tmp_path / "elsewhere"
    assert mantle("plugins", "--plugins-dir", str(other), "install", str(source))[0] == 0
    assert (other / "notify").is_file()
    assert mantle("plugins", "install", str(tmp_path / "missing")) == \
        (1, "", f'Error: cannot read "{tmp_path / "missing"}": No such file or directory\n')
    assert mantle("plugins", "remove", "notify") == (0, "Removed plugin notify\n", "")
    assert not installed.exists()
    assert mantle("plugins", "remove", "notify") == \
        (1, "", 'Error: plugin "notify" not found\n')


@pytest.mark.parametrize("name, error", [
    ("slack.py", 'invalid plugin name "slack.py": must match ^[a-z0-9][a-z0-9_-]*$'),
    ("Notify", 'invalid plugin name "Notify": must match ^[a-z0-9][a-z0-9_-]*$'),
    ("http", 'plugin name "http" is reserved'),
])
def test_plugins_install_refuses_a_name_no_action_could_run(mantle, tmp_path, name, error):
    """An action ``<plugin>/<action>`` only runs a file whose name matches the plugin name
    rule: ``install ./slack.py`` said "Installed" and ``list`` showed it, yet every
    ``slack.py/send`` (or ``slack/send``) step failed with ``unknown action``."""
    source = tmp_path / "src" / name
    source.parent.mkdir()
    source.write_text("#!/bin/sh\necho '{}'\n")
    assert mantle("plugins", "install", str(source)) == (1, "", f"Error: {error}\n")
    assert mantle("plugins", "list") == (0, "(no plugins installed)\n", "")
