"""The params of ``ai/completion`` (SPEC 13.6), checked before anything is sent.

A bad param fails the attempt without retry: every attempt would see the same value. JSON
Schemas (``output_schema``, each tool's ``input_schema``) are checked with ``jsonschema`` here
too, so a broken schema is reported as such and not as a model's mismatch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mantle.connectors.ai.client import base_url_of, param_error
from mantle.connectors.base import Invocation, as_text, params_of

if TYPE_CHECKING:
    import jsonschema
    from jsonschema.protocols import Validator

__all__ = ["ACTION", "Tool", "CompletionParams", "SchemaCheck", "completion_params",
           "schema_check", "DEFAULT_MAX_TOOL_ROUNDS", "DEFAULT_MAX_TOOL_CALLS_PER_ROUND",
           "TOOL_NAME"]

ACTION = "ai/completion"
DEFAULT_MAX_TOOL_ROUNDS = 10
DEFAULT_MAX_TOOL_CALLS_PER_ROUND = 10
# OpenAI's rule for function names; local servers accept at least these.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EMPTY_OBJECT_SCHEMA = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class Tool:
    """One entry of ``tools``: what the model sees, and the action it runs."""

    name: str
    description: str
    input_schema: dict
    action: str
    params: dict
    arguments: SchemaCheck  # input_schema, closed unless it allows more (_open_by_default)
    credential: str | None = None  # the tool's own credential name (never the model's)

    def definition(self) -> dict:
        """The tool as sent in the request's ``tools`` list."""
        function = {"name": self.name, "parameters": self.input_schema}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class CompletionParams:
    base_url: str
    model: str
    prompt: str
    system_prompt: str | None
    output_schema: dict | None
    output_check: SchemaCheck | None
    max_tokens: int | None
    temperature: float | None
    tools: tuple[Tool, ...]
    max_tool_rounds: int
    max_tool_calls_per_round: int

    def tool(self, name: str) -> Tool | None:
        return next((tool for tool in self.tools if tool.name == name), None)


def completion_params(inv: Invocation) -> CompletionParams:
    """The checked params of an ``ai/completion`` attempt (ConnectorError, not retried)."""
    params = params_of(inv)
    schema = params.get("output_schema")
    check = None if schema is None else schema_check(schema, "output_schema")
    return CompletionParams(
        base_url=base_url_of(ACTION, params),
        model=_required_text(params, "model"),
        prompt=_required_any(params, "prompt"),
        system_prompt=None if params.get("system_prompt") is None
        else as_text(params["system_prompt"]),
        output_schema=schema,
        output_check=check,
        max_tokens=_integer(params, "max_tokens", None, minimum=1),
        temperature=_number(params, "temperature"),
        tools=_tools(params.get("tools")),
        max_tool_rounds=_integer(params, "max_tool_rounds", DEFAULT_MAX_TOOL_ROUNDS, 0),
        max_tool_calls_per_round=_integer(params, "max_tool_calls_per_round",
                                          DEFAULT_MAX_TOOL_CALLS_PER_ROUND, 1),
    )


@dataclass(frozen=True, slots=True)
class SchemaCheck:
    """A JSON Schema given as a param (``where`` names it in errors), ready to validate."""

    where: str
    validator: Validator

    def problem(self, value: Any) -> str | None:
        """Why ``value`` does not match, or None: the most relevant error, with its location.

        A ``$ref`` that cannot be resolved is a broken schema, found only now: a param error.
        """
        import jsonschema
        import referencing.exceptions

        try:
            error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        except referencing.exceptions.Unresolvable as exc:
            raise param_error(f"{ACTION}: invalid {self.where}: unresolvable $ref "
                              f"{exc.ref!r}") from None
        return None if error is None else _located(error)


def schema_check(schema: Any, where: str) -> SchemaCheck:
    """Check a JSON Schema param (its own ``$schema`` or draft 2020-12); a param error if bad."""
    import jsonschema  # here, not at the top: every CLI command imports the connectors
    import referencing

    if not isinstance(schema, dict):
        raise param_error(f"{ACTION}: {where} must be a map")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise param_error(f"{ACTION}: invalid {where}: {_located(exc)}") from None
    # An empty registry: a ``$ref`` to a URL is unresolvable instead of fetched (jsonschema's
    # default still downloads it: a blocking request to wherever the workflow points).
    return SchemaCheck(where, cls(schema, registry=referencing.Registry()))


def _located(error: jsonschema.ValidationError | jsonschema.SchemaError) -> str:
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                   for part in error.absolute_path)
    message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
    return f"{message} (at ${path})" if path else message


def _required_text(params: dict, name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise param_error(f"{ACTION}: {name} is required")
    if not isinstance(value, str):
        raise param_error(f"{ACTION}: {name} must be a string")
    return value


def _required_any(params: dict, name: str) -> str:
    """A text param; other values are sent as their compact JSON (SPEC 3.2's rendering)."""
    value = params.get(name)
    if value is None or value == "":
        raise param_error(f"{ACTION}: {name} is required")
    return as_text(value)


def _integer(params: dict, name: str, default: int | None, minimum: int) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum >= 1 else "an integer >= 0"
        raise param_error(f"{ACTION}: {name} must be {kind}")
    return value


def _number(params: dict, name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise param_error(f"{ACTION}: {name} must be a number")
    return value


def _tools(raw: Any) -> tuple[Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise param_error(f"{ACTION}: tools must be a list")
    tools: list[Tool] = []
    for index, entry in enumerate(raw):
        tool = _tool(entry, f"tools[{index}]")
        if any(other.name == tool.name for other in tools):
            raise param_error(f'{ACTION}: duplicate tool name "{tool.name}"')
        tools.append(tool)
    return tuple(tools)


def _open_by_default(schema: dict) -> bool:
    """Whether the schema lists ``properties`` but says nothing about others.

    The model's arguments are merged over the tool's ``params``, so an argument the schema does
    not declare could replace a fixed param (an ``http/request`` tool's ``url``, which carries
    the step's credential). Such arguments are refused unless the schema allows them with
    ``additionalProperties`` or ``patternProperties``.
    """
    return ("properties" in schema and "additionalProperties" not in schema
            and "patternProperties" not in schema)


def _tool(entry: Any, where: str) -> Tool:
    if not isinstance(entry, dict):
        raise param_error(f"{ACTION}: {where} must be a map")
    name = entry.get("name")
    if name is None or name == "":
        raise param_error(f"{ACTION}: {where}.name is required")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise param_error(f"{ACTION}: {where}.name must match ^[A-Za-z0-9_-]{{1,64}}$")
    action = entry.get("action")
    if action is None or action == "":
        raise param_error(f"{ACTION}: {where}.action is required")
    if not isinstance(action, str):
        raise param_error(f"{ACTION}: {where}.action must be a string")
    description = entry.get("description")
    if description is not None and not isinstance(description, str):
        raise param_error(f"{ACTION}: {where}.description must be a string")
    schema = entry.get("input_schema")
    schema = dict(_EMPTY_OBJECT_SCHEMA) if schema is None else schema
    check = schema_check(schema, f"{where}.input_schema")
    if _open_by_default(schema):
        check = schema_check({**schema, "additionalProperties": False},
                             f"{where}.input_schema")
    params = entry.get("params")
    if params is not None and not isinstance(params, dict):
        raise param_error(f"{ACTION}: {where}.params must be a map")
    credential = entry.get("credential")
    if credential is not None and (not isinstance(credential, str) or not credential):
        raise param_error(f"{ACTION}: {where}.credential must be a credential name")
    return Tool(name, description or "", schema, action, params or {}, check, credential)
