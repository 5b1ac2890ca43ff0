"""Stored credentials used by steps through the real engine (SPEC 13.1.5, 13.2), on SQLite and
PostgreSQL: the Authorization a real HTTP server receives per type, the fields a plugin gets,
the store-before-environment order, and every field value redacted from outputs, errors,
stored rows and logs."""

from __future__ import annotations

import base64
import json
import logging
import sys
import textwrap

import pytest

from mantle import credentials
from tests.actors.conftest import apply, run, steps_of
from tests.faults.conftest import dump_database

KEY = "5a" * 32
SECRETS = {
    "bearer": {"token": "bearer-Tok-81x"},
    "basic": {"username": "svc-user-77", "password": "pass-Word-92q"},
    "openai": {"api_key": "sk-proj-Key-55z", "org_id": "org-Ident-31k"},
    "generic": {"key": "generic-Val-04m"},
}
PLUGIN = """\
    #!{python}
    import json, sys
    request = json.load(sys.stdin)
    print("plugin saw " + json.dumps(request["credential"]), file=sys.stderr)
    if request["action"].endswith("/fail"):
        sys.exit(2)
    print(json.dumps({{"credential": request["credential"]}}))
"""


@pytest.fixture
def secrets():
    """MANTLE_SECRET_* as the engine sees them: one that the store shadows, one it lacks."""
    return {"MANTLE_SECRET_BEARER": "shadowed-by-the-store", "MANTLE_SECRET_ENV_ONLY": "env-val-3"}


@pytest.fixture(autouse=True)
def stored(db):
    """One stored credential per type (named after it), with KEY configured."""
    saved = credentials._configured
    credentials.configure_key(KEY)
    for kind, fields in SECRETS.items():
        credentials.create(kind, kind, fields, credentials.parse_key(KEY))
    yield
    credentials._configured = saved


def _plugin(tmp_path) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tell"
    path.write_text(textwrap.dedent(PLUGIN.format(python=sys.executable)))
    path.chmod(0o755)


def test_http_request_sends_each_credential_type_as_the_spec_says(engine, http_target):
    http_target.route("/echo", echo=True)
    url = http_target.url("/echo")
    apply(f"""
        name: auth
        steps:
          - {{name: bearer, action: http/request, credential: bearer, params: {{url: "{url}"}}}}
          - {{name: basic, action: http/request, credential: basic, params: {{url: "{url}"}}}}
          - {{name: openai, action: http/request, credential: openai, params: {{url: "{url}"}}}}
          - {{name: generic, action: http/request, credential: generic,
             params: {{url: "{url}"}}}}
          - {{name: env, action: http/request, credential: env-only, params: {{url: "{url}"}}}}
    """)
    detail = run(engine, "auth")
    assert detail["status"] == "completed", detail
    seen = {}
    for request in http_target.requests("/echo"):
        seen[request.header("Authorization")] = request.header("OpenAI-Organization")
    basic = base64.b64encode(b"svc-user-77:pass-Word-92q").decode()
    assert seen == {
        "Bearer bearer-Tok-81x": None,  # the store wins over MANTLE_SECRET_BEARER
        f"Basic {basic}": None,
        "Bearer sk-proj-Key-55z": "org-Ident-31k",
        "Bearer generic-Val-04m": None,
        "Bearer env-val-3": None,  # not stored: MANTLE_SECRET_ENV_ONLY
    }


def test_no_field_value_reaches_outputs_errors_rows_or_logs(engine, http_target, tmp_path,
                                                          caplog):
    caplog.set_level(logging.DEBUG)
    _plugin(tmp_path)
    http_target.route("/echo", echo=True)
    http_target.route("/denied", status=403, echo=True)
    steps = []
    for kind in SECRETS:
        steps.append(f'{{name: echo-{kind}, action: http/request, credential: {kind}, '
                     f'params: {{url: "{http_target.url("/echo")}"}}}}')
        steps.append(f'{{name: deny-{kind}, action: http/request, credential: {kind}, '
                     f'continue_on_error: true, params: {{url: "{http_target.url("/denied")}"}}}}')
        steps.append(f"{{name: show-{kind}, action: tell/show, credential: {kind}}}")
        steps.append(f"{{name: fail-{kind}, action: tell/fail, credential: {kind}, "
                     "continue_on_error: true}")
    apply("name: leaky\nsteps:\n" + "".join(f"  - {step}\n" for step in steps))
    detail = run(engine, "leaky")
    by_name = steps_of(detail)
    assert all(by_name[f"echo-{kind}"]["status"] == "completed" for kind in SECRETS), detail
    assert by_name["show-openai"]["output"] == {
        "credential": {"api_key": "********", "org_id": "********"}}
    assert by_name["fail-basic"]["error"].startswith('plugin "tell" failed: plugin saw ')
    assert by_name["deny-bearer"]["output"]["status"] == 403
    values = [value for fields in SECRETS.values() for value in fields.values()]
    values.append(base64.b64encode(b"svc-user-77:pass-Word-92q").decode())
    places = {"detail": json.dumps(detail), "rows": dump_database(), "logs": caplog.text}
    for place, text in places.items():
        for value in values:
            assert value not in text, f"{value} leaked into the {place}"
    assert "********" in places["detail"]


def test_a_credential_the_configured_key_cannot_open_fails_the_step_without_retry(engine):
    credentials.configure_key("77" * 32)
    apply("""
        name: locked
        steps:
          - name: call
            action: core/log
            credential: bearer
            retry: {max_attempts: 3}
            params: {message: x}
    """)
    detail = run(engine, "locked")
    step = steps_of(detail)["call"]
    assert (step["status"], step["attempt"]) == ("failed", 1)
    assert step["error"] == 'credential "bearer" cannot be decrypted with the configured key'
    assert detail["error"] == ('step "call" failed: credential "bearer" cannot be decrypted '
                               "with the configured key")
