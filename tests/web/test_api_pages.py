"""Bounded responses (issue 15 items 8 and 10; SPEC 13.8): cursor pages of the execution list,
step outputs over 64 KiB truncated in the detail and served whole on their own, versions
written as integral JSON floats.

Over a real socket (``tests.web.served``), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from mantle.db.fields import utcnow
from mantle.db.models import WorkflowExecution
from mantle.queries import OUTPUT_LIMIT
from tests.web.served import served
from tests.web.support import apply_yaml

QUICK = """
    name: quick
    inputs: {text: {type: string, default: small}}
    steps:
      - {name: say, action: core/log, params: {message: "{{ inputs.text }}"}}
      - {name: after, action: core/log, depends_on: [say], params: {message: done}}
    hooks:
      on_success: [{name: say, action: core/log, params: {message: "hook {{ inputs.text }}"}}]
"""
T0 = dt.datetime(2026, 3, 18, 9, 0, 0)


@pytest.fixture
def api(engine, db):
    apply_yaml(QUICK)
    with served(engine, db) as server:
        yield server


def _insert(started: dt.datetime, status: str = "completed", execution_id: str | None = None):
    return WorkflowExecution.create(id=execution_id or str(uuid.uuid4()), workflow_name="quick",
                                    version=1, status=status, inputs={}, trigger={},
                                    started_at=started).id


def _walk(api, query: str, between=None) -> list[list[str]]:
    """Every page's ids, following next_cursor; ``between(page_number)`` runs before each
    page after the first."""
    pages, cursor = [], None
    while True:
        path = f"/api/v1/executions?{query}" + (f"&cursor={cursor}" if cursor else "")
        reply = api.get(path)
        assert reply.status == 200, reply.text
        assert set(reply.json) == {"executions", "next_cursor"}
        pages.append([row["id"] for row in reply.json["executions"]])
        cursor = reply.json["next_cursor"]
        if cursor is None:
            return pages
        assert isinstance(cursor, str)
        if between is not None:
            between(len(pages))


def test_pages_follow_next_cursor_to_a_null_on_the_last_page(api):
    ids = [_insert(T0 + dt.timedelta(seconds=index)) for index in range(25)]
    pages = _walk(api, "limit=10")
    assert [len(page) for page in pages] == [10, 10, 5]
    assert sum(pages, []) == list(reversed(ids))  # newest first, each once
    exact = _walk(api, "limit=25")
    assert exact == [list(reversed(ids))]  # a full last page still ends with null
    assert _walk(api, "limit=5&status=failed") == [[]]


def test_pages_never_repeat_or_skip_an_execution_under_concurrent_inserts(api):
    # Pairs of executions started in the same microsecond: ties are ordered by id.
    original = []
    for index in range(15):
        started = T0 + dt.timedelta(seconds=index)
        original += [_insert(started), _insert(started)]
    inserted_newer, inserted_older = [], []

    def insert_between(page: int) -> None:
        # Newer executions (they sort before the walk's position), some in the same instant
        # as rows still ahead, and older ones (after it): none may disturb the walk.
        now = utcnow()
        inserted_newer.extend(_insert(now + dt.timedelta(seconds=i)) for i in range(3))
        inserted_older.append(_insert(T0 - dt.timedelta(days=page)))
        if page <= 5:  # the walk is not at T0 yet (30 rows, 4 a page)
            inserted_older.append(_insert(T0, execution_id=str(
                uuid.UUID(int=page))))  # ties with the oldest pair, smallest ids: after it

    pages = _walk(api, "limit=4", between=insert_between)
    seen = sum(pages, [])
    assert len(seen) == len(set(seen)), "an execution was repeated"
    assert set(original) <= set(seen), "an execution that existed was skipped"
    assert not set(inserted_newer) & set(seen)
    assert set(inserted_older) <= set(seen)
    rows = {row.id: (row.started_at, row.id) for row in WorkflowExecution.select()}
    assert [rows[i] for i in seen] == sorted((rows[i] for i in seen), reverse=True)


def test_a_cursor_keeps_the_microseconds_of_a_page_whose_last_row_is_then_deleted(api):
    # Three executions in one millisecond (the page shows .412): the cursor is the stored
    # .412345, read with the page, so deleting that row (retention) skips nothing after it.
    ids = [_insert(T0 + dt.timedelta(microseconds=micro)) for micro in (412100, 412200, 412345)]
    first = api.get("/api/v1/executions?limit=1").json
    assert [row["id"] for row in first["executions"]] == [ids[2]]
    assert first["next_cursor"] == f"20260318T090000.412345Z_{ids[2]}"
    WorkflowExecution.delete().where(WorkflowExecution.id == ids[2]).execute()
    rest = api.get(f"/api/v1/executions?limit=5&cursor={first['next_cursor']}").json
    assert [row["id"] for row in rest["executions"]] == [ids[1], ids[0]]


def test_a_bad_cursor_is_400_invalid_cursor(api):
    _insert(T0)
    some = str(uuid.uuid4())
    for cursor in ("x", "%25%25", "", f"20260318T090000.412Z_{some}",
                   f"20261301T000000.000000Z_{some}", f"20260318T240000.000000Z_{some}",
                   f"20260318T090000.000000Z_{some.upper()}", f"20260318T090000.000000_{some}",
                   "20260318T090000.000000Z_nope", f"00000318T090000.000000Z_{some}"):
        reply = api.get(f"/api/v1/executions?cursor={cursor}")
        assert (reply.status, reply.json) == (400, {"error": "invalid cursor"}), cursor


def test_any_well_formed_position_is_a_cursor(api):
    older, newer = _insert(dt.datetime(2026, 3, 1)), _insert(dt.datetime(2026, 3, 5))
    # 31 February 2026 is 3 March: after the newer execution (newest first): the older only.
    reply = api.get(f"/api/v1/executions?cursor=20260231T000000.000000Z_{uuid.uuid4()}")
    assert reply.status == 200
    assert [row["id"] for row in reply.json["executions"]] == [older]
    assert newer


BROKEN = """
    name: broken
    steps:
      - {name: boom, action: core/fail}
      - {name: never, action: core/log, if: "false", params: {message: x}}
