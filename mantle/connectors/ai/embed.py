"""``ai/embed`` (SPEC 13.6): embeddings from any OpenAI-compatible ``/embeddings`` endpoint,
with each vector also as a pgvector text literal (``[0.1,0.2]``) ready for a
``postgres/query`` parameter (``$1::vector``). Runs on the step's thread."""

from __future__ import annotations

import time
from typing import Any

from mantle.connectors.ai.client import Client, base_url_of, param_error
from mantle.connectors.ai.usage import read_usage
from mantle.connectors.base import Invocation, params_of

__all__ = ["embed", "pgvector_literal"]

ACTION = "ai/embed"


def embed(inv: Invocation) -> dict:
    """One ``/embeddings`` request (retried on 429/5xx like ``ai/completion``)."""
    started = time.monotonic()
    params = params_of(inv)
    base_url = base_url_of(ACTION, params)
    model = params.get("model")
    if model is None or model == "":
        raise param_error(f"{ACTION}: model is required")
    if not isinstance(model, str):
        raise param_error(f"{ACTION}: model must be a string")
    inputs = _inputs(params.get("input"))
    payload: dict[str, Any] = {"model": model, "input": params["input"]}
    dimensions = params.get("dimensions")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise param_error(f"{ACTION}: dimensions must be a positive integer")
        payload["dimensions"] = dimensions
    client = Client(inv, ACTION, base_url + "/embeddings", model, started)
    data = client.post(payload)
    vectors = _vectors(client, data, len(inputs))
    usage = read_usage(data.get("usage"))
    client.count_tokens(usage)
    answered = data.get("model")
    return {
        "embedding": vectors[0],
        "embeddings": vectors,
        "vector": pgvector_literal(vectors[0]),
        "vectors": [pgvector_literal(vector) for vector in vectors],
        "count": len(vectors),
        "dimensions": len(vectors[0]),
        "model": answered if isinstance(answered, str) and answered else model,
        "usage": {"prompt_tokens": usage["prompt_tokens"],
                  "total_tokens": usage["total_tokens"]},
    }


def pgvector_literal(vector: list) -> str:
    """``[0.1,0.2]``: pgvector's text form (shortest round-trip float text)."""
    return "[" + ",".join(repr(float(value)) for value in vector) + "]"


def _inputs(raw: Any) -> list[str]:
    if raw is None or raw == "":
        raise param_error(f"{ACTION}: input is required")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        return raw
    raise param_error(f"{ACTION}: input must be a string or a non-empty list of strings")


def _vectors(client: Client, data: dict, expected: int) -> list[list]:
    """The vectors in input order (by ``index`` when given), checked."""
    items = data.get("data")
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise client.invalid("data is not a list of embeddings")
    if len(items) != expected:
        raise client.invalid(f"{len(items)} embedding(s) for {expected} input(s)")
    if all(isinstance(item.get("index"), int) for item in items):
        items = sorted(items, key=lambda item: item["index"])
    vectors = []
    for position, item in enumerate(items):
        vector = item.get("embedding")
        if (not isinstance(vector, list) or not vector or not all(
                isinstance(value, (int, float)) and not isinstance(value, bool)
                for value in vector)):
            raise client.invalid(f"data[{position}].embedding is not a list of numbers")
        vectors.append(vector)
    if len({len(vector) for vector in vectors}) > 1:
        raise client.invalid("the embeddings differ in length")
    return vectors
