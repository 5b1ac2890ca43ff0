"""Regressions for the defects the API fuzzing (``test_fuzz_api.py``) and the edge probes it
pointed at found: each one as plain HTTP against a real ``mantle serve``, on both databases
(some only failed on one: NUL in PostgreSQL text, integers beyond SQLite's).

Server defects: 500 for a run ``version`` beyond the integer column, for NUL in a workflow
name, webhook path or the list's ``workflow`` filter, for ``since`` with more days than a float
holds, for JSON with an unpaired surrogate escape or an integer of more digits than Python
converts; a number beyond a double was accepted and served back as ``Infinity`` (not JSON).
Document defects (the server was right): ``since`` had no pattern, the version path parameter
was any string, null ``inputs``/``version`` and a blank run body were undocumented, and no
link led from a run to its execution.
"""

from __future__ import annotations

import json
import re
import urllib.parse

import pytest

from tests.helpers.database import bound_database
from tests.web.support import Daemon, apply_yaml

MANY_DAYS = "1" * 400 + "d"
LONG_INTEGER = "1" * 5000  # Python refuses int() of more than 4300 digits
HUGE_INTEGER = "1" + "0" * 400  # beyond a double (about 1.8e308)


@pytest.fixture(scope="module", params=[
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)])
def daemon(request, tmp_path_factory):
    """One daemon per database for the module (each test only reads or starts executions)."""
    cwd = tmp_path_factory.mktemp(f"fuzz-regressions-{request.param}")
    if request.param == "postgres":
        cluster = request.getfixturevalue("pg_cluster")
        name = cluster.new_name("fuzzreg")
        url = cluster.create_database(name)
        request.addfinalizer(lambda: cluster.drop_database(name))
    else:
        url = f"sqlite:///{cwd / 'mantle.db'}"
    with bound_database(url, migrate=True):
        yield from _serve(cwd, url)


def _serve(cwd, url):
    apply_yaml("""
        name: quick
        inputs: {n: {type: number, default: 1}}
        steps: [{name: say, action: core/log, params: {message: "{{ inputs.n }}"}}]
    """)
    apply_yaml("""
        name: hooked
        triggers: [{type: webhook, path: /hooks/fuzz}]
        steps: [{name: show, action: core/log, params: {message: "{{ trigger.payload }}"}}]
    """)
    process = Daemon(cwd, url, args=("--shutdown-timeout", "1s")).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def no_internal_errors(daemon):
    """Whatever a test sends, the daemon logs no 500."""
    before = len(daemon.lines)
    yield
    assert [line for line in daemon.lines[before:]
            if line.get("msg") == "internal server error"] == []


