"""Secrets and keys (SPEC 5.3, 7.1) against a real ``mantle serve``.

A credential given to the daemon as ``MANTLE_SECRET_<NAME>`` is sent as a Bearer token to a
server that echoes it back, handed to a plugin that prints it on stdout and stderr (and to one
that then fails); the value must then appear nowhere: not in the daemon's logs, not in any row
of any table, not in the API's step outputs and errors. API keys are stored as SHA-256 only,
and ``http/request`` drops ``Authorization`` when a redirect leaves the origin.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import textwrap

import pytest

from tests.faults.conftest import dump_database
from tests.helpers.http_target import HttpTarget
from tests.web.support import Daemon, apply_yaml, cli, wait_until_keys_apply

SECRET = "s3cr3t-Zq8vN2kLw7pX4rT9"
PLUGIN = """\
    #!{python}
    import json, sys
    request = json.load(sys.stdin)
    key = request["credential"]["key"]
    print("stderr has " + key, file=sys.stderr)
    if request["action"].endswith("/fail"):
        sys.exit(3)
    print(json.dumps({{"seen": key, "note": "the key is " + key}}))
"""


def _workflow(target, other) -> str:
    return f"""
        name: leaky
        steps:
          - {{name: echo, action: http/request, credential: api-token,
             params: {{url: "{target.url('/echo')}"}}}}
          - {{name: hop, action: http/request, credential: api-token,
             params: {{url: "{target.url('/away')}"}}}}
          - {{name: near, action: http/request, credential: api-token,
             params: {{url: "{target.url('/here')}"}}}}
          - {{name: show, action: tell/show, credential: api-token, params: {{x: 1}}}}
          - {{name: fail, action: tell/fail, credential: api-token, continue_on_error: true}}
          - name: log
            action: core/log
            depends_on: [echo, show]
            params: {{message: "{{{{ steps.echo.output.body }}}} {{{{ steps.show.output }}}}"}}
          - {{name: denied, action: http/request, credential: api-token,
             continue_on_error: true, params: {{url: "{target.url('/denied')}"}}}}
    """


def _plugin(tmp_path) -> None:
    folder = tmp_path / ".mantle" / "plugins"
    folder.mkdir(parents=True)
    path = folder / "tell"
    path.write_text(textwrap.dedent(PLUGIN.format(python=sys.executable)))
    path.chmod(0o755)


def test_a_credential_never_reaches_logs_database_or_api_and_keys_are_hashed(
        bound, http_target, tmp_path):
    with HttpTarget() as other:
        http_target.route("/echo", echo=True)
        http_target.route("/away", status=302, redirect_to=other.url("/landing"))
        http_target.route("/here", status=302, redirect_to="/echo-here")
        http_target.route("/echo-here", echo=True)
        http_target.route("/denied", status=401, echo=True)
        other.route("/landing", echo=True)
        apply_yaml(_workflow(http_target, other))
        _plugin(tmp_path)
        daemon = Daemon(tmp_path, bound, env={"MANTLE_SECRET_API_TOKEN": SECRET,
                                              "MANTLE_LOG_LEVEL": "debug"}).start()
        try:
            run = daemon.post("/api/v1/run/leaky", {})
            assert run.status == 202, run.body
            detail = daemon.wait_for_status(run.json["execution_id"])
            listing = daemon.get("/api/v1/executions?limit=1000")
            created = cli(tmp_path, bound, "keys", "create", "ci")
            key = re.search(r"API Key: (mk_[0-9a-f]{64})", created.stdout).group(1)
            wait_until_keys_apply(daemon)
            authed = daemon.get(f"/api/v1/executions/{detail['id']}",
                                headers={"Authorization": f"Bearer {key}"})
            refused = daemon.get("/api/v1/executions", headers={"Authorization": "Bearer nope"})
        finally:
            daemon.stop()
        steps = {step["name"]: step for step in detail["steps"]}
        # The steps did get the secret: the servers and the plugin saw it.
        assert http_target.requests("/echo")[0].header("Authorization") == f"Bearer {SECRET}"
        assert steps["echo"]["status"] == "completed", steps["echo"]
        assert steps["show"]["status"] == "completed", steps["show"]
        assert steps["show"]["output"] == {"seen": "********", "note": "the key is ********"}
        assert steps["fail"]["status"] == "failed"
        assert steps["fail"]["error"].startswith('plugin "tell" failed: stderr has ')
        assert steps["denied"]["status"] == "failed"
        # Authorization crosses a same-origin redirect, not one to another port (host).
        assert http_target.requests("/echo-here")[0].header("Authorization") == (
            f"Bearer {SECRET}")
        assert http_target.requests("/away")[0].header("Authorization") == f"Bearer {SECRET}"
        assert other.requests("/landing")[0].header("Authorization") is None
        assert steps["hop"]["status"] == "completed"
        # ...and the secret is nowhere it could be read back.
        places = {
            "daemon stdout": "".join(daemon.raw), "daemon stderr": daemon.stderr,
            "database": dump_database(), "execution detail": authed.text,
            "execution list": listing.text, "401 answer": refused.text,
            "cli output": created.stdout + created.stderr,
        }
        assert authed.status == 200 and refused.status == 401
        for place, text in places.items():
            assert SECRET not in text, f"the credential leaked into the {place}"
        # API keys: only the SHA-256 is stored; the key itself is in no table.
        assert key not in places["database"] and key not in "".join(daemon.raw)
        assert hashlib.sha256(key.encode()).hexdigest() in places["database"]


ESCAPED_SECRET = "tok/Zq8vN2kLw7+pX4rT9=="  # base64 alphabet: '/' is escaped by PHP and others


def test_a_credential_echoed_json_escaped_is_redacted_too(bound, http_target, tmp_path):
    escaped = json.dumps({"auth": f"Bearer {ESCAPED_SECRET}"}).replace("/", "\\/")
    http_target.route("/php", body=escaped, content_type="application/json")
    apply_yaml(f"""
        name: php-echo
        steps:
          - {{name: call, action: http/request, credential: api-token,
             params: {{url: "{http_target.url('/php')}"}}}}
    """)
    daemon = Daemon(tmp_path, bound, env={"MANTLE_SECRET_API_TOKEN": ESCAPED_SECRET}).start()
    try:
        run = daemon.post("/api/v1/run/php-echo", {})
        detail = daemon.wait_for_status(run.json["execution_id"])
    finally:
        daemon.stop()
    output = detail["steps"][0]["output"]
    assert output["json"] == {"auth": "Bearer ********"}  # the decoded copy is redacted
    assert json.loads(output["body"]) == {"auth": "Bearer ********"}  # the raw text is not
