"""``ai/completion`` and ``ai/embed`` (SPEC 13.6) against a fake OpenAI-compatible server.

The fake is a real HTTP server (tests/helpers/fake_openai.py) that records every request, so
these tests check what mantle sent as well as what it made of the answers. ``checkpoint`` and
``run_tool`` are small recording functions here; the engine's own are exercised in
tests/actors/test_engine_ai.py.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from mantle.connectors import ConnectorError, ConnectorInterrupted, Invocation, run_action
from mantle.connectors.ai.client import retry_delay
from mantle.connectors.credentials import Credential
from tests.helpers import Background, refusing_port
from tests.helpers.fake_openai import FakeOpenAI, error, text

WEATHER_TOOL = {"name": "weather", "description": "Weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]},
                "action": "http/request", "params": {"method": "GET", "url": "http://x/w"}}


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


class Recorder:
    """``run_tool`` and ``checkpoint`` stand-ins that remember their calls."""

    def __init__(self, results=None):
        self.tool_calls: list[tuple[str, dict]] = []
        self.checkpoints: list[dict] = []
        self.tool_credentials: list[str | None] = []
        self.call_ids: list[str | None] = []
        self._results = results or {}

    def run_tool(self, action, params, credential=None, call_id=None):
        self.tool_calls.append((action, params))
        self.tool_credentials.append(credential)
        self.call_ids.append(call_id)
        result = self._results.get(action, {"ok": True})
        if isinstance(result, Exception):
            raise result
        return result

    def checkpoint(self, progress):
        self.checkpoints.append(json.loads(json.dumps(progress)))  # as stored: a JSON copy


def invoke(action, params, *, recorder=None, credential=None, progress=None, cancel=None,
           metrics=None, step_timeout=None):
    inv = Invocation(action, params, cancel or threading.Event(), credential=credential,
                     step_timeout=step_timeout, progress=progress, metrics=metrics,
                     checkpoint=recorder.checkpoint if recorder else None,
                     run_tool=recorder.run_tool if recorder else None)
    return run_action(inv)


def fails(action, params, **kwargs) -> ConnectorError:
    with pytest.raises(ConnectorError) as caught:
        invoke(action, params, **kwargs)
    return caught.value


def ask(fake, **params):
    return {"model": "m1", "prompt": "Hello?", "base_url": fake.base_url, **params}


# --- plain completions --------------------------------------------------------------------------

def test_plain_text_answer_gives_text_usage_and_one_round(fake):
    fake.script(text("Hi there", usage=(12, 3), model="m1-2025"))
    output = invoke("ai/completion", ask(fake, system_prompt="Be brief."))
    assert output == {"text": "Hi there", "finish_reason": "stop", "model": "m1-2025",
                      "usage": {"prompt_tokens": 12, "completion_tokens": 3,
                                "total_tokens": 15},
                      "tool_calls": [], "rounds": 1}
    [sent] = fake.requests()
    assert sent.path == "/v1/chat/completions"
    assert sent.json == {"model": "m1", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]}
    assert sent.headers["content-type"] == "application/json"


def test_no_credential_sends_no_authorization_header(fake):
    fake.script(text("ok"))
    invoke("ai/completion", ask(fake))
    assert "authorization" not in fake.requests()[0].headers


def test_max_tokens_and_temperature_are_sent(fake):
    fake.script(text("ok"))
    invoke("ai/completion", ask(fake, max_tokens=64, temperature=0.2))
    body = fake.requests()[0].json
    assert body["max_tokens"] == 64 and body["temperature"] == 0.2


def test_text_that_parses_as_json_is_also_given_as_json(fake):
    fake.script(text('{"a": [1, 2]}'))
    assert invoke("ai/completion", ask(fake))["json"] == {"a": [1, 2]}


def test_json_text_with_an_escaped_lone_surrogate_keeps_a_replacement_character(fake):
    # The answer's text is JSON whose "\ud83d" lost its pair: decoded as is, the step
    # output held a lone surrogate no database can store (the execution ended with
    # "internal error").
    fake.script(text('{"a": "cut \\ud83d"}'))
    output = invoke("ai/completion", ask(fake))
    assert output["json"] == {"a": "cut \ufffd"}
    json.dumps(output, ensure_ascii=False).encode("utf-8")  # storable



@pytest.mark.parametrize("answer", ['{"score": 1e999}', '{"score": -1e400}',
                                    '{"score": 1' + "0" * 400 + "}"])
def test_json_text_with_a_number_beyond_a_double_is_not_given_as_json(fake, answer):
    # 1e999 decoded as inf: the output was stored and served by the API as "Infinity",
    # which is not JSON.
    fake.script(text(answer))
    output = invoke("ai/completion", ask(fake))
    assert output["text"] == answer and "json" not in output
    json.dumps(output, allow_nan=False)

def test_non_string_prompt_is_sent_as_compact_json(fake):
    fake.script(text("ok"))
    invoke("ai/completion", ask(fake, prompt={"rows": [1, 2]}))
    assert fake.requests()[0].json["messages"] == [{"role": "user",
                                                    "content": '{"rows":[1,2]}'}]


def test_base_url_trailing_slash_is_ignored(fake):
    fake.script(text("ok"))
    invoke("ai/completion", ask(fake, base_url=fake.base_url + "/"))
    assert fake.requests()[0].path == "/v1/chat/completions"


# --- credentials ----------------------------------------------------------------------------------

@pytest.mark.parametrize("credential, headers", [
    (Credential("oa", "openai", {"api_key": "sk-1", "org_id": "org-9"}),
     {"authorization": "Bearer sk-1", "openai-organization": "org-9"}),
    (Credential("oa", "openai", {"api_key": "sk-1"}), {"authorization": "Bearer sk-1"}),
    (Credential("tok", "bearer", {"token": "t-2"}), {"authorization": "Bearer t-2"}),
    (Credential("gen", "generic", {"key": "k-3"}), {"authorization": "Bearer k-3"}),
])
def test_credential_sends_authorization_and_openai_organization(fake, credential, headers):
    fake.script(text("ok"))
    invoke("ai/completion", ask(fake), credential=credential)
    sent = fake.requests()[0].headers
    assert {k: sent[k] for k in ("authorization", "openai-organization") if k in sent} == headers



@pytest.mark.parametrize("credential, header", [
    (Credential("oa", "openai", {"api_key": "sk-p\xe4ss\n"}), "Authorization"),
    (Credential("oa", "openai", {"api_key": "sk-1", "org_id": "org-\x00"}),
     "OpenAI-Organization"),
])
def test_a_credential_that_cannot_be_a_header_value_fails_without_retry_or_showing_it(
        fake, credential, header):
    exc = fails("ai/completion", ask(fake), credential=credential)
    assert (exc.message, exc.retryable) == (
        f'ai/completion: credential "oa" cannot be sent in the {header} header '
        "(line break, NUL or a character outside Latin-1)", False)
    assert fake.requests() == []

# --- structured output --------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}


def test_output_schema_is_sent_as_json_schema_response_format_and_answer_validated(fake):
    fake.script(text('{"name": "Ada", "age": 36}'))
    output = invoke("ai/completion", ask(fake, output_schema=PERSON))
    assert output["json"] == {"name": "Ada", "age": 36}
    assert fake.requests()[0].json["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": PERSON}}


def test_answer_violating_output_schema_fails_with_reason_and_keeps_partial_output(fake):
    fake.script(text('{"name": "Ada"}'))
    exc = fails("ai/completion", ask(fake, output_schema=PERSON))
    assert exc.message == ("ai/completion: response does not match output_schema: "
                           "'age' is a required property")
    assert exc.output["text"] == '{"name": "Ada"}' and exc.output["rounds"] == 1


def test_schema_mismatch_names_the_location(fake):
    fake.script(text('{"name": "Ada", "age": "old"}'))
    exc = fails("ai/completion", ask(fake, output_schema=PERSON))
    assert exc.message == ("ai/completion: response does not match output_schema: "
                           "'old' is not of type 'integer' (at $.age)")


def test_answer_that_is_not_json_fails_output_schema(fake):
    fake.script(text("Ada, 36"))
    exc = fails("ai/completion", ask(fake, output_schema=PERSON))
    assert exc.message == ("ai/completion: response does not match output_schema: "
                           "the answer is not JSON")


# --- errors, retries -------------------------------------------------------------------------------

def test_429_is_retried_after_retry_after_seconds(fake):
    fake.script(error(429, "Rate limit reached", retry_after="1"), text("ok"))
    started = time.monotonic()
    output = invoke("ai/completion", ask(fake))
    first, second = fake.requests()
    assert output["text"] == "ok" and output["rounds"] == 1
    assert second.received_at - first.received_at >= 0.95
    assert time.monotonic() - started < 5


def test_500_is_retried_after_one_second_then_succeeds(fake):
    fake.script(error(500, "boom"), text("ok"))
    assert invoke("ai/completion", ask(fake))["text"] == "ok"
    first, second = fake.requests()
    assert 0.95 <= second.received_at - first.received_at < 1.9


def test_three_failed_tries_fail_the_attempt_with_status_and_provider_message(fake):
    fake.script(error(503, "overloaded"), error(502, "bad gateway"),
                error(503, "still overloaded"))
    exc = fails("ai/completion", ask(fake))
    assert exc.message == "ai/completion: 503 still overloaded"
    first, second, third = fake.requests()
    assert 0.95 <= second.received_at - first.received_at < 1.9  # 1 s
    assert 1.95 <= third.received_at - second.received_at < 2.9  # then 2 s


def test_client_errors_are_not_retried(fake):
    fake.script(error(404, "model 'm1' not found"))
    exc = fails("ai/completion", ask(fake))
    assert exc.message == "ai/completion: 404 model 'm1' not found"
    assert len(fake.requests()) == 1


def test_provider_message_is_read_from_ollama_style_error_and_plain_bodies(fake):
    from tests.helpers.fake_openai import Answer
    fake.script(Answer(status=400, json={"error": "invalid model name"}),
                Answer(status=401, body=b"  go away \n"))
    assert fails("ai/completion", ask(fake)).message == "ai/completion: 400 invalid model name"
    assert fails("ai/completion", ask(fake)).message == "ai/completion: 401 go away"



def test_a_provider_message_cut_inside_the_echoed_key_keeps_no_part_of_it(fake):
    # The message is cut at 500 characters: here 12 characters into the key it quotes.
    key = "sk-test-Zq8vN2kLw7pX4rT9f3c1a7e5"
    said = "Incorrect API key provided: ".ljust(488, ".") + key
    fake.script(error(401, said))
    message = fails("ai/completion", ask(fake),
                    credential=Credential("ai", "openai", {"api_key": key})).message
    assert message.startswith("ai/completion: 401 Incorrect API key provided: ...")
    assert key[:12] not in message

@pytest.mark.parametrize("header, expected", [
    ("2", 2.0), ("0.5", 0.5), ("120", 30.0), ("soon", 1.0), ("-3", 1.0), (None, 1.0)])
def test_retry_after_is_honoured_up_to_30_seconds(header, expected):
    headers = {} if header is None else {"retry-after": header}
    assert retry_delay({"headers": headers}, 1) == expected


def test_retry_after_as_http_date_and_second_wait_without_it():
    soon = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
    assert 3.0 <= retry_delay({"headers": {"retry-after": soon}}, 1) <= 5.0
    assert retry_delay({"headers": {}}, 2) == 2.0


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "the body is not JSON"),
    (b"[1, 2]", "the body is not a JSON object"),
    (b'{"choices": []}', "no choices"),
    (b'{"choices": [{"text": "legacy"}]}', "choices[0].message is missing"),
    (b'{"choices": [{"message": {"content": 7}}]}', "choices[0].message.content is not text"),
    (b'{"choices": [{"message": {"tool_calls": [{"id": "a"}]}}]}',
     "tool_calls[0] has no function name"),
])
def test_malformed_200_is_an_invalid_response_and_not_retried(fake, body, reason):
    from tests.helpers.fake_openai import Answer
    fake.script(Answer(body=body))
    exc = fails("ai/completion", ask(fake))
    assert exc.message == f"ai/completion: invalid response: {reason}"
    assert len(fake.requests()) == 1


def test_unreachable_server_fails_with_method_url_and_reason():
    with refusing_port() as port:
        base = f"http://127.0.0.1:{port}/v1"
        exc = fails("ai/completion", {"model": "m1", "prompt": "x", "base_url": base})
    assert exc.message == f"ai/completion: POST {base}/chat/completions: connection refused"


# --- cancel -----------------------------------------------------------------------------------------

@pytest.mark.alone
def test_cancel_aborts_a_slow_answer_at_once(fake):
    fake.script(text("late", hold=True))
    cancel = threading.Event()
    call = Background(lambda: invoke("ai/completion", ask(fake), cancel=cancel))
    fake.wait_for_requests(1, held=True)
    cancelled_at = time.monotonic()
    cancel.set()
    call.join(2)
    assert isinstance(call.error, ConnectorInterrupted)
    assert call.ended_at - cancelled_at < 0.2


@pytest.mark.alone
def test_cancel_ends_a_retry_wait_at_once(fake):
    fake.script(error(429, "wait", retry_after="30"))
    cancel = threading.Event()
    call = Background(lambda: invoke("ai/completion", ask(fake), cancel=cancel))
    fake.wait_for_requests(1)
    time.sleep(0.1)  # let it enter the wait (the outcome is the same if it has not)
    cancelled_at = time.monotonic()
    cancel.set()
    call.join(2)
    assert isinstance(call.error, ConnectorInterrupted)
    assert call.ended_at - cancelled_at < 0.2
    assert len(fake.requests()) == 1


# --- params -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    ({"prompt": "x"}, "ai/completion: model is required"),
    ({"model": 3, "prompt": "x"}, "ai/completion: model must be a string"),
    ({"model": "m"}, "ai/completion: prompt is required"),
    ({"model": "m", "prompt": "x", "output_schema": "person"},
     "ai/completion: output_schema must be a map"),
    ({"model": "m", "prompt": "x", "output_schema": {"type": "thing"}},
     "ai/completion: invalid output_schema: 'thing' is not valid under any of the given "
     "schemas (at $.type)"),
    ({"model": "m", "prompt": "x", "max_tokens": 0},
     "ai/completion: max_tokens must be a positive integer"),
    ({"model": "m", "prompt": "x", "temperature": "hot"},
     "ai/completion: temperature must be a number"),
    ({"model": "m", "prompt": "x", "max_tool_rounds": -1},
     "ai/completion: max_tool_rounds must be an integer >= 0"),
    ({"model": "m", "prompt": "x", "max_tool_calls_per_round": True},
     "ai/completion: max_tool_calls_per_round must be a positive integer"),
    ({"model": "m", "prompt": "x", "base_url": "ftp://x"},
     'ai/completion: invalid base_url "ftp://x"'),
    ({"model": "m", "prompt": "x", "tools": {"a": 1}}, "ai/completion: tools must be a list"),
    ({"model": "m", "prompt": "x", "tools": [{"action": "core/log"}]},
     "ai/completion: tools[0].name is required"),
    ({"model": "m", "prompt": "x", "tools": [{"name": "a b", "action": "core/log"}]},
     "ai/completion: tools[0].name must match ^[A-Za-z0-9_-]{1,64}$"),
    ({"model": "m", "prompt": "x", "tools": [{"name": "a"}]},
     "ai/completion: tools[0].action is required"),
    ({"model": "m", "prompt": "x", "tools": [{"name": "a", "action": "core/log"},
                                              {"name": "a", "action": "core/log"}]},
     'ai/completion: duplicate tool name "a"'),
    ({"model": "m", "prompt": "x", "tools": [{"name": "a", "action": "core/log",
                                              "params": [1]}]},
     "ai/completion: tools[0].params must be a map"),
    ({"model": "m", "prompt": "x", "tools": [{"name": "a", "action": "core/log",
                                              "input_schema": {"type": 5}}]},
     "ai/completion: invalid tools[0].input_schema: 5 is not valid under any of the given "
     "schemas (at $.type)"),
])
def test_bad_params_fail_without_retry_and_send_nothing(fake, params, message):
    exc = fails("ai/completion", params)
    assert exc.message == message
    assert exc.retryable is False
    assert fake.requests(None) == []


def test_a_ref_to_a_url_in_output_schema_is_never_fetched(fake):
    from tests.helpers.http_target import HttpTarget
    with HttpTarget() as target:
        target.route("/schema.json", json={"type": "string"})
        fake.script(text('"Ada"'))
        exc = fails("ai/completion", ask(fake, output_schema={
            "$ref": target.url("/schema.json")}))
        assert target.hits("/schema.json") == 0
    assert exc.message == (f"ai/completion: invalid output_schema: unresolvable $ref "
                           f"'{target.url('/schema.json')}'")
    assert exc.retryable is False


def test_local_refs_and_an_own_schema_dialect_are_honoured(fake):
    schema = {"$schema": "http://json-schema.org/draft-07/schema#",
              "definitions": {"n": {"type": "integer"}},
              "type": "object", "properties": {"n": {"$ref": "#/definitions/n"}}}
    fake.script(text('{"n": "x"}'))
    assert fails("ai/completion", ask(fake, output_schema=schema)).message == (
        "ai/completion: response does not match output_schema: "
        "'x' is not of type 'integer' (at $.n)")
