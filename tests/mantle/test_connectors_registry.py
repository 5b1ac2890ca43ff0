"""run_action dispatch, unknown actions and credentials (SPEC 4.5, 5.3, 5.4)."""

from __future__ import annotations

import threading

import pytest

import mantle.connectors as connectors
from mantle.connectors.credentials import Credential
from mantle.connectors import (
    ConnectorError,
    ConnectorInterrupted,
    Invocation,
    resolve_credential,
    run_action,
)


def invocation(action, params=None, plugins_dir=".mantle/plugins", credential=None):
    if isinstance(credential, str):
        credential = Credential("token", "generic", {"key": credential})
    return Invocation(action, params or {}, threading.Event(), credential=credential,
                      plugins_dir=plugins_dir)


def write_plugin(directory, name, mode=0o755):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text('#!/bin/sh\necho \'{"ran": true}\'\n')
    path.chmod(mode)
    return path


@pytest.mark.parametrize("action", [
    "core/nope", "http/get", "http/request/x", "core", "", "/x", "x/", "nope/act",
    "../x/act", "./x/act", "/bin/sh", "..%2f/x", "UPPER/act", "-x/act", "a.b/act", "a b/act",
])
def test_unknown_or_hostile_action_fails_without_retry(tmp_path, action):
    write_plugin(tmp_path / "plugins", "x")
    with pytest.raises(ConnectorError) as caught:
        run_action(invocation(action, plugins_dir=str(tmp_path / "plugins")))
    assert caught.value.message == f'unknown action "{action}"'
    assert not caught.value.retryable


def test_plugin_outside_the_plugins_dir_is_not_reachable(tmp_path):
    write_plugin(tmp_path, "outside")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    with pytest.raises(ConnectorError, match='unknown action "outside/act"'):
        run_action(invocation("outside/act", plugins_dir=str(plugins)))
    with pytest.raises(ConnectorError, match=r'unknown action "\.\./outside"'):
        run_action(invocation("../outside", plugins_dir=str(plugins)))


@pytest.mark.parametrize("name", ["http", "core"])
def test_reserved_names_never_run_a_plugin(tmp_path, name):
    write_plugin(tmp_path, name)
    with pytest.raises(ConnectorError, match=f'unknown action "{name}/act"'):
        run_action(invocation(f"{name}/act", plugins_dir=str(tmp_path)))


def test_plugin_file_without_execute_permission_is_unknown(tmp_path):
    write_plugin(tmp_path, "noexec", mode=0o644)
    with pytest.raises(ConnectorError, match='unknown action "noexec/act"'):
        run_action(invocation("noexec/act", plugins_dir=str(tmp_path)))


def test_plugin_is_looked_up_at_each_run(tmp_path):
    with pytest.raises(ConnectorError, match="unknown action"):
        run_action(invocation("late/act", plugins_dir=str(tmp_path)))
    write_plugin(tmp_path, "late")
    assert run_action(invocation("late/act", plugins_dir=str(tmp_path))) == {"ran": True}


def test_cancel_already_set_interrupts_before_running():
    inv = Invocation("core/fail", {}, threading.Event())
    inv.cancel.set()
    with pytest.raises(ConnectorInterrupted):
        run_action(inv)


def test_a_new_builtin_is_one_function_and_one_registration(monkeypatch):
    monkeypatch.setitem(connectors.BUILTIN, "core/echo", lambda inv: {"echo": inv.params})
    assert run_action(invocation("core/echo", {"a": 1})) == {"echo": {"a": 1}}


def test_credential_is_scrubbed_from_error_messages():
    with pytest.raises(ConnectorError) as caught:
        run_action(invocation("core/fail", {"message": "token tok-123 rejected"},
                              credential="tok-123"))
    assert caught.value.message == "token ******** rejected"


# --- credentials ----------------------------------------------------------------------------

def test_credential_is_read_from_mantle_secret_variable():
    environ = {"MANTLE_SECRET_GITHUB_TOKEN": "ghp_x"}
    expected = {"key": "ghp_x"}
    assert resolve_credential("github-token", environ).fields == expected
    assert resolve_credential("GitHub_Token", environ).fields == expected


@pytest.mark.parametrize("environ", [{}, {"MANTLE_SECRET_API_KEY": ""}])
def test_missing_or_empty_credential_fails_without_retry(environ):
    with pytest.raises(ConnectorError) as caught:
        resolve_credential("api-key", environ)
    assert caught.value.message == (
        'credential "api-key" not found (set MANTLE_SECRET_API_KEY)'
    )
    assert not caught.value.retryable


def test_credential_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("MANTLE_SECRET_DEPLOY", "d1")
    assert resolve_credential("deploy").fields == {"key": "d1"}


def test_redaction_catches_json_escaped_echoes_of_the_secret():
    from mantle.connectors.credentials import redact

    secret = "tok/Zq8vN2kLw7+pX4rT9==é"
    body = '{"auth": "Bearer tok\\/Zq8vN2kLw7+pX4rT9==\\u00e9"}'
    assert "Zq8vN2kLw7" not in redact({"body": body}, secret)["body"]
