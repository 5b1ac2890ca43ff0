"""A tool loop survives SIGKILL (SPEC 13.6 durability, 4.11) in a real ``mantle serve``.

The fake model server asks for one tool in round 1 and another in round 2, then holds round
3's model call. Once it is held, round 2's checkpoint is committed (the loop checkpoints before
it calls the model again); the test SIGKILLs the daemon, drops the held call unanswered, and
starts a new daemon on the same database, which resumes the execution. At the end every
round's model call was answered exactly once, each tool endpoint was called exactly once, and
``usage`` sums the three answered rounds. Only the call in flight at the kill was sent twice
(the first never answered): that is the at-least-once window of SPEC 4.11.
"""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from mantle.db.models import StepExecution
from tests.faults.conftest import bound  # noqa: F401 - fixture
from tests.helpers.fake_openai import FakeOpenAI, text, tool_calls
from tests.web.support import Daemon, apply_yaml


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


def _workflow(fake, target) -> str:
    return f"""
        name: agent
        steps:
          - name: plan
            action: ai/completion
            params:
              base_url: "{fake.base_url}"
              model: local-model
              prompt: Plan the trip
              tools:
                - name: weather
                  action: http/request
                  input_schema: {{type: object, properties: {{city: {{type: string}}}}}}
                  params: {{url: "{target.url('/weather')}"}}
                - name: book
                  action: http/request
                  input_schema: {{type: object, properties: {{body: {{type: object}}}}}}
                  params: {{method: POST, url: "{target.url('/book')}"}}
    """


def _round(request) -> int:
    """Which model call of the loop a request is: one more than the answers it carries."""
    return 1 + sum(1 for m in request.json["messages"] if m["role"] == "assistant")


def test_sigkill_between_rounds_resumes_without_repeating_a_model_or_tool_call(
        bound, fake, http_target, tmp_path):
    http_target.route("/weather", json={"temp": 18})
    http_target.route("/book", json={"booked": True})
    fake.script(tool_calls(("weather", {"city": "Rome"}, "w1"), usage=(10, 1)),
                tool_calls(("book", {"body": {"city": "Rome"}}, "b1"), usage=(20, 2)),
                text("lost in the crash", hold=True),
                text("Booked Rome", usage=(30, 3)))
    apply_yaml(_workflow(fake, http_target))
    daemon = Daemon(tmp_path, bound).start(timeout=60)
    try:
        reply = daemon.post("/api/v1/run/agent", {})
        assert reply.status == 202, reply.body
        execution_id = reply.json["execution_id"]
        fake.wait_for_requests(3, held=True, timeout=30)
        progress = StepExecution.get(StepExecution.execution_id == execution_id).progress
        assert progress["rounds"] == 2 and progress["messages"][-1]["role"] == "tool"
        daemon.send(signal.SIGKILL)
        daemon.wait(30)
    finally:
        daemon.stop(timeout=30)
    fake.release(drop=True)

    restarted = Daemon(tmp_path, bound).start(timeout=60)
    try:
        detail = restarted.wait_for_status(execution_id, timeout=60)
    finally:
        restarted.stop(timeout=30)

    assert detail["status"] == "completed", detail
    [step] = detail["steps"]
    assert step["attempt"] == 1  # the interrupted attempt resumed as itself
    assert step["output"]["text"] == "Booked Rome" and step["output"]["rounds"] == 3
    assert step["output"]["usage"] == {"prompt_tokens": 60, "completion_tokens": 6,
                                       "total_tokens": 66}
    answered = Counter(_round(r) for r in fake.requests() if r.answered)
    assert answered == {1: 1, 2: 1, 3: 1}
    unanswered = [_round(r) for r in fake.requests() if not r.answered]
    assert unanswered == [3]  # the call in flight at the kill
    assert http_target.hits("/weather") == 1 and http_target.hits("/book") == 1
