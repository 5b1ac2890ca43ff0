"""Text-level expression handling: hyphen rewriting, references, templates, syntax checks."""

from mantle.expressions import (
    MAX_EXPRESSION_LENGTH,
    find_templates,
    rewrite_hyphens,
    step_references,
    syntax_error,
)


# rewrite_hyphens


def test_hyphenated_step_name_becomes_index():
    assert (
        rewrite_hyphens("steps.fetch-data.output.status == 200")
        == 'steps["fetch-data"].output.status == 200'
    )


def test_hyphenated_hook_name_becomes_index():
    assert rewrite_hyphens("hooks.notify-ops.status") == 'hooks["notify-ops"].status'


def test_name_without_hyphen_is_left_alone():
    assert rewrite_hyphens("steps.fetch.output - 1") == "steps.fetch.output - 1"


def test_longest_name_match_takes_every_hyphen_and_digit():
    assert rewrite_hyphens("steps.a-b-2.output") == 'steps["a-b-2"].output'


def test_spaced_minus_after_step_name_stays_subtraction():
    assert rewrite_hyphens("steps.a.output.n - b") == "steps.a.output.n - b"
    assert rewrite_hyphens("steps.a - b") == "steps.a - b"


def test_every_reference_in_an_expression_is_rewritten():
    assert (
        rewrite_hyphens("steps.a-b.output + steps.c-d.output")
        == 'steps["a-b"].output + steps["c-d"].output'
    )


def test_double_quoted_string_literal_is_untouched():
    expr = '"steps.a-b" == steps.a-b.output'
    assert rewrite_hyphens(expr) == '"steps.a-b" == steps["a-b"].output'


def test_single_quoted_string_literal_is_untouched():
    assert rewrite_hyphens("'hooks.x-y'") == "'hooks.x-y'"


def test_escaped_quote_does_not_end_the_literal():
    expr = r'"say \" steps.a-b" + steps.c-d.x'
    assert rewrite_hyphens(expr) == r'"say \" steps.a-b" + steps["c-d"].x'


def test_triple_quoted_string_literal_is_untouched():
    expr = '"""one " steps.a-b\n""" + steps.c-d.x'
    assert rewrite_hyphens(expr) == '"""one " steps.a-b\n""" + steps["c-d"].x'


def test_raw_string_literal_is_untouched_and_backslash_does_not_escape():
    expr = r'r"\" + steps.a-b.x'
    assert rewrite_hyphens(expr) == r'r"\" + steps["a-b"].x'


def test_comment_is_untouched():
    assert rewrite_hyphens("true // steps.a-b") == "true // steps.a-b"


def test_identifier_ending_in_steps_is_not_a_reference():
    assert rewrite_hyphens("xsteps.a-b") == "xsteps.a-b"
    assert rewrite_hyphens("my_hooks.a-b") == "my_hooks.a-b"


def test_field_named_steps_is_not_a_reference():
    assert rewrite_hyphens("inputs.steps.a-b") == "inputs.steps.a-b"


# step_references


def test_references_in_dotted_and_both_bracket_forms():
    expr = "steps.fetch-data.output && steps['check'].x && steps[\"notify\"].y && steps.plain.z"
    assert step_references(expr) == {"fetch-data", "check", "notify", "plain"}


def test_references_inside_string_literals_do_not_count():
    assert step_references("'steps.a' + \"steps['b']\" + steps.c.output") == {"c"}


def test_hook_references_are_not_step_references():
    assert step_references("hooks.notify.status == 'completed'") == set()


def test_macro_call_on_steps_is_not_a_step_named_after_the_macro():
    assert step_references("steps.exists(s, steps[s].status == 'failed')") == set()


def test_bracket_reference_with_spaces_counts():
    assert step_references("steps[ 'a-b' ].output") == {"a-b"}


def test_dynamic_index_names_no_step():
    assert step_references("steps[inputs.which].output") == set()


# find_templates


def test_templates_are_found_in_order_and_stripped():
    assert find_templates("a {{ inputs.x }} b {{steps.y.output}}") == [
        "inputs.x",
        "steps.y.output",
    ]


def test_string_without_templates_has_none():
    assert find_templates("plain { text }") == []


def test_unclosed_braces_are_literal():
    assert find_templates("{{ inputs.x }} then {{ never closed") == ["inputs.x"]
    assert find_templates("just {{ open") == []


def test_closing_braces_inside_string_literal_do_not_end_template():
    assert find_templates('{{ "}}" + inputs.x }}') == ['"}}" + inputs.x']


def test_unterminated_quote_in_template_still_closes_at_first_braces():
    assert find_templates('{{ "oops }} tail') == ['"oops']


# syntax_error


def test_valid_expression_has_no_syntax_error():
    assert syntax_error("steps['check'].output.status == 200") is None


def test_hyphenated_reference_is_valid_syntax():
    assert syntax_error("steps.fetch-data.output.status == 200") is None


def test_syntax_error_names_the_column():
    message = syntax_error("inputs.x ==")
    assert message is not None
    assert "column 12" in message
    assert "\n" not in message


def test_syntax_error_names_the_unexpected_token():
    assert syntax_error("a ++ b") == "unexpected '+' at column 4"


def test_syntax_error_names_a_bad_character():
    assert syntax_error("a # b") == "unexpected character '#' at column 3"


def test_syntax_error_on_second_line_names_the_line():
    assert syntax_error("a &&\n&& b") == "unexpected '&&' at line 2, column 1"


def test_unterminated_string_is_a_syntax_error():
    assert syntax_error('"abc') == "unterminated string at column 1"


def test_empty_expression_is_a_syntax_error():
    assert syntax_error("") == "empty expression"
    assert syntax_error("   ") == "empty expression"


def test_overlong_expression_is_rejected():
    expr = "1 + " * (MAX_EXPRESSION_LENGTH // 4) + "1"
    assert syntax_error(expr) == f"expression is {len(expr)} characters long (limit 10000)"


def test_deeply_nested_expression_is_rejected_without_crashing():
    assert syntax_error("(" * 3000 + "1" + ")" * 3000) == "expression is nested too deeply"
    assert syntax_error("!" * 4000 + "true") == "expression is nested too deeply"
