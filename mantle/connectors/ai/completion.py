"""``ai/completion`` (SPEC 13.6): a chat completion, with structured output and a durable tool
loop, against any OpenAI-compatible server.

The loop, on the step's thread: send the conversation (with the tools while tool rounds are
left); an answer with tool calls is checkpointed, its calls are run one by one (each checkpointed
after its action ran), and the next model call follows; an answer without tool calls is the
final one. When ``max_tool_rounds`` rounds have asked for tools, one last call without tools
asks for the final answer. ``rounds`` counts model calls, that last one included.

Durability: the progress passed to ``Invocation.checkpoint`` is the whole conversation so far
plus ``rounds`` and ``usage``. A resumed attempt (``Invocation.progress`` set after a crash)
continues from it: answered model calls and tool calls that ran are never repeated; only the
call in flight at the crash is made again (at-least-once, SPEC 4.11). The final answer is
checkpointed too (the last message, with ``final``): a crash before its step output was
stored resumes to that output, not to a second model call.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from mantle.connectors.ai.client import Client
from mantle.connectors.ai.params import ACTION, CompletionParams, completion_params
from mantle.connectors.ai.tools import answer_call, tool_message, unanswered_calls
from mantle.connectors.ai.usage import add_usage, read_usage, zero_usage
from mantle.connectors.base import ConnectorError, Invocation, parse_json
from mantle.connectors.credentials import redact

__all__ = ["completion", "FINAL_ANSWER_PROMPT", "PROGRESS_VERSION"]

# Sent as a user message with the last call when the tool rounds are exhausted.
FINAL_ANSWER_PROMPT = ("No more tool calls are possible. Give your final answer now, using "
                       "the tool results above.")
PROGRESS_VERSION = 1


@dataclass
class _State:
    """The conversation so far: what a checkpoint stores and a resumed attempt starts from."""

    messages: list[dict]
    rounds: int = 0
    usage: dict = field(default_factory=zero_usage)
    # Once answered: the final answer's finish_reason and model (the answer is the last message).
    final: dict | None = None

    @classmethod
    def start(cls, params: CompletionParams) -> _State:
        messages = []
        if params.system_prompt is not None:
            messages.append({"role": "system", "content": params.system_prompt})
        messages.append({"role": "user", "content": params.prompt})
        return cls(messages)

    @classmethod
    def restore(cls, progress: Any) -> _State | None:
        """The state a checkpoint holds, or None when it is not one of ours (start afresh)."""
        if not isinstance(progress, dict) or progress.get("version") != PROGRESS_VERSION:
            return None
        messages, rounds = progress.get("messages"), progress.get("rounds")
        if (not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages)
                or isinstance(rounds, bool) or not isinstance(rounds, int)):
            return None
        final = progress.get("final")
        if final is not None and not (isinstance(final, dict) and messages
                                      and messages[-1].get("role") == "assistant"):
            return None
        return cls(messages, rounds, read_usage(progress.get("usage")), final)

    def progress(self) -> dict:
        progress = {"version": PROGRESS_VERSION, "rounds": self.rounds, "usage": self.usage,
                    "messages": self.messages}
        if self.final is not None:
            progress["final"] = self.final
        return progress


@dataclass(frozen=True, slots=True)
class _Answer:
    message: dict  # the assistant message as it goes back into the conversation
    text: str
    finish_reason: str | None
    model: str | None
    usage: dict
    tool_calls: list[dict]  # normalised: id, type, function {name, arguments (text)}

    @classmethod
    def checkpointed(cls, state: _State) -> _Answer:
        """The final answer a checkpoint holds (its usage is in the state's already)."""
        message, final = state.messages[-1], state.final
        text, calls = message.get("content"), message.get("tool_calls")
        finish, model = final.get("finish_reason"), final.get("model")
        return cls(message, text if isinstance(text, str) else "",
                   finish if isinstance(finish, str) else None,
                   model if isinstance(model, str) else None, zero_usage(),
                   calls if isinstance(calls, list) else [])


def completion(inv: Invocation) -> dict:
    """Run the loop to the final answer; return the SPEC 13.6 output."""
    started = time.monotonic()
    params = completion_params(inv)
    client = Client(inv, ACTION, params.base_url + "/chat/completions", params.model, started)
    state = _State.restore(inv.progress) or _State.start(params)
    try:
        return _loop(inv, params, client, state)
    except ConnectorError as exc:
        if exc.output is not None or not state.rounds:
            raise
        partial = {"model": params.model, "usage": state.usage, "rounds": state.rounds}
        raise ConnectorError(exc.message, partial, exc.retryable) from None


def _loop(inv: Invocation, params: CompletionParams, client: Client, state: _State) -> dict:
    while True:
        if state.final is not None:  # answered before a crash: never asked again
            return _output(params, _Answer.checkpointed(state), state)
        _run_tools(inv, params, state)
        offer_tools = bool(params.tools) and state.rounds < params.max_tool_rounds
        messages = state.messages
        if params.tools and not offer_tools and state.rounds:
            messages = messages + [{"role": "user", "content": FINAL_ANSWER_PROMPT}]
        answer = _parse(client, client.post(_request(params, messages, offer_tools)),
                        state.rounds + 1)
        state.rounds += 1
        state.usage = add_usage(state.usage, answer.usage)
        client.count_tokens(answer.usage)
        state.messages.append(answer.message)
        if not (offer_tools and answer.tool_calls):
            state.final = {"finish_reason": answer.finish_reason, "model": answer.model}
        _checkpoint(inv, state)
        if state.final is not None:
            return _output(params, answer, state)


def _run_tools(inv: Invocation, params: CompletionParams, state: _State) -> None:
    """Answer every call of the last round (round ``state.rounds``) that has no result yet,
    checkpointing after each action that ran and at the end of the round."""
    unsaved = False
    for index, call in unanswered_calls(state.messages):
        result, ran = answer_call(inv, params, state.rounds, index, call)
        state.messages.append(tool_message(call, result))
        unsaved = True
        if ran:
            _checkpoint(inv, state)
            unsaved = False
    if unsaved:
        _checkpoint(inv, state)


def _checkpoint(inv: Invocation, state: _State) -> None:
    if inv.checkpoint is not None:
        inv.checkpoint(redact(state.progress(), inv.credential))


def _request(params: CompletionParams, messages: list[dict], offer_tools: bool) -> dict:
    body: dict[str, Any] = {"model": params.model, "messages": messages}
    if offer_tools:
        body["tools"] = [tool.definition() for tool in params.tools]
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.output_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": params.output_schema}}
    return body


def _parse(client: Client, data: dict, round_number: int) -> _Answer:
    """The first choice of a chat completion, checked and normalised."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise client.invalid("no choices")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise client.invalid("choices[0].message is missing")
    text = _text(client, message.get("content"))
    calls = _tool_calls(client, message.get("tool_calls"), round_number)
    content = message.get("content")  # sent back as received; text parts joined
    assistant: dict[str, Any] = {"role": "assistant",
                                 "content": content if content is None else text}
    if calls:
        assistant["tool_calls"] = calls
    finish = choice.get("finish_reason")
    model = data.get("model")
    return _Answer(assistant, text, finish if isinstance(finish, str) else None,
                   model if isinstance(model, str) and model else None,
                   read_usage(data.get("usage")), calls)


def _text(client: Client, content: Any) -> str:
    """The message text: a string, null (tool calls only), or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part.get("text", ""), str))
    raise client.invalid("choices[0].message.content is not text")


