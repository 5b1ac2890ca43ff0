"""The tool loop of ``ai/completion`` (SPEC 13.6): tool calls, limits, checkpoints, resume.

Tools run through a recording ``run_tool`` here (and once through the real ``run_action``
against a local HTTP server); the same loop under the real engine, on both databases, is in
tests/actors/test_engine_ai.py.
"""

from __future__ import annotations

import json

import pytest

from mantle.connectors import ConnectorError, ConnectorInterrupted
from mantle.connectors.ai.completion import FINAL_ANSWER_PROMPT
from mantle.connectors.credentials import Credential
from mantle.metrics import Metrics
from tests.helpers import refusing_port
from tests.helpers.fake_openai import error, text, tool_calls
from tests.helpers.fixtures import http_target  # noqa: F401
from tests.mantle.test_connectors_ai import (WEATHER_TOOL, Recorder, ask, fails, fake,  # noqa: F401
                                             invoke)

LOG_TOOL = {"name": "note", "action": "core/log", "params": {"message": "default"},
            "input_schema": {"type": "object", "properties": {"message": {"type": "string"}}}}


def tool_messages(request) -> list[dict]:
    return [m for m in request.json["messages"] if m["role"] == "tool"]


def test_tool_calls_then_text_runs_the_tool_and_feeds_the_result_back(fake):
    fake.script(tool_calls(("weather", {"city": "Oslo"}, "call-1"), usage=(20, 8)),
                text("It is cold in Oslo.", usage=(40, 6)))
    recorder = Recorder({"http/request": {"status": 200, "json": {"temp": -3}}})
    output = invoke("ai/completion", ask(fake, tools=[WEATHER_TOOL]), recorder=recorder)

    assert recorder.tool_calls == [("http/request",
                                    {"method": "GET", "url": "http://x/w", "city": "Oslo"})]
    assert output["text"] == "It is cold in Oslo."
    assert output["rounds"] == 2 and output["tool_calls"] == []
    assert output["usage"] == {"prompt_tokens": 60, "completion_tokens": 14,
                               "total_tokens": 74}
    first, second = fake.requests()
    assert first.json["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Weather in a city",
        "parameters": WEATHER_TOOL["input_schema"]}}]
    assert second.json["messages"] == [
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call-1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call-1",
         "content": '{"status":200,"json":{"temp":-3}}'},
    ]


def test_arguments_with_an_escaped_lone_surrogate_reach_the_tool_and_output_storable(fake):
    fake.script(tool_calls(("note", '{"message": "cut \\ud83d"}', "c1")),
                tool_calls(("note", '{"message": "again \\udc00"}', "c2")))
    recorder = Recorder({"core/log": {"message": "logged"}})
    output = invoke("ai/completion", ask(fake, tools=[LOG_TOOL], max_tool_rounds=1),
                    recorder=recorder)
    assert recorder.tool_calls == [("core/log", {"message": "cut \ufffd"})]
    # the final answer's calls (rounds exhausted) are shown with their arguments decoded
    assert output["tool_calls"] == [{"id": "c2", "name": "note",
                                     "arguments": {"message": "again \ufffd"}}]
    json.dumps(output, ensure_ascii=False).encode("utf-8")  # storable


def test_each_call_of_a_round_gets_its_own_result_in_order(fake):
    fake.script(tool_calls(("note", {"message": "a"}, "c1"), ("note", {}, "c2")),
                text("done"))
    recorder = Recorder({"core/log": {"message": "logged"}})
    invoke("ai/completion", ask(fake, tools=[LOG_TOOL]), recorder=recorder)
    # the model's arguments are merged over the tool's params
    assert recorder.tool_calls == [("core/log", {"message": "a"}),
                                   ("core/log", {"message": "default"})]
    assert [m["tool_call_id"] for m in tool_messages(fake.requests()[1])] == ["c1", "c2"]


def test_failed_tool_result_is_its_step_error(fake):
    fake.script(tool_calls(("weather", {"city": "Oslo"}, "c1")), text("sorry"))
    recorder = Recorder({"http/request": ConnectorError(
        "http/request: GET http://x/w returned 500")})
    output = invoke("ai/completion", ask(fake, tools=[WEATHER_TOOL]), recorder=recorder)
    assert output["text"] == "sorry"
    assert tool_messages(fake.requests()[1]) == [{
        "role": "tool", "tool_call_id": "c1",
        "content": '{"error":"http/request: GET http://x/w returned 500"}'}]


