"""Resolving ``{{ }}`` templates in step params (SPEC 3.2)."""

import pytest

from mantle.expressions import (
    MAX_TEMPLATE_LENGTH,
    ExpressionError,
    resolve_params,
    resolve_string,
)

ACTIVATION = {
    "inputs": {"limit": 10, "ratio": 3.5, "name": "Ada", "flag": True},
    "steps": {
        "fetch-data": {"output": {"n": 1, "text": "{{ inputs.limit }}"}, "status": "completed"},
    },
    "trigger": {"type": "webhook", "payload": {"a": 1, "b": [1, 2]}},
}


def resolve(value):
    return resolve_params(value, ACTIVATION)


def test_whole_value_template_keeps_the_object_type():
    assert resolve("{{ trigger.payload }}") == {"a": 1, "b": [1, 2]}


def test_whole_value_template_keeps_number_and_boolean_types():
    assert resolve("{{ inputs.limit }}") == 10
    assert resolve("{{ inputs.ratio }}") == 3.5
    assert resolve("{{ inputs.flag }}") is True
    assert resolve("{{ null }}") is None


def test_whole_value_check_ignores_surrounding_whitespace():
    assert resolve("  {{ inputs.limit }}\n") == 10


def test_text_around_a_template_makes_it_interpolation():
    assert resolve("limit={{ inputs.limit }}") == "limit=10"


def test_two_templates_are_interpolated_even_without_other_text():
    assert resolve("{{ inputs.limit }}{{ inputs.limit }}") == "1010"


def test_interpolation_inserts_strings_verbatim():
    assert resolve("hi {{ inputs.name }}!") == "hi Ada!"


def test_interpolation_renders_other_values_as_compact_json():
    text = "{{ true }} {{ 42 }} {{ inputs.ratio }} {{ null }} {{ obj('a', 1) }} {{ [1, 'x'] }}"
    assert resolve("v: " + text) == 'v: true 42 3.5 null {"a":1} [1,"x"]'


def test_unclosed_braces_are_literal_text():
    assert resolve("{{ not closed") == "{{ not closed"
    assert resolve("{{ inputs.limit }} and {{ open") == "10 and {{ open"


def test_single_braces_are_not_templates():
    assert resolve("{ inputs.limit }") == "{ inputs.limit }"


def test_template_output_containing_braces_is_not_evaluated_again():
    assert resolve("{{ steps.fetch-data.output.text }}") == "{{ inputs.limit }}"
    assert resolve("got {{ steps.fetch-data.output.text }}") == "got {{ inputs.limit }}"


def test_hyphenated_step_names_work_in_templates():
    assert resolve("{{ steps.fetch-data.output.n + 1 }}") == 2


def test_closing_braces_inside_a_string_literal_stay_in_the_expression():
    assert resolve("{{ '}}' + inputs.name }}") == "}}Ada"


def test_nested_maps_and_lists_are_resolved():
    params = {"body": {"items": ["{{ inputs.limit }}", "n{{ inputs.limit }}"], "k": 5}}
    assert resolve(params) == {"body": {"items": [10, "n10"], "k": 5}}


def test_map_keys_are_not_templated():
    assert resolve({"{{ inputs.name }}": "x"}) == {"{{ inputs.name }}": "x"}


def test_non_string_values_pass_through():
    assert resolve({"n": 1, "f": 1.5, "b": False, "z": None}) == {
        "n": 1, "f": 1.5, "b": False, "z": None,
    }


def test_input_params_are_not_modified():
    params = {"a": ["{{ inputs.limit }}"]}
    resolve(params)
    assert params == {"a": ["{{ inputs.limit }}"]}


def test_evaluation_error_raises_expression_error():
    with pytest.raises(ExpressionError, match="no such key: 'missing'"):
        resolve({"a": ["x {{ inputs.missing }}"]})


def test_default_guards_a_missing_key_in_a_template():
    assert resolve("{{ default(inputs.missing, 'none') }}") == "none"


def test_overlong_template_string_is_rejected():
    text = "{{ 1 }}" + "x" * MAX_TEMPLATE_LENGTH
    with pytest.raises(ExpressionError, match="template is 100007 characters long"):
        resolve_string(text, ACTIVATION)


def test_overlong_string_without_templates_passes_through():
    text = "x" * (MAX_TEMPLATE_LENGTH + 1)
    assert resolve_string(text, ACTIVATION) == text


def test_non_finite_result_cannot_be_rendered():
    with pytest.raises(ExpressionError, match="not a finite number"):
        resolve("x {{ 1.0 / 0.0 }}")
