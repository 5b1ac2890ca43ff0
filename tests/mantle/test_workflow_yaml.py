"""YAML loading: the 1.2 core schema, positions, duplicate keys and hostile input."""

from __future__ import annotations

import json
import time

import pytest

from mantle.errors import ValidationFailed
from mantle.workflow import load_workflow
from mantle.workflow.loader import MAX_DEPTH, MAX_NODES, load_document
from tests.mantle.test_workflow_support import as_tuple, errors_of, load_text, only_error

_SCALARS = """\
name: demo
on: yes
steps:
  - name: a
    action: core/log
    params:
      on: yes
      off: no
      y: y
      day: 2024-01-01
      stamp: 2024-01-01T10:00:00Z
      t: True
      f: FALSE
      tilde: ~
      empty:
      "null": null
      octal: 0o17
      hex: 0x1F
      negative: -12
      leading_zero: 012
      exp: 1.5e3
      dot: .5
      inf: .inf
      nan: .NaN
      huge: 1e999
      quoted: "42"
      tagged: !!str 7
      bang: ! 8
      1: integer key
      true: boolean key
"""


def test_plain_scalars_follow_the_yaml_1_2_core_schema():
    workflow = load_text(_SCALARS)
    assert workflow.definition["on"] == "yes"
    assert workflow.steps[0].params == {
        "on": "yes", "off": "no", "y": "y", "day": "2024-01-01",
        "stamp": "2024-01-01T10:00:00Z", "t": True, "f": False, "tilde": None, "empty": None,
        "null": None, "octal": 15, "hex": 31, "negative": -12, "leading_zero": 12,
        "exp": 1500.0, "dot": 0.5, "inf": ".inf", "nan": ".NaN", "huge": "1e999",
        "quoted": "42", "tagged": "7", "bang": "8", "1": "integer key", "true": "boolean key",
    }


def test_definition_is_strict_json_even_with_non_finite_floats():
    workflow = load_text(_SCALARS)
    assert json.loads(json.dumps(workflow.definition, allow_nan=False)) == workflow.definition


def test_scalars_in_string_fields_are_used_and_stored_as_their_text():
    workflow = load_text("""\
        name: demo
        description: 12.50
        steps:
          - name: a
            action: 42
            if: true
            credential: 0x1F
        """)
    step = workflow.steps[0]
    assert (workflow.description, step.action, step.condition, step.credential) == (
        "12.50", "42", "true", "0x1F")
    assert workflow.definition["steps"][0]["action"] == "42"
    assert workflow.definition["description"] == "12.50"


def test_positions_of_keys_and_list_items_are_one_based():
    document = load_document(b"a:\n  - x: 1\n    y: 2\n  - [3]\n  -  plain\n")
    assert document.positions == {
        ("a",): (1, 1), ("a", 0): (2, 5), ("a", 0, "x"): (2, 5), ("a", 0, "y"): (3, 5),
        ("a", 1): (4, 5), ("a", 1, 0): (4, 6), ("a", 2): (5, 6),
    }


def test_duplicate_keys_are_found_at_any_depth_and_the_first_value_is_kept():
    document = load_document(b"a: 1\nb: {c: 1, c: 2}\na: 3\n")
    assert document.data == {"a": 1, "b": {"c": 1}}
    assert [as_tuple(error) for error in document.duplicates] == [
        (2, 11, 'duplicate key "c"', "b.c", 3),
        (3, 1, 'duplicate key "a"', "a", 3),
    ]


def test_duplicate_key_errors_come_with_the_other_validation_errors():
    text = "name: demo\nname: again\nsteps: []\n"
    assert [as_tuple(error) for error in errors_of(text)] == [
        (2, 1, 'duplicate key "name"', "name", 3),
        (3, 1, "at least one step is required", "steps", 7),
    ]


def test_aliases_are_expanded_into_independent_copies():
    workflow = load_text("""\
        name: demo
        x-defaults: &log {message: hi}
        steps:
          - {name: a, action: core/log, params: *log}
          - {name: b, action: core/log, params: *log}
        """)
    first, second = (step.params for step in workflow.steps)
    assert first == second == {"message": "hi"}
    assert first is not second