def test_a_tool_output_over_the_step_output_limit_is_a_failed_tool(fake):
    """A tool runs as its action, so an output over a step's 1 MiB limit fails it as it
    would fail the step (SPEC 13.6: a failed tool's result is its step error). It was sent
    whole: again in every later round, and stored in every checkpoint of the conversation."""
    fake.script(tool_calls(("weather", {"city": "Oslo"}, "c1")), text("too much"))
    big = {"status": 200, "body": "x" * 1_048_576}
    recorder = Recorder({"http/request": big})
    output = invoke("ai/completion", ask(fake, tools=[WEATHER_TOOL]), recorder=recorder)
    assert output["text"] == "too much"
    size = len(json.dumps(big, separators=(",", ":")))
    assert tool_messages(fake.requests()[1]) == [{
        "role": "tool", "tool_call_id": "c1",
        "content": json.dumps({"error": f"step output exceeds 1048576 byte limit ({size} "
                                        "bytes)"}, separators=(",", ":"))}]
    assert max(len(json.dumps(saved)) for saved in recorder.checkpoints) < 10_000


def test_calls_beyond_the_per_round_limit_are_not_run(fake):
    fake.script(tool_calls(("note", {"message": "1"}, "c1"), ("note", {"message": "2"}, "c2"),
                           ("note", {"message": "3"}, "c3")), text("done"))
    recorder = Recorder()
    invoke("ai/completion", ask(fake, tools=[LOG_TOOL], max_tool_calls_per_round=2),
           recorder=recorder)
    assert [params["message"] for _, params in recorder.tool_calls] == ["1", "2"]
    assert tool_messages(fake.requests()[1])[2] == {
        "role": "tool", "tool_call_id": "c3",
        "content": '{"error":"tool call limit per round exceeded"}'}


def test_unknown_tool_and_arguments_not_matching_input_schema_are_answered_as_errors(fake):
    fake.script(tool_calls(("stocks", {}, "c1"), ("weather", {"town": "Oslo"}, "c2"),
                           ("weather", "{oops", "c3")), text("done"))
    recorder = Recorder()
    invoke("ai/completion", ask(fake, tools=[WEATHER_TOOL]), recorder=recorder)
    assert recorder.tool_calls == []
    contents = [m["content"] for m in tool_messages(fake.requests()[1])]
    assert contents[0] == '{"error":"unknown tool \\"stocks\\""}'
    assert contents[1] == '{"error":"invalid arguments: \'city\' is a required property"}'
    assert contents[2].startswith('{"error":"invalid arguments: not JSON (')


def test_when_rounds_are_exhausted_one_last_call_without_tools_asks_for_the_answer(fake):
    fake.script(tool_calls(("note", {}, "c1")), tool_calls(("note", {}, "c2")),
                text("final answer"))
    recorder = Recorder()
    output = invoke("ai/completion", ask(fake, tools=[LOG_TOOL], max_tool_rounds=2),
                    recorder=recorder)
    assert output["text"] == "final answer" and output["rounds"] == 3
    assert len(recorder.tool_calls) == 2
    first, second, last = fake.requests()
    assert "tools" in first.json and "tools" in second.json
    assert "tools" not in last.json
    assert last.json["messages"][-1] == {"role": "user", "content": FINAL_ANSWER_PROMPT}
    assert last.json["messages"][-2]["role"] == "tool"


def test_tool_calls_of_the_final_answer_are_in_the_output(fake):
    fake.script(tool_calls(("note", {"message": "x"}, "c9")))
    output = invoke("ai/completion", ask(fake, tools=[LOG_TOOL], max_tool_rounds=0),
                    recorder=Recorder())
    assert output["tool_calls"] == [{"id": "c9", "name": "note",
                                     "arguments": {"message": "x"}}]
    assert output["rounds"] == 1 and "tools" not in fake.requests()[0].json


def test_tools_run_through_run_action_without_an_engine(fake, http_target):
    http_target.route("/w", json={"temp": 4})
    tool = {**WEATHER_TOOL, "params": {"url": http_target.url("/w")}}
    fake.script(tool_calls(("weather", {"city": "Oslo"}, "c1")), text("4 degrees"))
    assert invoke("ai/completion", ask(fake, tools=[tool]))["text"] == "4 degrees"
    assert http_target.hits("/w") == 1
    assert '"json":{"temp":4}' in tool_messages(fake.requests()[1])[0]["content"]