def _tool_calls(client: Client, raw: Any, round_number: int) -> list[dict]:
    """Tool calls with an id each, unique in the round (made up when a server sends none or
    repeats one) and their arguments as JSON text, as they must be sent back."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise client.invalid("choices[0].message.tool_calls is not a list")
    calls, seen = [], set()
    for index, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise client.invalid(f"tool_calls[{index}] has no function name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps({} if arguments is None else arguments,
                                   separators=(",", ":"), ensure_ascii=False)
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id or call_id in seen:
            call_id, extra = f"call_{round_number}_{index}", 0
            while call_id in seen:  # the server sent this one: results are matched by id
                extra += 1
                call_id = f"call_{round_number}_{index}_{extra}"
        seen.add(call_id)
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": function["name"], "arguments": arguments}})
    return calls


def _output(params: CompletionParams, answer: _Answer, state: _State) -> dict:
    output: dict[str, Any] = {"text": answer.text}
    try:
        output["json"] = parse_json(answer.text)
    except (ValueError, RecursionError):
        pass
    output.update(finish_reason=answer.finish_reason, model=answer.model or params.model,
                  usage=state.usage, tool_calls=[_shown(call) for call in answer.tool_calls],
                  rounds=state.rounds)
    if params.output_check is not None:
        if "json" not in output:
            problem = "the answer is not JSON"
        else:
            problem = params.output_check.problem(output["json"])
        if problem is not None:
            raise ConnectorError(
                f"{ACTION}: response does not match output_schema: {problem}", output)
    return output


def _shown(call: dict) -> dict:
    """A tool call as the step output shows it: arguments decoded when they are JSON."""
    arguments: Any = call["function"]["arguments"]
    try:
        arguments = parse_json(arguments)
    except (ValueError, RecursionError):
        pass
    return {"id": call["id"], "name": call["function"]["name"], "arguments": arguments}
