"""The workflow model: examples, defaults, rebuilding from stored JSON, and input checks."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from mantle.errors import InvalidInput
from mantle.workflow import (Hooks, InputSpec, Step, Trigger, ValidationError, check_inputs,
                             load_workflow, workflow_from_definition)
from tests.mantle.test_workflow_support import load_text

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_NAMES = ["hello-world.yaml", "fan-out-fan-in.yaml", "conditional.yaml", "triggers.yaml"]

_FULL = """\
name: full
description: every field
timeout: 1m30s
max_parallel_executions: 3
on_limit: reject
inputs:
  day: {type: string, description: Day to report}
  limit: {type: number, default: 10}
  verbose: {type: boolean, default: false}
  anything: {default: {a: [1, 2]}}
  nothing:
steps:
  - name: fetch-data
    action: http/request
    params: {url: "https://example.com/{{ inputs.day }}"}
    retry: {max_attempts: 4, backoff: exponential}
    timeout: 500ms
    continue_on_error: true
    max_parallel: 2
    credential: api-token
  - name: check
    action: core/log
    if: steps.fetch-data.output.status == 200
    params:
      message: ["{{ steps['fetch-data'].output.body }}", {deep: '{{ steps["other"].status }}'}]
  - name: other
    action: core/sleep
    params: {duration: 1s}
  - name: last
    action: core/fail
    depends_on: [check]
triggers:
  - {type: cron, schedule: "0 6 * * 1-5"}
  - {type: webhook, path: /hooks/full, secret: s3cret}
hooks:
  timeout: 2m
  on_failure:
    - name: alert
      action: core/log
      if: execution.error != ""
      retry: {max_attempts: 2}
      params: {message: "{{ hooks.check-in.status }} {{ execution.error }}"}
  on_finish:
    - {name: check, action: core/log, params: {message: done}}
