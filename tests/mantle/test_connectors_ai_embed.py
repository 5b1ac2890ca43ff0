"""``ai/embed`` (SPEC 13.6) against the fake OpenAI-compatible server, and the token line that
``mantle logs`` prints under AI steps."""

from __future__ import annotations

import pytest

from mantle.connectors.ai import pgvector_literal, usage_line
from mantle.metrics import Metrics
from tests.helpers.fake_openai import EMBEDDINGS, Answer, embedding, error
from tests.mantle.test_connectors_ai import fails, fake, invoke  # noqa: F401


def embed_params(fake, **params):
    return {"model": "e1", "input": "hello", "base_url": fake.base_url, **params}


def test_one_input_gives_embedding_vector_literal_count_dimensions_and_usage(fake):
    fake.script(embedding([0.1, -0.25, 3], usage=4), path=EMBEDDINGS)
    output = invoke("ai/embed", embed_params(fake))
    assert output == {
        "embedding": [0.1, -0.25, 3], "embeddings": [[0.1, -0.25, 3]],
        "vector": "[0.1,-0.25,3.0]", "vectors": ["[0.1,-0.25,3.0]"],
        "count": 1, "dimensions": 3, "model": "fake-embed",
        "usage": {"prompt_tokens": 4, "total_tokens": 4}}
    [sent] = fake.requests(EMBEDDINGS)
    assert sent.json == {"model": "e1", "input": "hello"}
    assert "authorization" not in sent.headers


def test_list_input_gives_vectors_in_input_order_and_dimensions_is_sent(fake):
    answer = embedding([1.0, 2.0], [3.0, 4.0])
    answer.json["data"].reverse()  # servers may answer out of order; ``index`` decides
    fake.script(answer, path=EMBEDDINGS)
    output = invoke("ai/embed", embed_params(fake, input=["a", "b"], dimensions=2))
    assert output["embeddings"] == [[1.0, 2.0], [3.0, 4.0]]
    assert output["vectors"] == ["[1.0,2.0]", "[3.0,4.0]"]
    assert output["count"] == 2 and output["dimensions"] == 2
    assert fake.requests(EMBEDDINGS)[0].json == {"model": "e1", "input": ["a", "b"],
                                                 "dimensions": 2}


def test_pgvector_literal_uses_shortest_round_trip_floats():
    assert pgvector_literal([0.1, 1e-05, -2, 123456789.5]) == "[0.1,1e-05,-2.0,123456789.5]"


def test_embed_retries_5xx_and_counts_metrics(fake):
    fake.script(error(503, "loading model"), embedding([0.5], usage=3), path=EMBEDDINGS)
    metrics = Metrics()
    assert invoke("ai/embed", embed_params(fake), metrics=metrics)["vector"] == "[0.5]"
    value = metrics.registry.get_sample_value
    assert value("mantle_ai_requests_total", {"model": "e1", "status": "503"}) == 1
    assert value("mantle_ai_requests_total", {"model": "e1", "status": "200"}) == 1
    assert value("mantle_ai_tokens_total", {"model": "e1", "kind": "prompt"}) == 3


@pytest.mark.parametrize("answer, reason", [
    (Answer(json={"data": [{"embedding": [1.0]}, {"embedding": [2.0]}]}),
     "2 embedding(s) for 1 input(s)"),
    (Answer(json={"data": [{"embedding": "AAAA"}]}), "data[0].embedding is not a list of numbers"),
    (Answer(json={"object": "list"}), "data is not a list of embeddings"),
    # inf (then "Infinity" in the output), or an integer no float holds (an internal error)
    (Answer(body=b'{"data": [{"embedding": [0.5, 1e999]}]}'), "the body is not JSON"),
    (Answer(body=b'{"data": [{"embedding": [0.5, 1' + b"0" * 400 + b']}]}'),
     "the body is not JSON"),
])
def test_malformed_embeddings_are_invalid_responses(fake, answer, reason):
    fake.script(answer, path=EMBEDDINGS)
    assert fails("ai/embed", embed_params(fake)).message == f"ai/embed: invalid response: {reason}"


@pytest.mark.parametrize("params, message", [
    ({"input": "x"}, "ai/embed: model is required"),
    ({"model": "e1"}, "ai/embed: input is required"),
    ({"model": "e1", "input": []},
     "ai/embed: input must be a string or a non-empty list of strings"),
    ({"model": "e1", "input": ["a", 2]},
     "ai/embed: input must be a string or a non-empty list of strings"),
    ({"model": "e1", "input": "a", "dimensions": 0},
     "ai/embed: dimensions must be a positive integer"),
    ({"model": "e1", "input": "a", "base_url": "localhost:11434"},
     'ai/embed: invalid base_url "localhost:11434"'),
])
def test_bad_embed_params_fail_without_retry(fake, params, message):
    exc = fails("ai/embed", params)
    assert (exc.message, exc.retryable) == (message, False)
    assert fake.requests(None) == []


def test_embed_http_errors_name_the_action(fake):
    fake.script(error(400, "input too long"), path=EMBEDDINGS)
    assert fails("ai/embed", embed_params(fake)).message == "ai/embed: 400 input too long"


# --- the mantle logs line ----------------------------------------------------------------------

def test_usage_line_of_a_completion_step():
    step = {"output": {"text": "x", "model": "llama3.2", "rounds": 3, "usage": {
        "prompt_tokens": 1234, "completion_tokens": 56, "total_tokens": 1290}}}
    assert usage_line(step) == ("    tokens: 1234 prompt + 56 completion = 1290 total "
                                "(3 rounds, model llama3.2)")


def test_usage_line_of_an_embed_step_and_of_one_round():
    embed = {"output": {"embeddings": [[1.0], [2.0]], "model": "nomic",
                        "usage": {"prompt_tokens": 12, "total_tokens": 12}}}
    assert usage_line(embed) == "    tokens: 12 prompt = 12 total (2 inputs, model nomic)"
    one = {"output": {"rounds": 1, "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                             "total_tokens": 3}}}
    assert usage_line(one) == "    tokens: 1 prompt + 2 completion = 3 total (1 round)"


@pytest.mark.parametrize("output", [
    None, {"status": 200, "body": "x"}, {"usage": "lots", "rounds": 1},
    {"usage": {"total_tokens": 3}}, {"usage": {"total_tokens": "3"}, "rounds": 1}])
def test_other_steps_have_no_usage_line(output):
    assert usage_line({"output": output}) is None
