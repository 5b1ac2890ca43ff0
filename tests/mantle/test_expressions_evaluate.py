"""Evaluating CEL expressions against an activation (SPEC 3.1, 3.4)."""

import sys
import threading
import time

import pytest

from mantle.errors import MantleError
from mantle.expressions import (
    MAX_EVALUATION_SECONDS,
    ExpressionError,
    compile_expression,
    evaluate,
    evaluate_condition,
    resolve_params,
    resolve_string,
)
from tests.helpers.waiting import wait_until


@pytest.fixture
def activation():
    return {
        "inputs": {"limit": 10, "ratio": 0.5, "name": "Ada", "enabled": True},
        "steps": {
            "fetch-data": {
                "output": {"status": 200, "items": [1, 2, 3], "tags": {"env": "prod"}},
                "error": None,
                "status": "completed",
            },
            "check": {"output": {}, "error": None, "status": "skipped"},
            "broken": {"output": None, "error": "boom", "status": "failed"},
        },
        "env": {"REGION": "eu", "API_TOKEN": "s3cr3t-token"},
        "trigger": {"type": "manual", "payload": None},
        "execution": {"id": "ex-1", "workflow_name": "wf", "workflow_version": 2},
    }


def test_expression_error_is_a_mantle_error():
    assert issubclass(ExpressionError, MantleError)


def test_inputs_are_readable(activation):
    assert evaluate("inputs.limit * 2", activation) == 20


def test_hyphenated_dot_access_equals_bracket_access(activation):
    assert evaluate("steps.fetch-data.output.status", activation) == 200
    assert evaluate("steps['fetch-data'].output.status == 200", activation) is True


def test_json_int_is_cel_int_and_float_is_double(activation):
    assert evaluate("type(inputs.limit) == int", activation) is True
    assert evaluate("type(inputs.ratio) == double", activation) is True
    assert evaluate("inputs.ratio * 2.0", activation) == 1.0


def test_results_are_plain_python_values(activation):
    result = evaluate("steps.fetch-data.output", activation)
    assert result == {"status": 200, "items": [1, 2, 3], "tags": {"env": "prod"}}
    assert type(result) is dict and type(result["status"]) is int
    assert type(result["items"]) is list and type(result["tags"]["env"]) is str
    assert type(evaluate("inputs.enabled", activation)) is bool


def test_null_values_come_back_as_none(activation):
    assert evaluate("steps.broken.output", activation) is None
    assert evaluate("trigger.payload", activation) is None


def test_env_and_execution_are_readable(activation):
    assert evaluate("env.REGION + '/' + execution.id", activation) == "eu/ex-1"


def test_missing_map_key_is_an_error(activation):
    with pytest.raises(ExpressionError, match=r"^no such key: 'foo'$"):
        evaluate("inputs.foo", activation)


def test_missing_map_key_by_index_is_an_error(activation):
    with pytest.raises(ExpressionError, match=r"^no such key: 'nope'$"):
        evaluate("steps['nope'].output", activation)


def test_step_not_in_activation_is_a_missing_key(activation):
    with pytest.raises(ExpressionError, match="no such key: 'later'"):
        evaluate("steps.later.output", activation)


def test_has_guards_a_missing_key(activation):
    assert evaluate("has(steps.check.output.x)", activation) is False
    assert evaluate("has(steps.fetch-data.output.items)", activation) is True


def test_undeclared_variable_error_does_not_dump_the_activation(activation):
    with pytest.raises(ExpressionError) as caught:
        evaluate("secrets.token", activation)
    assert str(caught.value) == "undeclared reference to 'secrets'"
    assert "s3cr3t" not in str(caught.value)


def test_unknown_function_is_an_error(activation):
    with pytest.raises(ExpressionError, match="undeclared function 'nosuch'"):
        evaluate("nosuch(1)", activation)


def test_type_mismatch_names_operator_and_types(activation):
    with pytest.raises(ExpressionError) as caught:
        evaluate("inputs.limit + 'x'", activation)
    assert str(caught.value) == "no matching overload for '+' applied to (int, string)"


def test_division_by_zero_is_an_error(activation):
    with pytest.raises(ExpressionError, match="division by zero"):
        evaluate("inputs.limit / 0", activation)


def test_integer_overflow_is_an_error(activation):
    with pytest.raises(ExpressionError, match="integer overflow"):
        evaluate("9223372036854775807 + 1", activation)


def test_logical_operators_absorb_errors_as_cel_requires(activation):
    assert evaluate("false && inputs.foo == 1", activation) is False
    assert evaluate("inputs.foo == 1 || true", activation) is True
    assert evaluate("true ? 1 : inputs.foo", activation) == 1


