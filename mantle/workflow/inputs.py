"""Checking supplied input values against a workflow's declarations (SPEC 2.2)."""

from __future__ import annotations

import copy
import sys
from typing import Any, Mapping

from mantle.errors import InvalidInput
from mantle.workflow.model import Workflow

__all__ = ["check_inputs"]


def _is_number(value: Any) -> bool:
    # Within a double: no expression can hold more (nor JSON NaN or infinity), and the API
    # refuses such numbers while parsing; a workflow/run step's literal inputs are not parsed.
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and abs(value) <= sys.float_info.max)


_CHECKS = {
    "string": lambda value: isinstance(value, str),
    "number": _is_number,
    "boolean": lambda value: isinstance(value, bool),
}


def check_inputs(workflow: Workflow, supplied: Mapping[str, Any] | None) -> dict[str, Any]:
    """The effective inputs: supplied values plus the defaults of the others.

    Raises InvalidInput for the first unknown name or mistyped value, in the supplied order.
    Undeclared types accept any value; an unsupplied input without default is absent. Defaults
    are copied, so callers may not mutate the workflow's definition through the result.
    """
    supplied = supplied or {}
    for name, value in supplied.items():
        spec = workflow.inputs.get(name)
        if spec is None:
            raise InvalidInput(f'unknown input "{name}"')
        check = _CHECKS.get(spec.type)
        if check is not None and not check(value):
            raise InvalidInput(f'input "{name}" must be a {spec.type}')
    effective: dict[str, Any] = {}
    for name, spec in workflow.inputs.items():
        if name in supplied:
            effective[name] = supplied[name]
        elif spec.has_default:
            effective[name] = copy.deepcopy(spec.default)
    return effective