"""


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_validates_clean_and_rebuilds_equal_from_stored_json(name):
    workflow = load_workflow((EXAMPLES / name).read_bytes())
    stored = json.loads(json.dumps(workflow.definition, allow_nan=False))
    assert workflow_from_definition(stored) == workflow


def test_fan_out_fan_in_example_has_the_diamond_shape():
    workflow = load_workflow((EXAMPLES / "fan-out-fan-in.yaml").read_bytes())
    shape = {step.name: sorted(step.dependencies) for step in workflow.steps}
    workers = ["work-b", "work-c", "work-d", "work-e"]
    assert shape == {"prepare": [], **{w: ["prepare"] for w in workers}, "summarise": workers}


def test_conditional_example_depends_implicitly_through_dotted_and_bracket_references():
    workflow = load_workflow((EXAMPLES / "conditional.yaml").read_bytes())
    assert workflow.step("report-healthy").depends_on == ()
    assert workflow.step("report-healthy").dependencies == {"check-health"}
    assert workflow.step("report-unhealthy").dependencies == {"check-health"}
    assert workflow.step("enforce").dependencies == {"check-health", "report-unhealthy"}
    assert [step.name for step in workflow.hooks.on_failure] == ["alert"]


def test_every_field_reaches_the_model():
    workflow = load_text(_FULL)
    assert (workflow.name, workflow.description, workflow.timeout, workflow.timeout_seconds,
            workflow.max_parallel_executions, workflow.on_limit) == (
        "full", "every field", "1m30s", 90.0, 3, "reject")
    assert workflow.inputs == {
        "day": InputSpec("day", "string", "Day to report", None, False),
        "limit": InputSpec("limit", "number", None, 10, True),
        "verbose": InputSpec("verbose", "boolean", None, False, True),
        "anything": InputSpec("anything", None, None, {"a": [1, 2]}, True),
        "nothing": InputSpec("nothing", None, None, None, False),
    }
    assert workflow.steps[0] == Step(
        name="fetch-data", action="http/request",
        params={"url": "https://example.com/{{ inputs.day }}"}, condition=None, depends_on=(),
        dependencies=frozenset(), max_attempts=4, backoff="exponential", timeout="500ms",
        timeout_seconds=0.5, continue_on_error=True, max_parallel=2, credential="api-token")
    assert workflow.step("check").condition == "steps.fetch-data.output.status == 200"
    assert workflow.step("check").dependencies == {"fetch-data", "other"}
    assert (workflow.step("last").depends_on, workflow.step("last").dependencies) == (
        ("check",), {"check"})
    assert workflow.triggers == (Trigger("cron", "0 6 * * 1-5", None, None),
                                 Trigger("webhook", None, "/hooks/full", "s3cret"))


def test_hooks_keep_their_block_and_have_no_dependencies():
    hooks = load_text(_FULL).hooks
    assert (hooks.timeout, hooks.timeout_seconds, hooks.on_success) == ("2m", 120.0, ())
    alert, = hooks.on_failure
    assert (alert.hook_block, alert.max_attempts, alert.dependencies) == (
        "on_failure", 2, frozenset())
    assert hooks.block("on_finish")[0].name == "check"


def test_defaults_apply_when_fields_are_absent():
    workflow = load_text("name: tiny\nsteps: [{name: a, action: core/log}]\n")
    assert (workflow.description, workflow.inputs, workflow.triggers, workflow.timeout,
            workflow.timeout_seconds, workflow.max_parallel_executions, workflow.on_limit,
            workflow.hooks) == (None, {}, (), None, None, 0, "queue", Hooks())
    assert workflow.steps == (Step(name="a", action="core/log"),)
    assert workflow.steps[0].max_attempts == 1 and workflow.steps[0].backoff == "fixed"


def test_full_definition_rebuilds_equal_from_stored_json():
    workflow = load_text(_FULL)
    assert workflow_from_definition(json.loads(json.dumps(workflow.definition))) == workflow


def test_model_is_immutable():
    workflow = load_text(_FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        workflow.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        workflow.steps[0].max_attempts = 9


def test_validation_error_formats_the_spec_line():
    error = ValidationError(8, 7, "max_attempts must be greater than 0",
                            "steps[1].retry.max_attempts", 25)
    assert error.format("nightly.yaml") == (
        "nightly.yaml:8:7: error: max_attempts must be greater than 0 "
        "(steps[1].retry.max_attempts)")


def test_check_inputs_adds_defaults_of_unsupplied_inputs_and_leaves_others_absent():
    workflow = load_text(_FULL)
    assert check_inputs(workflow, {"day": "mon"}) == {
        "day": "mon", "limit": 10, "verbose": False, "anything": {"a": [1, 2]}}
    assert check_inputs(workflow, None) == {
        "limit": 10, "verbose": False, "anything": {"a": [1, 2]}}


def test_check_inputs_supplied_values_override_defaults_and_defaults_are_copies():
    workflow = load_text(_FULL)
    effective = check_inputs(workflow, {"limit": 2.5, "nothing": [None], "verbose": True})
    assert (effective["limit"], effective["nothing"], effective["verbose"]) == (
        2.5, [None], True)
    effective["anything"]["a"].append(3)
    assert workflow.inputs["anything"].default == {"a": [1, 2]}


def test_check_inputs_rejects_an_unknown_name():
    with pytest.raises(InvalidInput) as failure:
        check_inputs(load_text(_FULL), {"day": "mon", "colour": "red"})
    assert str(failure.value) == 'unknown input "colour"'


@pytest.mark.parametrize("name, value, kind", [
    ("day", 5, "string"),
    ("limit", "10", "number"),
    ("limit", True, "number"),
    ("limit", None, "number"),
    # Beyond a double (the API refuses it as JSON; a workflow/run step's literal inputs passed
    # it to the child, where every expression reading it failed) or not finite.
    pytest.param("limit", 10**400, "number", id="limit-beyond-a-double"),
    pytest.param("limit", float("inf"), "number", id="limit-inf"),
    ("verbose", "true", "boolean"),
    ("verbose", 1, "boolean"),
])
def test_check_inputs_rejects_a_value_of_the_wrong_type(name, value, kind):
    with pytest.raises(InvalidInput) as failure:
        check_inputs(load_text(_FULL), {name: value})
    assert str(failure.value) == f'input "{name}" must be a {kind}'