def _strict(body: bytes):
    """json.loads that refuses NaN/Infinity, as any other JSON parser would."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(body, parse_constant=refuse)


def _run(daemon, body: str, workflow: str = "quick"):
    return daemon.request("POST", f"/api/v1/run/{workflow}", body,
                          {"Content-Type": "application/json"})


# --- server defects ---


def test_run_of_a_version_beyond_the_integer_column_is_not_found(daemon):
    reply = _run(daemon, '{"version": 99999999999999999999}')
    assert (reply.status, reply.json) == (404, {
        "error": 'workflow "quick" version 99999999999999999999 not found'})
    reply = _run(daemon, '{"version": 2147483648}', workflow="nope")
    assert (reply.status, reply.json) == (404, {"error": 'workflow "nope" not found'})


def test_names_and_paths_with_nul_are_not_found(daemon):
    for path in ("/api/v1/workflows/a%00", "/api/v1/workflows/a%00/versions",
                 "/api/v1/workflows/a%00/versions/1"):
        reply = daemon.get(path)
        assert (reply.status, reply.json) == (404, {"error": 'workflow "a\x00" not found'})
    reply = _run(daemon, "{}", workflow="a%00")
    assert (reply.status, reply.json) == (404, {"error": 'workflow "a\x00" not found'})
    reply = daemon.post("/hooks/a%00", body="{}")
    assert (reply.status, reply.json) == (404, {"error": "no webhook registered for path"})


def test_list_filtered_by_a_workflow_name_with_nul_is_empty(daemon):
    reply = daemon.get("/api/v1/executions?workflow=quick%00")
    assert (reply.status, reply.json) == (200, {"executions": [], "next_cursor": None})


def test_since_with_more_days_than_a_float_holds_filters_nothing(daemon):
    run = _run(daemon, "{}")
    assert run.status == 202, run.body
    reply = daemon.get(f"/api/v1/executions?since={MANY_DAYS}&limit=1000")
    assert reply.status == 200, reply.body
    assert run.json["execution_id"] in [row["id"] for row in reply.json["executions"]]


def test_run_body_with_an_unpaired_surrogate_escape_is_not_valid_json(daemon):
    for body in ('{"inputs": {"n": "\\ud800"}}', '{"\\udc00": 1}'):
        reply = _run(daemon, body)
        assert (reply.status, reply.json) == (400, {"error": "request body is not valid JSON"})


def test_run_body_with_a_number_beyond_a_double_is_not_valid_json(daemon):
    reply = _run(daemon, '{"inputs": {"n": 1e400}}')
    assert (reply.status, reply.json) == (400, {"error": "request body is not valid JSON"})


def test_run_body_with_an_integer_beyond_a_double_is_not_valid_json(daemon):
    """docs/api.md: "a number beyond a double (1e400)" makes the body 400. Written as an
    integer (1 and 400 zeros) it was accepted as a ``number`` input, and every expression
    that read ``inputs`` then failed to convert it (OverflowError, not an expression
    error): the execution stayed ``running`` with its steps pending, for ever."""
    for number in (HUGE_INTEGER, "-" + HUGE_INTEGER):
        reply = _run(daemon, f'{{"inputs": {{"n": {number}}}}}')
        assert (reply.status, reply.json) == (400, {"error": "request body is not valid JSON"})
    # The largest integers a double holds are numbers as before.
    largest = str(int(1.7976931348623157e308))
    reply = _run(daemon, f'{{"inputs": {{"n": {largest}}}}}')
    assert reply.status == 202, reply.body


def test_run_body_with_an_integer_of_more_digits_than_python_converts_is_not_valid_json(
        daemon):
    reply = _run(daemon, f'{{"inputs": {{"n": {LONG_INTEGER}}}}}')
    assert (reply.status, reply.json) == (400, {"error": "request body is not valid JSON"})


@pytest.mark.parametrize("body", ['{"text": "\\ud800"}', '{"n": 1e400}',
                                  f'{{"n": {LONG_INTEGER}}}', f'{{"n": {HUGE_INTEGER}}}'])
def test_webhook_body_that_is_not_strict_json_is_passed_on_as_text(daemon, body):
    reply = daemon.post("/hooks/fuzz", body=body)
    assert reply.status == 202, reply.body
    detail = daemon.wait_for_status(reply.json["execution_id"])
    assert detail["status"] == "completed", detail
    assert detail["steps"][0]["output"] == {"message": body}
    # The detail stays strict JSON (1e400 used to be stored and served back as Infinity).
    raw = daemon.get(f"/api/v1/executions/{reply.json['execution_id']}")
    assert _strict(raw.body)["id"] == reply.json["execution_id"]


# --- document defects (the server was right, the document said otherwise) ---


def test_null_inputs_and_version_run_the_current_version_as_documented(daemon):
    reply = _run(daemon, '{"inputs": null, "version": null}')
    assert (reply.status, reply.json["version"]) == (202, 1), reply.body
    schema = daemon.get("/api/v1/openapi.json").json["components"]["schemas"]["RunRequest"]
    assert "null" in schema["properties"]["inputs"]["type"]
    assert "null" in schema["properties"]["version"]["type"]


def test_blank_run_body_is_the_empty_body_as_documented(daemon):
    for body in ("", "\n", " \r\n\t"):
        reply = _run(daemon, body)
        assert (reply.status, reply.json["version"]) == (202, 1), reply.body
    operation = daemon.get("/api/v1/openapi.json").json["paths"]["/api/v1/run/{workflow}"]
    assert "blank body is {}" in operation["post"]["requestBody"]["description"]


def _parameter(document: dict, path: str, name: str) -> dict:
    operation = document["paths"][path]["get"]
    return next(item for item in operation["parameters"] if item["name"] == name)


def test_documented_since_pattern_matches_what_the_list_accepts(daemon):
    document = daemon.get("/api/v1/openapi.json").json
    pattern = _parameter(document, "/api/v1/executions", "since")["schema"]["pattern"]
    for since in ("90s", "30m", "1h30m", "7d", "+5m", ".5s", "1.5h", "250ms", "1us", "1\u00b5s",
                  "0s1ms", "0", "0s", "0.0h", "-1s", "01d", "0d", "1", "d", "1x", "1h ", ""):
        status = daemon.get(f"/api/v1/executions?since={urllib.parse.quote(since, safe='')}"
                            ).status
        assert status == (200 if re.search(pattern, since) else 400), since


def test_documented_version_parameter_is_the_positive_integer_the_server_accepts(daemon):
    document = daemon.get("/api/v1/openapi.json").json
    path = "/api/v1/workflows/{name}/versions/{version}"
    assert _parameter(document, path, "version")["schema"] == {"type": "integer", "minimum": 1}
    assert daemon.get("/api/v1/workflows/quick/versions/1").status == 200
    for version in ("0", "x", "1.0", "-1"):
        reply = daemon.get(f"/api/v1/workflows/quick/versions/{version}")
        assert (reply.status, reply.json) == (400, {"error": "invalid version number"})


def test_documented_links_lead_from_a_run_to_its_detail_and_cancel(daemon):
    document = daemon.get("/api/v1/openapi.json").json
    ids = {operation["operationId"]: (path, method) for path, item in document["paths"].items()
           for method, operation in item.items()}
    accepted = document["paths"]["/api/v1/run/{workflow}"]["post"]["responses"]["202"]
    links = accepted["links"]
    assert ids[links["GetExecution"]["operationId"]] == ("/api/v1/executions/{id}", "get")
    assert ids[links["CancelExecution"]["operationId"]] == ("/api/v1/cancel/{execution}", "post")
    # Following them by hand: the id from the run's body reads and cancels that execution.
    run = _run(daemon, "{}")
    field = links["GetExecution"]["parameters"]["id"].rpartition("/")[2]
    execution_id = run.json[field]
    assert daemon.get(f"/api/v1/executions/{execution_id}").status == 200
    assert daemon.post(f"/api/v1/cancel/{execution_id}").status in (200, 409)