def test_alias_bomb_is_rejected_quickly_as_a_document_error():
    lines = ["name: demo", 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 12):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 8) + "]")
    lines.append("steps: [{name: s, action: core/log, params: {x: *a11}}]")
    started = time.monotonic()
    line, column, message, path, rule = only_error("\n".join(lines) + "\n")
    assert time.monotonic() - started < 5
    assert (message, path, rule) == (
        f"invalid YAML: more than {MAX_NODES} nodes after alias expansion", "document", 1)


@pytest.mark.parametrize("text", [
    "name: demo\nx: " + "[" * 5000 + "]" * 5000 + "\n",
    "name: demo\nx: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
    "name: demo\nx:\n" + "".join("  " * level + f"k{level}:\n" for level in range(1, 500)),
])
def test_deep_nesting_is_rejected_as_a_document_error_not_a_crash(text):
    line, column, message, path, rule = only_error(text)
    assert (message, path, rule) == (
        f"invalid YAML: nesting deeper than {MAX_DEPTH} levels", "document", 1)
    assert line >= 2


def test_non_utf8_bytes_are_rejected_with_their_position():
    raw = "name: démo\nsteps: [\xff]\n".encode("latin-1")
    error = _single_error(raw)
    assert as_tuple(error) == (
        1, 8, "invalid YAML: the file is not valid UTF-8 (invalid continuation byte 0xe9)",
        "document", 1)


def test_invalid_start_byte_position_counts_characters_not_bytes():
    error = _single_error("name: é\n".encode() + b"x: \xff\n")
    assert (error.line, error.column) == (2, 4)
    assert error.message == "invalid YAML: the file is not valid UTF-8 (invalid start byte 0xff)"


def test_several_documents_in_one_file_are_refused():
    text = "name: demo\nsteps: [{name: a, action: core/log}]\n---\nname: other\n"
    assert only_error(text) == (
        3, 1, "invalid YAML: expected a single document in the stream, but found another "
        "document", "document", 1)


@pytest.mark.parametrize("text, message", [
    ("name: !custom demo\n", "invalid YAML: unsupported tag '!custom'"),
    ("name: !!binary aGk=\n", "invalid YAML: unsupported tag 'tag:yaml.org,2002:binary'"),
    ("name: !!int x\n", "invalid YAML: 'x' is not a valid !!int"),
    ("? [a, b]\n: c\n", "invalid YAML: a mapping key must be a scalar"),
    ("name: *nothing\n", "invalid YAML: found undefined alias 'nothing'"),
    ("name: a\x07b\n", "invalid YAML: special characters are not allowed (character #x0007)"),
])
def test_unusable_yaml_constructs_are_rule_1_errors(text, message):
    error = _single_error(text.encode())
    assert (error.message, error.path, error.rule) == (message, "document", 1)


def test_utf8_byte_order_mark_is_accepted_and_not_counted_as_a_column():
    raw = "\ufeffname: Demo\nsteps: [{name: a, action: core/log}]\n".encode()
    assert as_tuple(_single_error(raw)) == (
        1, 1, "name must match ^[a-z][a-z0-9-]*$", "name", 6)


def _single_error(raw: bytes):
    with pytest.raises(ValidationFailed) as failure:
        load_workflow(raw)
    assert len(failure.value.errors) == 1, failure.value.errors
    return failure.value.errors[0]


@pytest.mark.parametrize("text, column, code", [
    ('description: "x\\ud800"\n', 14, "D800"),
    ('description: "\\ud83d\\ude00"\n', 14, "D83D"),  # YAML escapes code points, not UTF-16
    ('description: "\\U0000dfff"\n', 14, "DFFF"),
    ('"k\\udc00": 1\n', 1, "DC00"),
])
def test_a_surrogate_escape_is_a_rule_1_error_instead_of_a_crash_in_apply(text, column, code):
    """A double-quoted escape is the only way to write a lone surrogate; validate accepted it,
    and apply (and a run's stored inputs or params) then failed with UnicodeEncodeError on
    either database, a traceback."""
    raw = ("name: demo\nsteps: [{name: a, action: core/log}]\n" + text).encode()
    assert as_tuple(_single_error(raw)) == (
        3, column, f"invalid YAML: escape of a UTF-16 surrogate (U+{code}) is not a character",
        "document", 1)