def test_condition_true_and_false(activation):
    assert evaluate_condition("steps['check'].status == 'skipped'", activation) is True
    assert evaluate_condition("inputs.limit > 100", activation) is False


def test_non_boolean_condition_is_an_error(activation):
    with pytest.raises(ExpressionError) as caught:
        evaluate_condition("inputs.limit", activation)
    assert str(caught.value) == "condition must evaluate to a boolean, got int"


def test_null_condition_is_an_error(activation):
    with pytest.raises(ExpressionError, match="got null"):
        evaluate_condition("trigger.payload", activation)


def test_condition_evaluation_error_propagates(activation):
    with pytest.raises(ExpressionError, match="no such key"):
        evaluate_condition("inputs.foo == 1", activation)


def test_invalid_expression_fails_at_evaluation(activation):
    with pytest.raises(ExpressionError, match="^invalid CEL expression: unexpected"):
        evaluate("inputs.limit ==", activation)


def test_compilation_is_cached_per_expression_text():
    first = compile_expression("inputs.limit + 12345")
    before = compile_expression.cache_info()
    assert compile_expression("inputs.limit + 12345") is first
    assert compile_expression.cache_info().hits == before.hits + 1


def test_integers_beyond_int64_become_doubles():
    assert evaluate("inputs.big > 1.0", {"inputs": {"big": 2**70}}) is True


def test_a_variable_holding_an_integer_beyond_a_double_is_an_expression_error():
    """Converting it raised OverflowError, which killed the evaluation task (the step stayed
    pending for ever); no source gives such a value now, but a stored output may hold one."""
    for expr in ("inputs.n > 1", "inputs.other"):
        with pytest.raises(ExpressionError, match="^a variable's value holds a number beyond "
                                                  "a double$"):
            evaluate(expr, {"inputs": {"n": 10**400, "other": 1}})


def test_unreferenced_steps_are_not_converted(activation):
    activation["steps"]["odd"] = {"output": object()}
    assert evaluate("steps.check.status", activation) == "skipped"


def test_non_finite_double_result_is_an_error(activation):
    with pytest.raises(ExpressionError, match="not a finite number"):
        evaluate("1.0 / 0.0", activation)


def test_timestamp_and_duration_results_leave_as_strings(activation):
    assert evaluate("timestamp('2024-01-02T03:04:05Z') + duration('1h')", activation) == (
        "2024-01-02T04:04:05Z"
    )
    assert evaluate("duration('90s')", activation) == "90s"
    assert evaluate("duration('1.5s')", activation) == "1.5s"


def test_expression_that_exhausts_the_stack_is_a_clean_error(activation):
    # Evaluate from deep inside the Python stack so celpy's recursion runs out mid-way.
    expr = " + ".join(["1"] * 150)
    compile_expression(expr)  # parse at a normal depth; only evaluation should run out

    def at_depth(levels):
        if levels == 0:
            return evaluate(expr, activation)
        return at_depth(levels - 1)

    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back
    with pytest.raises(ExpressionError, match="nested too deeply"):
        at_depth(sys.getrecursionlimit() - depth - 200)


def test_concurrent_evaluations_do_not_interfere():
    errors = []

    def worker(n):
        try:
            for _ in range(100):
                act = {"inputs": {"n": n}, "steps": {"s": {"output": {"v": n * 2}}}}
                assert evaluate("inputs.n + steps.s.output.v", act) == n * 3
                assert evaluate("[1, 2].map(x, x * inputs.n)", act) == [n, 2 * n]
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors


@pytest.mark.alone
def test_an_evaluation_that_runs_past_its_time_limit_fails_instead_of_hanging(activation):
    """Issue 6: macros over large inputs nest into 10^7 and more steps; evaluation stops at
    MAX_EVALUATION_SECONDS, also when CEL would absorb an error (``true || ...``)."""
    activation["inputs"]["xs"] = list(range(3000))
    slow = "inputs.xs.map(x, inputs.xs.map(y, x + y)).size() > 0"
    for expr in (slow, f"true || {slow}"):
        started = time.monotonic()
        with pytest.raises(ExpressionError, match=r"^evaluation took longer than 1s$"):
            evaluate_condition(expr, activation)
        assert time.monotonic() - started < MAX_EVALUATION_SECONDS + 2.0
    assert evaluate("inputs.xs.map(x, x + 1).size()", activation) == 3000  # still fine


