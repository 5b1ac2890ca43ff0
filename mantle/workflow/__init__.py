"""Workflow definitions: YAML loading, validation (SPEC 2.7) and the immutable model."""

from __future__ import annotations

from mantle.errors import ValidationFailed
from mantle.workflow.build import workflow_from_definition
from mantle.workflow.inputs import check_inputs
from mantle.workflow.loader import DocumentError, load_document
from mantle.workflow.model import Hooks, InputSpec, Step, Trigger, Workflow
from mantle.workflow.report import ValidationError
from mantle.workflow.validate import validate_document

__all__ = [
    "load_workflow",
    "validate_workflow",
    "workflow_from_definition",
    "check_inputs",
    "ValidationError",
    "Workflow",
    "InputSpec",
    "Step",
    "Trigger",
    "Hooks",
]


def validate_workflow(raw: bytes) -> dict:
    """Parse and check ``raw``; return the definition or raise ValidationFailed (all errors)."""
    try:
        document = load_document(raw)
    except DocumentError as problem:
        raise ValidationFailed([problem.error]) from None
    return validate_document(document)


def load_workflow(raw: bytes) -> Workflow:
    """Parse, validate and build the model of a workflow file's bytes.

    Raises ``mantle.errors.ValidationFailed`` whose ``errors`` are ValidationError records
    sorted by line, column and rule number.
    """
    return workflow_from_definition(validate_workflow(raw))