def test_a_failure_after_answered_rounds_keeps_usage_as_partial_output(fake):
    fake.script(tool_calls(("note", {}, "c1"), usage=(5, 5)), error(400, "context too long"))
    exc = fails("ai/completion", ask(fake, tools=[LOG_TOOL]), recorder=Recorder())
    assert exc.message == "ai/completion: 400 context too long"
    assert exc.output == {"model": "m1", "rounds": 1, "usage": {
        "prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}


# --- durability -------------------------------------------------------------------------------

def three_rounds(fake, from_round: int = 1) -> int:
    """Script a three-round loop from ``from_round`` on; return the requests seen so far."""
    answers = [tool_calls(("note", {"message": "r1"}, "c1"), usage=(10, 1)),
               tool_calls(("note", {"message": "r2a"}, "c2"), ("note", {"message": "r2b"},
                                                                 "c3"), usage=(20, 2)),
               text("done", usage=(30, 3))]
    fake.script(*answers[from_round - 1:])
    return len(fake.requests())


def test_each_answered_round_and_each_tool_that_ran_is_checkpointed(fake):
    three_rounds(fake)
    recorder = Recorder()
    invoke("ai/completion", ask(fake, tools=[LOG_TOOL]), recorder=recorder)
    shapes = [(p["rounds"], [m["role"] for m in p["messages"]][1:])
              for p in recorder.checkpoints]
    assert shapes == [
        (1, ["assistant"]),
        (1, ["assistant", "tool"]),
        (2, ["assistant", "tool", "assistant"]),
        (2, ["assistant", "tool", "assistant", "tool"]),
        (2, ["assistant", "tool", "assistant", "tool", "tool"]),
        (3, ["assistant", "tool", "assistant", "tool", "tool", "assistant"]),  # the final
    ]
    assert recorder.checkpoints[-1]["usage"] == {"prompt_tokens": 60, "completion_tokens": 6,
                                                 "total_tokens": 66}
    assert recorder.checkpoints[-1]["final"] == {"finish_reason": "stop", "model": "fake-model"}
    assert "final" not in recorder.checkpoints[-2]


@pytest.mark.parametrize("crash_after", [1, 2, 3, 4, 5, 6])
def test_resume_from_any_checkpoint_never_repeats_a_finished_model_or_tool_call(
        fake, crash_after):
    """SPEC 13.6: a model call or tool call that finished is never repeated, the final
    answer's included (checkpoint 6: a crash before the step output was stored)."""
    three_rounds(fake)
    first_run = Recorder()
    invoke("ai/completion", ask(fake, tools=[LOG_TOOL]), recorder=first_run)
    progress = first_run.checkpoints[crash_after - 1]
    calls_before = [p["message"] for _, p in first_run.tool_calls][
        :sum(1 for m in progress["messages"] if m["role"] == "tool")]
    model_calls_before = progress["rounds"]

    seen = three_rounds(fake, from_round=model_calls_before + 1)
    resumed = Recorder()
    output = invoke("ai/completion", ask(fake, tools=[LOG_TOOL]), recorder=resumed,
                    progress=progress)

    assert calls_before + [p["message"] for _, p in resumed.tool_calls] == ["r1", "r2a", "r2b"]
    assert len(fake.requests()) - seen == 3 - model_calls_before
    assert output["rounds"] == 3 and output["text"] == "done"
    assert output["usage"] == {"prompt_tokens": 60, "completion_tokens": 6,
                               "total_tokens": 66}


def test_an_id_made_up_for_a_call_never_repeats_one_the_server_sent(fake):
    # The second call has no id; the one made up for it must not be the first call's, or its
    # result would count as given: a resume after the first call would never run it.
    fake.script(tool_calls(("note", {"message": "a"}, "call_1_1"), ("note", {}, "")),
                text("done"))
    first_run = Recorder()
    invoke("ai/completion", ask(fake, tools=[LOG_TOOL]), recorder=first_run)
    ids = [m["tool_call_id"] for m in tool_messages(fake.requests()[1])]
    assert len(set(ids)) == 2 and ids[0] == "call_1_1"

    fake.script(text("done"))
    resumed = Recorder()
    invoke("ai/completion", ask(fake, tools=[LOG_TOOL]), recorder=resumed,
           progress=first_run.checkpoints[1])  # after the first call's action ran
    assert [params for _, params in resumed.tool_calls] == [{"message": "default"}]


def test_a_checkpoint_that_refuses_stops_the_attempt(fake):
    fake.script(tool_calls(("note", {}, "c1")), text("never asked"))

    class Refusing(Recorder):
        def checkpoint(self, progress):
            raise ConnectorInterrupted()

    with pytest.raises(ConnectorInterrupted):
        invoke("ai/completion", ask(fake, tools=[LOG_TOOL]), recorder=Refusing())
    assert len(fake.requests()) == 1


def test_progress_that_is_not_ours_starts_afresh(fake):
    fake.script(text("fresh"))
    output = invoke("ai/completion", ask(fake), progress={"something": "else"},
                    recorder=Recorder())
    assert output["rounds"] == 1
    assert fake.requests()[0].json["messages"] == [{"role": "user", "content": "Hello?"}]


def test_checkpoints_never_hold_the_credential(fake):
    fake.script(tool_calls(("note", {}, "c1")), text("ok"))
    recorder = Recorder({"core/log": {"echo": "key is sk-secret-1"}})
    invoke("ai/completion", ask(fake, tools=[LOG_TOOL]), recorder=recorder,
           credential=Credential("oa", "openai", {"api_key": "sk-secret-1"}))
    assert "sk-secret-1" not in str(recorder.checkpoints)
    assert "********" in str(recorder.checkpoints[-1])


# --- metrics ------------------------------------------------------------------------------------

def test_metrics_count_tokens_requests_and_durations_under_the_requested_model(fake):
    fake.script(error(500, "x"), tool_calls(("note", {}, "c1"), usage=(10, 2), model="other"),
                text("ok", usage=(30, 4)))
    metrics = Metrics()
    invoke("ai/completion", ask(fake, tools=[LOG_TOOL]), recorder=Recorder(), metrics=metrics)
    value = metrics.registry.get_sample_value
    assert value("mantle_ai_tokens_total", {"model": "m1", "kind": "prompt"}) == 40
    assert value("mantle_ai_tokens_total", {"model": "m1", "kind": "completion"}) == 6
    assert value("mantle_ai_requests_total", {"model": "m1", "status": "500"}) == 1
    assert value("mantle_ai_requests_total", {"model": "m1", "status": "200"}) == 2
    assert value("mantle_ai_request_duration_seconds_count", {"model": "m1"}) == 3


def test_network_failures_are_counted_with_status_error():
    metrics = Metrics()
    with refusing_port() as port, pytest.raises(ConnectorError):
        invoke("ai/completion", {"model": "m1", "prompt": "x",
                                 "base_url": f"http://127.0.0.1:{port}/v1"}, metrics=metrics)
    assert metrics.registry.get_sample_value(
        "mantle_ai_requests_total", {"model": "m1", "status": "error"}) == 1


def test_arguments_the_input_schema_does_not_declare_cannot_replace_tool_params(fake):
    fake.script(tool_calls(("weather", {"city": "Oslo", "url": "http://evil/"}, "c1")),
                text("done"))
    recorder = Recorder()
    invoke("ai/completion", ask(fake, tools=[WEATHER_TOOL]), recorder=recorder)
    assert recorder.tool_calls == []
    assert tool_messages(fake.requests()[1])[0]["content"] == (
        '{"error":"invalid arguments: Additional properties are not allowed '
        '(\'url\' was unexpected)"}')


def test_a_tool_without_input_schema_takes_no_arguments(fake):
    fake.script(tool_calls(("bare", {}, "c1"), ("bare", {"x": 1}, "c2")), text("done"))
    recorder = Recorder()
    bare = {"name": "bare", "action": "core/log", "params": {"message": "m"}}
    invoke("ai/completion", ask(fake, tools=[bare]), recorder=recorder)
    assert recorder.tool_calls == [("core/log", {"message": "m"})]
    assert fake.requests()[0].json["tools"][0]["function"]["parameters"] == {
        "type": "object", "properties": {}}


def test_input_schema_may_allow_further_arguments_explicitly(fake):
    open_tool = {**WEATHER_TOOL, "input_schema": {**WEATHER_TOOL["input_schema"],
                                                  "additionalProperties": True}}
    fake.script(tool_calls(("weather", {"city": "Oslo", "headers": {"X-A": "1"}}, "c1")),
                text("done"))
    recorder = Recorder()
    invoke("ai/completion", ask(fake, tools=[open_tool]), recorder=recorder)
    assert recorder.tool_calls[0][1]["headers"] == {"X-A": "1"}
