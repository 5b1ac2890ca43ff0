"""``-o json`` / ``--output json`` (SPEC 13.1.7, shapes of 13.8) through the real command line,
on SQLite and PostgreSQL: one JSON document on stdout with the REST API's field names."""

from __future__ import annotations

import json
import re

import pytest

from mantle import apikeys, credentials, queries
from mantle.db.models import WorkflowExecution
from tests.helpers.waiting import apply_yaml
from tests.web.support import cli

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
KEY = "9c" * 32
WORKFLOW = """
    name: shapes
    steps:
      - {name: first, action: core/log, params: {message: one}}
      - {name: second, action: core/fail, depends_on: [first], params: {message: nope}}
"""


@pytest.fixture
def mantle(tmp_path, db, migrated_db_url):
    def run(*args: str, ok: bool = True):
        result = cli(tmp_path, migrated_db_url, *args, env={"MANTLE_ENCRYPTION_KEY": KEY})
        if ok:
            assert (result.returncode, result.stderr) == (0, ""), result.stderr
        return result
    return run


def document(result) -> dict:
    """stdout must be exactly one JSON document."""
    return json.loads(result.stdout)


def test_empty_listings_are_empty_arrays(mantle, tmp_path):
    assert document(mantle("logs", "-o", "json")) == {"executions": []}
    assert document(mantle("secrets", "list", "-o", "json")) == {"credentials": []}
    assert document(mantle("keys", "list", "--output", "json")) == {"keys": []}
    assert document(mantle("audit", "-o", "json")) == {"events": []}
    assert document(mantle("plugins", "list", "-o", "json",
                           "--plugins-dir", str(tmp_path / "none"))) == {"plugins": []}


def test_run_logs_and_status_print_the_apis_execution_documents(mantle):
    apply_yaml(WORKFLOW)
    ran = mantle("run", "shapes", "-o", "json", ok=False)
    assert ran.returncode == 1
    assert ran.stderr.splitlines()[-1] == 'Error: step "second" failed: nope'
    detail = document(ran)  # nothing but the document: no "Running..." or step lines
    execution_id = WorkflowExecution.get().id
    assert detail == queries.execution_detail(execution_id)
    assert set(detail) == {"id", "workflow", "version", "status", "started_at", "completed_at",
                           "parent_execution_id", "parent_step", "inputs", "error", "steps",
                           "hooks", "children"}
    assert (detail["status"], [s["name"] for s in detail["steps"]]) == \
        ("failed", ["first", "second"])
    assert RFC3339.fullmatch(detail["started_at"])
    assert document(mantle("logs", execution_id, "-o", "json")) == detail
    assert document(mantle("status", execution_id, "--output", "json")) == detail
    listed = document(mantle("logs", "-o", "json", "--workflow", "shapes"))
    assert listed == {"executions": queries.list_executions("shapes")}
    assert listed["executions"][0] == {key: detail[key] for key in (
        "id", "workflow", "version", "status", "started_at", "completed_at",
        "parent_execution_id", "parent_step")}


def test_secrets_keys_audit_and_plugins_lists_have_the_specs_shapes(mantle, tmp_path):
    credentials.create("api", "bearer", {"token": "t-1"}, credentials.parse_key(KEY))
    apikeys.create_key("ci")
    apikeys.create_key("old")
    apikeys.revoke_key("old")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tell").write_text("#!/bin/sh\n")
    secrets = document(mantle("secrets", "list", "-o", "json"))
    assert secrets == {"credentials": [{"name": "api", "type": "bearer",
                                        "created_at": secrets["credentials"][0]["created_at"]}]}
    assert RFC3339.fullmatch(secrets["credentials"][0]["created_at"])
    keys = document(mantle("keys", "list", "-o", "json"))["keys"]
    assert [(k["name"], k["role"], k["expires_at"], k["revoked"]) for k in keys] == \
        [("ci", "admin", None, False), ("old", "admin", None, True)]
    assert all(set(k) == {"name", "role", "created_at", "expires_at", "revoked"} for k in keys)
    events = document(mantle("audit", "-o", "json", "--limit", "2"))["events"]
    assert [(e["actor"], e["action"], e["resource_type"], e["resource_id"]) for e in events] == \
        [("cli", "apikey.revoked", "api_key", "old"), ("cli", "apikey.created", "api_key", "old")]
    assert set(events[0]) == {"id", "timestamp", "actor", "action", "resource_type",
                              "resource_id", "metadata"}
    assert events[0]["metadata"] == {} and RFC3339.fullmatch(events[0]["timestamp"])
    assert document(mantle("plugins", "list", "-o", "json", "--plugins-dir", str(plugins))) == \
        {"plugins": [{"name": "tell", "path": str(plugins / "tell")}]}


def test_text_stays_the_default_and_other_formats_are_usage_errors(mantle):
    assert mantle("secrets", "list", "-o", "text").stdout == "(no credentials)\n"
    bad = mantle("logs", "-o", "yaml", ok=False)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines()[-1].startswith(
        "Error: argument -o/--output: invalid choice: 'yaml'")
