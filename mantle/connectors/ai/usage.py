"""Token usage of AI steps: read from answers, summed over rounds, shown by ``mantle logs``.

Pure functions of JSON values, safe on any thread.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KINDS", "zero_usage", "read_usage", "add_usage", "usage_line"]

KINDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def zero_usage() -> dict:
    return {kind: 0 for kind in KINDS}


def read_usage(raw: Any) -> dict:
    """An answer's ``usage`` with the three counts as non-negative integers; missing or odd
    values count 0 (some local servers send no usage), a missing total is the sum."""
    usage = zero_usage()
    if isinstance(raw, dict):
        for kind in KINDS:
            value = raw.get(kind)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                usage[kind] = value
        if not usage["total_tokens"]:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def add_usage(total: dict, more: dict) -> dict:
    return {kind: total.get(kind, 0) + more.get(kind, 0) for kind in KINDS}


def usage_line(step: dict) -> str | None:
    """The ``mantle logs <id>`` line under an AI step, or None for other steps.

    ``step`` is a step of the execution detail (SPEC 7.4). AI steps are known by their output
    (or partial output): a ``usage`` map with integer ``total_tokens`` next to ``rounds``
    (``ai/completion``) or ``embeddings`` (``ai/embed``)::

        tokens: 1234 prompt + 56 completion = 1290 total (3 rounds, model llama3.2)
        tokens: 12 prompt = 12 total (2 inputs, model nomic-embed-text)
    """
    output = step.get("output")
    if not isinstance(output, dict) or not isinstance(output.get("usage"), dict):
        return None
    usage = output["usage"]
    total = usage.get("total_tokens")
    if isinstance(total, bool) or not isinstance(total, int):
        return None
    model = output.get("model")
    suffix = f", model {model}" if isinstance(model, str) and model else ""
    prompt = usage.get("prompt_tokens", 0)
    if _count(output.get("rounds")) is not None:
        rounds = output["rounds"]
        return (f"    tokens: {prompt} prompt + {usage.get('completion_tokens', 0)} completion"
                f" = {total} total ({rounds} round{'s' if rounds != 1 else ''}{suffix})")
    if isinstance(output.get("embeddings"), list):
        count = len(output["embeddings"])
        return (f"    tokens: {prompt} prompt = {total} total "
                f"({count} input{'s' if count != 1 else ''}{suffix})")
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
