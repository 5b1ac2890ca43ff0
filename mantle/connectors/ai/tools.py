"""Running the tool calls of one round (SPEC 13.6) on the step's own thread.

Each call becomes one ``tool`` message for the model. A call runs its tool's action through
``Invocation.run_tool`` (the engine's service: the step's credential rules, cancel and plugins)
with the model's arguments merged over the tool's ``params``. Whatever goes wrong with one call
(unknown tool, arguments that do not match ``input_schema``, the action failing, the per-round
limit) is answered to the model as ``{"error": ...}``, and the loop goes on; only a cancel ends
the attempt.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from mantle.connectors.ai.params import CompletionParams
from mantle.connectors.base import (MAX_OUTPUT_BYTES, ConnectorError, ConnectorInterrupted,
                                    Invocation, json_size, output_too_large, parse_json)

__all__ = ["LIMIT_EXCEEDED", "tool_message", "unanswered_calls", "answer_call"]

LIMIT_EXCEEDED = "tool call limit per round exceeded"


def unanswered_calls(messages: list[dict]) -> list[tuple[int, dict]]:
    """(index in its round, call) of the last assistant message's tool calls that have no
    ``tool`` message after it yet: the rest of a round interrupted by a crash, or a new one."""
    for position in range(len(messages) - 1, -1, -1):
        message = messages[position]
        if message.get("role") == "assistant":
            calls = message.get("tool_calls") or []
            answered = {m.get("tool_call_id") for m in messages[position + 1:]
                        if m.get("role") == "tool"}
            return [(index, call) for index, call in enumerate(calls)
                    if call["id"] not in answered]
    return []


def tool_message(call: dict, result: Any) -> dict:
    """The ``tool`` message answering ``call``; its content is the result as compact JSON."""
    content = json.dumps(result, separators=(",", ":"), ensure_ascii=False)
    return {"role": "tool", "tool_call_id": call["id"], "content": content}


def answer_call(inv: Invocation, params: CompletionParams, round_number: int, index: int,
                call: dict) -> tuple[Any, bool]:
    """The result for the model of the ``index``-th call of round ``round_number``, and
    whether an action ran for it (what must then be checkpointed before anything else).

    The action is told the call as ``<round>.<index>`` (``call_id``), its place in the
    checkpointed conversation, the same after a resume: a ``workflow/run`` tool's child is
    keyed by it. Never the server's id: servers reuse ids across rounds."""
    if index >= params.max_tool_calls_per_round:
        return {"error": LIMIT_EXCEEDED}, False
    function = call["function"]
    tool = params.tool(function["name"])
    if tool is None:
        return {"error": f'unknown tool "{function["name"]}"'}, False
    arguments, problem = _arguments(function["arguments"])
    if problem is None:
        found = tool.arguments.problem(arguments)
        problem = None if found is None else f"invalid arguments: {found}"
    if problem is not None:
        return {"error": problem}, False
    try:
        output = _runner(inv)(tool.action, {**tool.params, **arguments},
                              credential=tool.credential, call_id=f"{round_number}.{index}")
    except ConnectorInterrupted:
        raise
    except ConnectorError as exc:
        if inv.cancel.is_set():  # the action failed because the step is being stopped
            raise ConnectorInterrupted() from None
        return {"error": exc.message}, True
    # As a step's output is held to the limit: every result is sent to the model again in
    # each later round, and stored in each checkpoint of the conversation.
    if (size := json_size(output)) > MAX_OUTPUT_BYTES:
        return {"error": output_too_large(size)}, True
    return output, True


def _arguments(raw: Any) -> tuple[dict, str | None]:
    """The call's arguments as a map: servers send a JSON string (OpenAI) or an object."""
    if isinstance(raw, str):
        if not raw.strip():
            return {}, None
        try:
            raw = parse_json(raw)
        except (ValueError, RecursionError) as exc:
            return {}, f"invalid arguments: not JSON ({exc})"
    if not isinstance(raw, dict):
        return {}, "invalid arguments: must be a JSON object"
    return raw, None


def _runner(inv: Invocation) -> Callable[..., dict]:
    """``inv.run_tool``, or for a caller without that service (direct calls) ``run_action``
    on a copy of this invocation, without the step's credential."""
    if inv.run_tool is not None:
        return inv.run_tool
    from mantle.connectors import run_action  # the registry imports this package

    def run(action: str, params: Any, credential: str | None = None,
            call_id: str | None = None) -> dict:
        if credential is not None:
            raise ConnectorError(f'credential "{credential}" needs the engine')
        return run_action(dataclasses.replace(inv, action=action, params=params,
                                              progress=None, checkpoint=None,
                                              credential=None))
    return run
