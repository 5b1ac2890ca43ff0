"""The CEL function library: standard functions and mantle's extras (SPEC 3.4)."""

import pytest

from mantle.expressions import ExpressionError, evaluate

ACTIVATION = {
    "inputs": {"name": "  Ada Lovelace ", "csv": "a,b,c", "n": "42", "items": [[1, 2], [3], 4]},
    "steps": {"fetch": {"output": {"status": 200}, "error": None, "status": "completed"}},
}


def run(expr):
    return evaluate(expr, ACTIVATION)


def fails(expr, message):
    with pytest.raises(ExpressionError, match=message):
        run(expr)


# Standard CEL


def test_size_of_string_list_and_map():
    assert run("size('abc') + size([1, 2]) + size({'a': 1})") == 6


def test_contains_starts_with_ends_with():
    assert run("'hello'.contains('ell') && 'hello'.startsWith('he') && 'hello'.endsWith('lo')")


def test_matches_uses_regular_expressions():
    assert run("'abc123'.matches('^[a-z]+[0-9]+$')") is True
    assert run("matches('abc', '^b')") is False


def test_in_operator_on_list_and_map():
    assert run("2 in [1, 2] && 'status' in steps.fetch.output") is True


def test_string_conversion_uses_cel_spellings():
    assert run("string(true)") == "true"
    assert run("string(42)") == "42"
    assert run("string(1.5)") == "1.5"
    assert run("string(timestamp('2024-01-02T03:04:05Z'))") == "2024-01-02T03:04:05Z"


def test_int_and_double_conversions():
    assert run("int('12') + int(2.9)") == 14
    assert run("double('1.5') + double(1)") == 2.5


def test_int_of_bad_text_is_an_error():
    fails("int('abc')", "^int: cannot convert 'abc'$")


def test_timestamp_and_duration_conversions():
    assert run("timestamp('2024-01-01T00:00:00Z') < timestamp('2024-01-02T00:00:00Z')") is True
    assert run("duration('1h') > duration('59m')") is True


def test_map_and_filter_macros():
    assert run("[1, 2, 3].map(x, x * 10)") == [10, 20, 30]
    assert run("[1, 2, 3, 4].filter(x, x % 2 == 0)") == [2, 4]


def test_exists_all_and_exists_one_macros():
    assert run("[1, 2, 3].exists(x, x > 2)") is True
    assert run("[1, 2, 3].all(x, x > 0)") is True
    assert run("[1, 2, 3].exists_one(x, x > 1)") is False


def test_macro_over_steps_map_iterates_step_names():
    assert run("steps.exists(s, steps[s].status == 'completed')") is True


# mantle's extras


def test_to_lower_to_upper_and_trim():
    assert run("inputs.name.trim().toLower()") == "ada lovelace"
    assert run("'abc'.toUpper()") == "ABC"


def test_replace_replaces_every_occurrence():
    assert run("'a-b-c'.replace('-', '+')") == "a+b+c"


def test_split_on_separator():
    assert run("inputs.csv.split(',')") == ["a", "b", "c"]


def test_split_on_empty_separator_gives_characters():
    assert run("'abc'.split('')") == ["a", "b", "c"]


def test_string_function_on_wrong_type_is_an_error():
    fails("(1).toLower()", "^toLower: argument must be a string, got int$")


def test_parse_int():
    assert run("parseInt(inputs.n) + 1") == 43
    assert run("parseInt('-7')") == -7


def test_parse_int_of_bad_text_is_an_error():
    fails("parseInt('4x')", "^parseInt: invalid integer '4x'$")
    fails("parseInt('1.5')", "invalid integer")


def test_parse_float():
    assert run("parseFloat('2.5e1')") == 25.0
    assert run("parseFloat('3')") == 3.0


def test_parse_float_of_bad_text_is_an_error():
    fails("parseFloat('abc')", "^parseFloat: invalid number 'abc'$")
    fails("parseFloat('nan')", "invalid number")


def test_parse_float_beyond_a_double_is_an_error_like_parse_int_beyond_int64():
    """'1e400' parsed to infinity: ``parseFloat('1e400') > 1.0`` was true in an ``if``, and a
    template failed only later with "result inf is not a finite number"."""
    fails("parseFloat('1e400') > 1.0", r"^parseFloat: number '1e400' out of range$")
    fails("parseFloat('-9') < parseFloat('-1e309')", r"out of range")
    assert run("parseFloat('1e-400')") == 0.0  # underflow is a number


def test_to_string_leaves_strings_and_renders_compact_json():
    assert run("toString('x')") == "x"
    assert run("toString(42)") == "42"
    assert run("toString(true)") == "true"
    assert run("toString(null)") == "null"
    assert run("toString({'a': [1, 2.5]})") == '{"a":[1,2.5]}'


def test_obj_builds_a_map_from_pairs():
    assert run("obj('a', 1, 'b', 'two')") == {"a": 1, "b": "two"}
    assert run("obj('a', 1, 'b', 2, 'c', 3, 'd', 4, 'e', 5)") == {
        "a": 1, "b": 2, "c": 3, "d": 4, "e": 5,
    }


def test_obj_rejects_more_than_five_pairs():
    fails("obj('a', 1, 'b', 2, 'c', 3, 'd', 4, 'e', 5, 'f', 6)", "at most 5 key/value pairs")


def test_obj_rejects_non_string_keys_and_odd_arguments():
    fails("obj(1, 2)", "key must be a string, got int")
    fails("obj('a')", "even number of arguments")


def test_default_returns_value_when_present():
    assert run("default(steps.fetch.output.status, 0)") == 200


def test_default_replaces_null():
    assert run("default(null, 'x')") == "x"