"""


def test_a_step_without_output_is_served_as_json_null(api, engine):
    """SPEC 13.8: "the output (any JSON value; null when none)": a failed step and a skipped
    one answer the JSON text ``null``, not an empty body (found by the stateful fuzzer)."""
    apply_yaml(BROKEN)
    execution_id = api.post("/api/v1/run/broken", {}).json["execution_id"]
    assert engine.wait(execution_id, timeout=10) == "failed"
    for step in ("boom", "never"):
        reply = api.get(f"/api/v1/executions/{execution_id}/steps/{step}/output")
        assert (reply.status, reply.body, reply.headers["content-type"]) == (
            200, b"null", "application/json"), step


def test_a_step_output_over_64_kib_is_truncated_in_the_detail_and_served_whole(api, engine):
    text = "é" * 40000  # 80 000 bytes of UTF-8
    reply = api.post("/api/v1/run/quick", {"inputs": {"text": text}})
    execution_id = reply.json["execution_id"]
    assert engine.wait(execution_id, timeout=10) == "completed"
    detail = api.get(f"/api/v1/executions/{execution_id}").json
    steps = {step["name"]: step for step in detail["steps"]}
    size = len(json.dumps({"message": text}, separators=(",", ":"),
                          ensure_ascii=False).encode())
    assert size > OUTPUT_LIMIT
    assert steps["say"]["output"] == {"truncated": True, "size": size}
    assert steps["after"]["output"] == {"message": "done"}
    assert detail["hooks"][0]["output"]["truncated"] is True
    whole = api.get(f"/api/v1/executions/{execution_id}/steps/say/output")
    assert (whole.status, whole.json) == (200, {"message": text})
    assert whole.headers["content-type"] == "application/json"
    assert api.get(f"/api/v1/executions/{execution_id}/steps/after/output").json == {
        "message": "done"}
    for path, message in (
            (f"/api/v1/executions/{execution_id}/steps/nope/output", 'step "nope" not found'),
            ("/api/v1/executions/nope/steps/say/output", 'execution "nope" not found'),
            (f"/api/v1/executions/{uuid.uuid4()}/steps/say/output",
             None)):
        reply = api.get(path)
        assert reply.status == 404, path
        if message:
            assert reply.json == {"error": message}


def test_an_output_of_exactly_64_kib_is_shown_whole(api, engine):
    overhead = len('{"message":""}')
    text = "x" * (OUTPUT_LIMIT - overhead)
    execution_id = api.post("/api/v1/run/quick", {"inputs": {"text": text}}).json["execution_id"]
    assert engine.wait(execution_id, timeout=10) == "completed"
    detail = api.get(f"/api/v1/executions/{execution_id}").json
    assert detail["steps"][0]["output"] == {"message": text}


def test_a_version_written_as_an_integral_json_float_is_that_integer(api, engine):
    accepted = api.post("/api/v1/run/quick", body='{"version": 1.0}')
    assert (accepted.status, accepted.json["version"]) == (202, 1)
    reply = api.post("/api/v1/run/quick", body='{"version": 140737488355329.0}')
    assert (reply.status, reply.json) == (404, {
        "error": 'workflow "quick" version 140737488355329 not found'})
    for text in ('{"version": 1.5}', '{"version": 0.0}', '{"version": -1.0}'):
        reply = api.post("/api/v1/run/quick", body=text)
        assert (reply.status, reply.json) == (400, {
            "error": '"version" must be a positive integer'}), text
    engine.wait(accepted.json["execution_id"], timeout=10)