def test_a_long_evaluation_shortens_the_gil_switch_interval_until_it_ends(activation):
    """The daemon runs with CPython's 5 ms switch interval; while an evaluation is CPU-bound
    past its first yield, other threads (a cancel's hand-offs) get the GIL every 0.5 ms."""
    from mantle.expressions.evaluation import CONTENDED_SWITCH_INTERVAL

    activation["inputs"]["xs"] = list(range(3000))
    slow = "inputs.xs.map(x, inputs.xs.map(y, x + y)).size() > 0"
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        errors = []

        def evaluate_slowly():
            try:
                evaluate_condition(slow, activation)
            except ExpressionError as error:
                errors.append(error)

        thread = threading.Thread(target=evaluate_slowly)
        thread.start()
        wait_until(lambda: sys.getswitchinterval() == CONTENDED_SWITCH_INTERVAL, timeout=1.0)
        thread.join(timeout=5)
        assert [str(e) for e in errors] == ["evaluation took longer than 1s"]
        assert sys.getswitchinterval() == 0.005  # restored when it ended
        assert evaluate("inputs.xs.size()", activation) == 3000  # short: unchanged
        assert sys.getswitchinterval() == 0.005
    finally:
        sys.setswitchinterval(before)


def _timed_size_error(run):
    started = time.monotonic()
    with pytest.raises(ExpressionError, match=r"exceeds the size limit of 33554432 "):
        run()
    assert time.monotonic() - started < MAX_EVALUATION_SECONDS


def test_a_string_or_list_that_grows_past_the_size_limit_fails_at_once(activation):
    """One call can multiply its input (replace, flatten) and ``+`` doubles: without a bound
    a short expression asked for gigabytes and ran for many seconds past the 1 s limit, as a
    single call the deadline cannot interrupt (eight chained replaces: 1 GiB, 6 s)."""
    replaces = '"aaaaaaaa"' + '.replace("a", "aaaaaaaa")' * 10 + ".size()"
    _timed_size_error(lambda: evaluate(replaces, activation))
    tens = "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"
    nested = tens
    for _ in range(8):
        nested = f"[{nested}].map(l, flatten({tens}.map(i, l)))[0]"
    _timed_size_error(lambda: evaluate(f"size({nested})", activation))
    activation["inputs"]["text"] = "x" * 20_000_000
    _timed_size_error(lambda: evaluate("size(inputs.text + inputs.text)", activation))
    assert evaluate("size(inputs.text + 'y')", activation) == 20_000_001  # under it: fine


def test_the_values_one_evaluation_builds_are_bounded_in_all(activation):
    """Each new string under the limit, but a macro building many of them: 100 copies of a
    20 MB input were 2 GB within the 1 s limit (850 MB on a loaded machine)."""
    activation["inputs"]["text"] = "x" * 10_000_000
    activation["inputs"]["xs"] = list(range(100))
    for build in ("inputs.text + 'a'", "inputs.text.replace('x', 'y')", "inputs.text.trim()"):
        started = time.monotonic()
        with pytest.raises(ExpressionError, match=r"^one evaluation built more than 67108864 "
                                                  r"characters or items in all$"):
            evaluate(f"inputs.xs.map(x, {build}).size()", activation)
        assert time.monotonic() - started < MAX_EVALUATION_SECONDS
    assert evaluate("inputs.xs.map(x, inputs.text).size()", activation) == 100  # no copies
    assert evaluate("[1, 2, 3].map(x, inputs.text + 'a')[2].size()", activation) == 10_000_001


def test_a_result_of_shared_values_past_the_size_limit_fails_instead_of_expanding(activation):
    """``[s, s, ...]`` holds ten references to one string; nested, a few dozen steps name 10^8
    copies, which jsonEncode, toString or a template's result would have written out."""
    activation["inputs"]["text"] = "x" * 1_000_000
    tens = "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"
    shared = f"{tens}.map(i, {tens}.map(j, inputs.text))"
    for expr in (f"jsonEncode({shared})", f"toString({shared})", shared):
        _timed_size_error(lambda: evaluate(expr, activation))
    _timed_size_error(lambda: resolve_params({"body": "{{ " + shared + " }}"}, activation))


def test_a_steps_templates_together_stay_within_the_size_limit(activation):
    """Each template is bounded and so are the step's params together: many pieces naming one
    large value would otherwise join into a string of any size."""
    activation["inputs"]["text"] = "x" * 12_000_000
    params = {"a": "{{ inputs.text }}", "b": ["<{{ inputs.text }}>", "{{ inputs.text }}"]}
    _timed_size_error(lambda: resolve_params(params, activation))
    _timed_size_error(lambda: resolve_string("{{ inputs.text }}" * 3, activation))
    resolved = resolve_params({"a": "{{ inputs.text }}", "b": "{{ inputs.limit }}"}, activation)
    assert len(resolved["a"]) == 12_000_000 and resolved["b"] == 10