def test_default_replaces_a_missing_key():
    assert run("default(steps.fetch.output.missing, 0)") == 0
    assert run("default(steps.absent.output, 'none')") == "none"


def test_default_replaces_any_evaluation_error():
    assert run("default(1 / 0, -1)") == -1


def test_default_inside_macro():
    assert run("[{'a': 1}, {}].map(m, default(m.a, 0))") == [1, 0]


def test_default_needs_two_arguments():
    fails("default(1)", "default: expects 2 arguments, got 1")


def test_flatten_removes_one_level():
    assert run("flatten([[1, 2], [3, [4]], 5])") == [1, 2, 3, [4], 5]
    assert run("flatten(inputs.items)") == [1, 2, 3, 4]


def test_json_encode_is_compact():
    assert run("jsonEncode({'a': [1, true, null], 'b': 'x'})") == '{"a":[1,true,null],"b":"x"}'


def test_json_decode_keeps_int_and_double():
    assert run("jsonDecode('{\"a\": 1, \"b\": 1.5}')") == {"a": 1, "b": 1.5}
    assert run("type(jsonDecode('{\"a\": 1}').a) == int") is True


def test_json_decode_of_bad_text_is_an_error():
    fails("jsonDecode('{')", "^jsonDecode: invalid JSON")


def test_json_decode_refuses_what_json_from_outside_may_not_hold():
    """jsonDecode reads text as connectors read JSON from outside (docs/workflows.md): NaN,
    Infinity and numbers beyond a double are not JSON. Python's decoder took them, and the
    error came later and named a result (``result nan is not a finite number``)."""
    fails("jsonDecode('NaN')", "^jsonDecode: invalid JSON: NaN is not JSON$")
    fails("jsonDecode('[1, -Infinity]')", "^jsonDecode: invalid JSON: -Infinity is not JSON$")
    fails("jsonDecode('{\"a\": 1e400}')", "^jsonDecode: invalid JSON: 1e400 is out of range$")


def test_json_decode_rejects_input_over_one_mebibyte():
    big = '"' + "x" * 1_048_576 + '"'
    with pytest.raises(ExpressionError, match="limit is 1048576"):
        evaluate("jsonDecode(inputs.text)", {"inputs": {"text": big}})
    assert len(evaluate("jsonDecode(inputs.text)", {"inputs": {"text": big[:-3] + '"'}})) > 0


def test_a_lone_surrogate_is_an_expression_error_or_u_fffd_from_json_decode():
    """A CEL escape (``'\\ud800'``) or an environment variable with undecodable bytes put a
    lone UTF-16 surrogate into a result that no database or HTTP body can carry: the step's
    params could not be stored, and the whole execution ended ``internal error: 'utf-8'
    codec can't encode ...``, its independent steps cancelled. It is now the step's
    expression error; jsonDecode decodes a JSON escape of one to U+FFFD, as connectors do
    with JSON from outside (docs/workflows.md)."""
    fails(r"'a\ud800'", r"^result holds a lone UTF-16 surrogate \(U\+D800\), which is not a ")
    fails(r"{'k\udfff': 1}", r"^result holds a lone UTF-16 surrogate \(U\+DFFF\)")
    env = {"env": {"RAW": "caf\udce9"}}  # os.environ's surrogateescape of b"caf\xe9"
    with pytest.raises(ExpressionError, match=r"surrogate \(U\+DCE9\)"):
        evaluate("env.RAW", env)
    assert evaluate("size(env.RAW)", env) == 4  # read and compared freely
    assert run(r"""jsonDecode('["\\ud83d", {"\\udc00": "\\ud83d\\ude00"}]')""") == [
        "\ufffd", {"\ufffd": "\U0001f600"}]
    assert run(r"'\U0001F600'") == "\U0001f600"


def test_parse_timestamp_rfc3339():
    assert run("parseTimestamp('2024-03-05T07:08:09Z')") == "2024-03-05T07:08:09Z"
    assert run("parseTimestamp('2024-03-05T07:08:09.250+02:00')") == "2024-03-05T07:08:09.25+02:00"


def test_parse_timestamp_date_and_date_time_are_utc():
    assert run("parseTimestamp('2024-03-05')") == "2024-03-05T00:00:00Z"
    assert run("parseTimestamp('2024-03-05 07:08:09')") == "2024-03-05T07:08:09Z"


def test_parse_timestamp_of_bad_text_is_an_error():
    fails("parseTimestamp('05/03/2024')", "^parseTimestamp: cannot parse '05/03/2024'")


def test_parsed_timestamps_compare_and_add():
    assert run("parseTimestamp('2024-03-05') + duration('24h') == parseTimestamp('2024-03-06')")


def test_format_timestamp_with_reference_layout():
    expr = "formatTimestamp(parseTimestamp('2024-03-05T07:08:09.123Z'), '{}')"
    assert run(expr.format("2006-01-02 15:04:05.000")) == "2024-03-05 07:08:09.123"
    assert run(expr.format("Mon, 02 Jan 2006")) == "Tue, 05 Mar 2024"
    assert run(expr.format("2006-01-02T15:04:05Z07:00 MST")) == "2024-03-05T07:08:09Z UTC"


def test_format_timestamp_keeps_the_offset():
    expr = "formatTimestamp(parseTimestamp('2024-03-05T07:08:09+05:30'), '15:04 Z07:00 MST')"
    assert run(expr) == "07:08 +05:30 +0530"


def test_format_timestamp_accepts_timestamp_text():
    assert run("formatTimestamp('2024-12-31', '02/01/2006')") == "31/12/2024"


def test_format_timestamp_rejects_non_timestamps():
    fails("formatTimestamp(1, '2006')", "first argument must be a timestamp, got int")
