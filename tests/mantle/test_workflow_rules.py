"""One test per SPEC 2.7 validation rule: message, path, line and column."""

from __future__ import annotations

import pytest

from tests.mantle.test_workflow_support import as_tuple, errors_of, load_text, only_error


def test_spec_example_output_is_reproduced_verbatim():
    text = """\
        name: Nightly_Report
        steps:
          - name: fetch
            action: http/request
            timeout: 0s
          - name: fetch
            retry:
              max_attempts: 0
        """
    lines = [error.format("nightly.yaml") for error in errors_of(text)]
    assert lines == [
        "nightly.yaml:1:1: error: name must match ^[a-z][a-z0-9-]*$ (name)",
        "nightly.yaml:5:5: error: timeout must be a positive duration (steps[0].timeout)",
        'nightly.yaml:6:5: error: duplicate step name "fetch" (steps[1].name)',
        "nightly.yaml:6:5: error: step action is required (steps[1].action)",
        "nightly.yaml:8:7: error: max_attempts must be greater than 0 "
        "(steps[1].retry.max_attempts)",
    ]


def test_rule_1_yaml_syntax_error_reports_parser_problem_and_position():
    text = "name: demo\nsteps:\n  - name: a\n    action: b\n   bad: indentation\n"
    assert only_error(text) == (
        5, 4, "invalid YAML: expected <block end>, but found '<block mapping start>'",
        "document", 1)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "", "# only a comment\n"])
def test_rule_2_root_that_is_not_a_mapping_is_reported_at_document_start(text):
    assert only_error(text) == (1, 1, "workflow must be a mapping", "document", 2)


def test_rule_3_duplicate_key_reports_the_repeated_key():
    text = """\
        name: demo
        steps:
          - name: a
            action: core/log
            action: core/fail
        """
    assert only_error(text) == (5, 5, 'duplicate key "action"', "steps[0].action", 3)


def test_rule_4_wrong_kind_reports_field_name_and_expected_kind():
    text = """\
        name: demo
        steps:
          - name: a
            action: core/log
            continue_on_error: "yes"
        """
    assert only_error(text) == (
        5, 5, "continue_on_error must be a boolean", "steps[0].continue_on_error", 4)


def test_rule_5_missing_name_is_reported_at_document_start():
    text = """\
        # a comment first
        steps:
          - {name: a, action: core/log}
        """
    assert only_error(text) == (1, 1, "name is required", "name", 5)


def test_rule_5_empty_name_is_reported_at_its_key():
    text = """\
        steps:
          - {name: a, action: core/log}
        name: ""
        """
    assert only_error(text) == (3, 1, "name is required", "name", 5)


def test_rule_6_name_pattern_reports_the_pattern():
    text = "steps: [{name: a, action: core/log}]\nname: fetch_data\n"
    assert only_error(text) == (2, 1, "name must match ^[a-z][a-z0-9-]*$", "name", 6)


@pytest.mark.parametrize("steps", ["", "steps: []\n", "steps:\n"])
def test_rule_7_missing_or_empty_steps_require_at_least_one(steps):
    line = 2 if steps else 1
    assert only_error("name: demo\n" + steps) == (
        line, 1, "at least one step is required", "steps", 7)


def test_rule_8_input_name_pattern_is_reported_at_the_input_key():
    text = """\
        name: demo
        inputs:
          user_id: {type: string}
          maxItems: {type: number}
        steps: [{name: a, action: core/log}]
        """
    assert only_error(text) == (
        4, 3, "input name must match ^[a-z][a-z0-9_]*$", "inputs.maxItems", 8)


def test_rule_9_unknown_input_type_quotes_the_value():
    text = """\
        name: demo
        inputs:
          day:
            description: Day to report
            type: date
        steps: [{name: a, action: core/log}]
        """
    assert only_error(text) == (
        5, 5, 'type must be one of: string, number, boolean (got "date")', "inputs.day.type", 9)


def test_rule_10_negative_max_parallel_executions_shows_the_value():
    text = "name: demo\nmax_parallel_executions: -2\nsteps: [{name: a, action: core/log}]\n"
    assert only_error(text) == (
        2, 1, "max_parallel_executions must be >= 0, got -2", "max_parallel_executions", 10)


def test_rule_11_unknown_on_limit_quotes_the_value():
    text = "name: demo\non_limit: drop\nsteps: [{name: a, action: core/log}]\n"
    assert only_error(text) == (
        2, 1, 'on_limit must be one of: queue, reject (got "drop")', "on_limit", 11)


def test_rule_12_unparsable_duration_quotes_the_text_and_scalars_count_as_text():
    text = "name: demo\ntimeout: 30\nsteps: [{name: a, action: core/log, timeout: soon}]\n"
    assert [as_tuple(error) for error in errors_of(text)] == [
        (2, 1, 'invalid duration: "30"', "timeout", 12),
        (3, 37, 'invalid duration: "soon"', "steps[0].timeout", 12),
    ]


@pytest.mark.parametrize("value", ["0", "0s", "-1m"])
def test_rule_13_non_positive_workflow_timeout_is_refused(value):
    text = f"name: demo\ntimeout: {value}\nsteps: [{{name: a, action: core/log}}]\n"
    assert only_error(text) == (2, 1, "timeout must be a positive duration", "timeout", 13)


def test_rule_14_trigger_without_type_is_reported_at_the_items_first_key():
    text = """\
        name: demo
        steps: [{name: a, action: core/log}]
        triggers:
          - schedule: "* * * * *"
        """
    assert only_error(text) == (4, 5, "trigger type is required", "triggers[0].type", 14)


def test_rule_15_unknown_trigger_type_quotes_the_value():
    text = """\
        name: demo
        steps: [{name: a, action: core/log}]
        triggers:
          - type: cron
            schedule: "0 * * * *"
          - type: email
        """
    assert only_error(text) == (
        6, 5, 'trigger type must be one of: cron, webhook (got "email")', "triggers[1].type", 15)


def test_rule_16_cron_trigger_without_schedule():
    text = """\
        name: demo
        steps: [{name: a, action: core/log}]
        triggers:
          - type: cron
        """
    assert only_error(text) == (
        4, 5, "schedule is required for cron triggers", "triggers[0].schedule", 16)


@pytest.mark.parametrize("schedule", ["61 * * * *", "@daily", "0 0 * * * *", "* * * *",
                                      "0 0 * * mon", "0 0 L * *", "*/0 * * * *"])
def test_rule_17_invalid_cron_schedule_quotes_the_expression(schedule):
    text = f"""\
        name: demo
        steps: [{{name: a, action: core/log}}]
        triggers:
          - type: cron
            schedule: "{schedule}"
        """
    assert only_error(text) == (
        5, 5, f'invalid cron schedule "{schedule}"', "triggers[0].schedule", 17)


@pytest.mark.parametrize("schedule", ["*/15 9-17 * * 1-5", "0 0 1,15 * *", "0 12 * * 7"])
def test_rule_17_plain_five_field_schedules_are_accepted(schedule):
    text = f"""\
        name: demo
        steps: [{{name: a, action: core/log}}]
        triggers: [{{type: cron, schedule: "{schedule}"}}]
        """
    assert load_text(text).triggers[0].schedule == schedule


def test_rule_18_webhook_trigger_without_path():
    text = """\
        name: demo
        steps: [{name: a, action: core/log}]
        triggers:
          - type: webhook
            secret: s3cret
        """
    assert only_error(text) == (
        4, 5, "path is required for webhook triggers", "triggers[0].path", 18)


@pytest.mark.parametrize("path", ["/deploy", "/hooks/", "/hooks/a b", "/hooks/x?y=1"])
def test_rule_19_webhook_path_pattern(path):
    text = f"""\
        name: demo
        steps: [{{name: a, action: core/log}}]
        triggers:
          - type: webhook
            path: "{path}"
        """
    assert only_error(text) == (
        5, 5, "webhook path must match ^/hooks/[A-Za-z0-9._~/-]+$", "triggers[0].path", 19)


def test_names_paths_and_schedules_longer_than_their_columns_fail_validation():
    """Workflow and step names, webhook paths and cron schedules are stored in 255-character
    columns: validate and plan accepted longer ones, and apply (or, for a step name, the run)
    then died on PostgreSQL with "value too long for type character varying(255)"."""
    long = "a" * 256
    minutes, hours, days = (",".join(map(str, range(*span))) for span in ((60,), (24,), (1, 32)))
    text = f"""\
        name: {long}
        steps: [{{name: {long}, action: core/log}}]
        triggers:
          - {{type: webhook, path: /hooks/{long}}}
          - {{type: cron, schedule: "{minutes} {hours} {days} * *"}}
        hooks:
          on_finish: [{{name: {long}, action: core/log}}]
        """
    assert [(error.path, error.rule, error.message) for error in errors_of(text)] == [
        ("name", 6, "name must be at most 255 characters"),
        ("steps[0].name", 22, "step name must be at most 255 characters"),
        ("triggers[0].path", 19, "webhook path must be at most 255 characters"),
        ("triggers[1].schedule", 17, "cron schedule must be at most 255 characters"),
        ("hooks.on_finish[0].name", 32, "hook step name must be at most 255 characters"),
    ]
    at_limit = "a" * 255
    assert load_text(f"name: {at_limit}\nsteps: [{{name: {at_limit}, action: core/log}}]\n")


def test_a_webhook_secret_holding_nul_is_refused_by_every_command_not_only_on_postgresql():
    """The secret is stored in its trigger row's text column, which PostgreSQL refuses NUL
    in: validate and plan accepted it, and apply died with psycopg's DataError traceback
    (SQLite stored it)."""
    text = """\
        name: demo
        steps: [{name: a, action: core/log}]
        triggers:
          - type: webhook
            path: /hooks/a
            secret: "s3\\0cret"
        """
    assert only_error(text) == (
        6, 5, "secret must not contain a NUL character", "triggers[0].secret", 4)


def test_rule_20_webhook_path_repeated_in_the_file_is_reported_at_the_repeat():
    text = """\
        name: demo
        steps: [{name: a, action: core/log}]
        triggers:
          - {type: webhook, path: /hooks/deploy}
          - {type: cron, schedule: "0 * * * *"}
          - {type: webhook, path: /hooks/deploy}
        """
    assert only_error(text) == (
        6, 21, 'duplicate webhook path "/hooks/deploy"', "triggers[2].path", 20)


def test_rule_21_step_without_name_is_reported_at_the_steps_first_key():
    text = """\
        name: demo
        steps:
          - action: core/log
        """
    assert only_error(text) == (3, 5, "step name is required", "steps[0].name", 21)


@pytest.mark.parametrize("name", ["Fetch", "fetch_data", "-x", "9lives"])
def test_rule_22_step_name_pattern(name):
    text = f"name: demo\nsteps:\n  - action: core/log\n    name: \"{name}\"\n"
    assert only_error(text) == (
        4, 5, "step name must match ^[a-z][a-z0-9-]*$", "steps[0].name", 22)


def test_rule_23_duplicate_step_name_reports_message_path_and_position():
    text = """\
        name: demo
        steps:
          - {name: fetch, action: core/log}
          - {name: other, action: core/log}
          - action: core/log
            name: fetch
        """
    assert only_error(text) == (6, 5, 'duplicate step name "fetch"', "steps[2].name", 23)


def test_rule_24_step_without_action():
    text = "name: demo\nsteps:\n  - name: a\n    params: {}\n"
    assert only_error(text) == (3, 5, "step action is required", "steps[0].action", 24)


@pytest.mark.parametrize("retry, position", [("{backoff: fixed}", (5, 5)),
                                             ("{max_attempts: 0}", (5, 13)),
                                             ("\n      max_attempts: -1", (6, 7))])
def test_rule_25_missing_or_non_positive_max_attempts(retry, position):
    text = f"name: demo\nsteps:\n  - name: a\n    action: core/log\n    retry: {retry}\n"
    assert only_error(text) == (
        *position, "max_attempts must be greater than 0", "steps[0].retry.max_attempts", 25)


def test_rule_26_unknown_backoff_quotes_the_value():
    text = """\
        name: demo
        steps:
          - name: a
            action: core/log
            retry:
              max_attempts: 3
              backoff: linear
        """
    assert only_error(text) == (
        7, 7, 'backoff must be one of: fixed, exponential (got "linear")',
        "steps[0].retry.backoff", 26)


def test_rule_27_negative_max_parallel_shows_the_value():
    text = "name: demo\nsteps:\n  - name: a\n    action: core/log\n    max_parallel: -1\n"
    assert only_error(text) == (
        5, 5, "max_parallel must be >= 0, got -1", "steps[0].max_parallel", 27)


def test_rule_28_explicit_dependency_on_unknown_step_is_reported_at_depends_on():
    text = """\
        name: demo
        steps:
          - name: a
            action: core/log
          - name: b
            action: core/log
            depends_on: [a, ghost]
        """
    assert only_error(text) == (
        7, 5, 'references undefined step "ghost"', "steps[1].depends_on", 28)


def test_rule_28_implicit_references_from_if_and_nested_params_are_checked():
    text = """\
        name: demo
        steps:
          - name: fetch-data
            action: core/log
          - name: b
            action: core/log
            if: steps.fetch-data.output.ok && steps['nope'].status == "completed"
            params:
              body:
                items: ["x", "{{ steps.missing-one.output }}"]
        """
    assert [as_tuple(error) for error in errors_of(text)] == [
        (5, 5, 'references undefined step "missing-one"', "steps[1].depends_on", 28),
        (5, 5, 'references undefined step "nope"', "steps[1].depends_on", 28),
    ]


def test_rule_29_dependency_cycle_is_reported_once_at_the_steps_key():
    text = """\
        name: demo
        steps:
          - {name: a, action: core/log, depends_on: [c]}
          - {name: b, action: core/log, depends_on: [a]}
          - {name: c, action: core/log, params: {m: "{{ steps.b.output }}"}}
        """
    assert only_error(text) == (2, 1, "cycle detected in step dependencies", "steps", 29)


def test_rule_29_self_dependency_is_a_cycle():
    text = "name: demo\nsteps:\n  - {name: a, action: core/log, if: 'steps.a.status == \"x\"'}\n"
    assert only_error(text) == (2, 1, "cycle detected in step dependencies", "steps", 29)


def test_rule_30_invalid_if_expression_reports_the_parser_message():
    text = "name: demo\nsteps:\n  - name: a\n    action: core/log\n    if: inputs.x ==\n"
    line, column, message, path, rule = only_error(text)
    assert (line, column, path, rule) == (5, 5, "steps[0].if", 30)
    assert message.startswith("invalid CEL expression: ")


def test_rule_31_invalid_template_reports_the_expression_and_nested_param_path():
    text = """\
        name: demo
        steps:
          - name: a
            action: http/request
            params:
              body:
                list: [ok, "see {{ inputs.x + }} here"]
        """
    line, column, message, path, rule = only_error(text)
    assert (line, column, path, rule) == (7, 20, "steps[0].params.body.list[1]", 31)
    assert message.startswith('invalid CEL expression "inputs.x +": ')


def test_rules_30_and_31_a_letter_or_digit_outside_ascii_is_a_syntax_error_not_a_crash():
    """The scan for step references took any Unicode letter or digit (``é``, ``²``) for the
    start of an identifier or number, whose ASCII pattern then did not match: validate died
    with AttributeError ('NoneType' object has no attribute 'end')."""
    text = """\
        name: demo
        steps:
          - name: a
            action: core/log
            if: "café == 1"
            params: {message: "{{ 1 == ² }}", ok: "{{ 'café ²' }}"}
        """
    assert [(error.path, error.rule, error.message) for error in errors_of(text)] == [
        ("steps[0].if", 30, "invalid CEL expression: unexpected character 'é' at column 4"),
        ("steps[0].params.message", 31,
         "invalid CEL expression \"1 == ²\": unexpected character '²' at column 6"),
    ]


def test_rule_32_hook_step_name_missing_or_bad():
    text = """\
        name: demo
        steps: [{name: a, action: core/log}]
        hooks:
          on_success:
            - action: core/log
            - name: Bad_Name
              action: core/log
        """
    assert [as_tuple(error) for error in errors_of(text)] == [
        (5, 7, "hook step name is required", "hooks.on_success[0].name", 32),
        (6, 7, "hook step name must match ^[a-z][a-z0-9-]*$", "hooks.on_success[1].name", 32),
    ]


def test_rule_33_hook_name_reused_names_the_first_block_and_main_names_may_repeat():
    text = """\
        name: demo
        steps: [{name: notify, action: core/log}]
        hooks:
          on_failure:
            - {name: notify, action: core/log}
          on_success:
            - {name: notify, action: core/log}
        """
    assert only_error(text) == (
        7, 8, 'duplicate hook step name "notify" (also declared in hooks.on_failure)',
        "hooks.on_success[0].name", 33)


def test_rule_34_hook_step_without_action():
    text = """\
        name: demo
        steps: [{name: a, action: core/log}]
        hooks:
          on_finish:
            - name: unlock
        """
    assert only_error(text) == (
        5, 7, "hook step action is required", "hooks.on_finish[0].action", 34)


def test_rule_35_hook_step_with_depends_on():
    text = """\
        name: demo
        steps: [{name: a, action: core/log}]
        hooks:
          on_finish:
            - name: unlock
              action: core/log
              depends_on: [a]
        """
    assert only_error(text) == (
        7, 7, "hook steps do not support depends_on", "hooks.on_finish[0].depends_on", 35)


def test_step_rules_also_apply_to_hook_steps_with_hook_paths():
    text = """\
        name: demo
        steps: [{name: a, action: core/log}]
        hooks:
          timeout: later
          on_failure:
            - name: alert
              action: core/log
              if: "execution.error =="
              timeout: 0s
              retry: {max_attempts: 0, backoff: random}
              params: {message: "{{ execution.error + }}"}
        """
    found = [(error.path, error.rule) for error in errors_of(text)]
    assert found == [
        ("hooks.timeout", 12),
        ("hooks.on_failure[0].if", 30),
        ("hooks.on_failure[0].timeout", 13),
        ("hooks.on_failure[0].retry.max_attempts", 25),
        ("hooks.on_failure[0].retry.backoff", 26),
        ("hooks.on_failure[0].params.message", 31),
    ]


_RULE_4_CASES = [  # (YAML, message, path, line, column); the YAML comes first in the file
    ("name: [x]", "name must be a string", "name", 1, 1),
    ("description: {a: 1}", "description must be a string", "description", 1, 1),
    ("inputs: [day]", "inputs must be a mapping", "inputs", 1, 1),
    ("inputs: {day: text}", "day must be a mapping", "inputs.day", 1, 10),
    ("inputs: {day: {type: [string]}}", "type must be a string", "inputs.day.type", 1, 16),
    ("inputs:\n  day: {description: [x]}", "description must be a string",
     "inputs.day.description", 2, 9),
    ("triggers: {type: cron}", "triggers must be a list", "triggers", 1, 1),
    ("triggers: [cron]", "triggers[0] must be a mapping", "triggers[0]", 1, 12),
    ("triggers: [{type: cron, schedule: [x]}]", "schedule must be a string",
     "triggers[0].schedule", 1, 25),
    ("triggers: [{type: webhook, path: /hooks/a, secret: {}}]", "secret must be a string",
     "triggers[0].secret", 1, 44),
    ("timeout: [1s]", "timeout must be a string", "timeout", 1, 1),
    ("max_parallel_executions: 1.5", "max_parallel_executions must be an integer",
     "max_parallel_executions", 1, 1),
    ("max_parallel_executions: '2'", "max_parallel_executions must be an integer",
     "max_parallel_executions", 1, 1),
    ("on_limit: [queue]", "on_limit must be a string", "on_limit", 1, 1),
    ("hooks: [x]", "hooks must be a mapping", "hooks", 1, 1),
    ("hooks: {on_success: {name: x}}", "on_success must be a list", "hooks.on_success", 1, 9),
    ("hooks: {on_failure: [x]}", "on_failure[0] must be a mapping", "hooks.on_failure[0]",
     1, 22),
]


@pytest.mark.parametrize("field, message, path, line, column", _RULE_4_CASES)
def test_rule_4_covers_every_top_level_typed_field(field, message, path, line, column):
    rest = "steps: [{name: a, action: core/log}]\n"
    if not field.startswith("name:"):
        rest = "name: demo\n" + rest
    assert only_error(field + "\n" + rest) == (line, column, message, path, 4)


_STEP_RULE_4_CASES = [  # (field, message, path, column of the error)
    ("name: {x: 1}", "name must be a string", "steps[1].name", 5),
    ("action: [core/log]", "action must be a string", "steps[1].action", 5),
    ("params: [1, 2]", "params must be a mapping", "steps[1].params", 5),
    ("if: [true]", "if must be a string", "steps[1].if", 5),
    ("depends_on: a", "depends_on must be a list", "steps[1].depends_on", 5),
    ("retry: 3", "retry must be a mapping", "steps[1].retry", 5),
    ("retry: {max_attempts: '3'}", "max_attempts must be an integer",
     "steps[1].retry.max_attempts", 13),
    ("retry: {max_attempts: 2, backoff: [fixed]}", "backoff must be a string",
     "steps[1].retry.backoff", 30),
    ("timeout: {s: 1}", "timeout must be a string", "steps[1].timeout", 5),
    ("continue_on_error: yes", "continue_on_error must be a boolean",
     "steps[1].continue_on_error", 5),
    ("max_parallel: true", "max_parallel must be an integer", "steps[1].max_parallel", 5),
    ("credential: [x]", "credential must be a string", "steps[1].credential", 5),
]


@pytest.mark.parametrize("field, message, path, column", _STEP_RULE_4_CASES)
def test_rule_4_covers_every_step_field(field, message, path, column):
    key = field.split(":")[0]
    lines = {"name": "name: b", "action": "action: core/log"}
    lines[key] = field  # replaces name or action, else comes third
    text = "name: demo\nsteps:\n  - {name: a, action: core/log}\n  - " + "\n    ".join(
        lines.values()) + "\n"
    line = 4 + list(lines).index(key)
    assert only_error(text) == (line, column, message, path, 4)


def test_rule_4_list_items_are_named_by_list_key_and_index():
    text = """\
        name: demo
        steps:
          - just-a-string
          - name: b
            action: core/log
            depends_on: [ok, [nested], ~]
          - {name: ok, action: core/log}
        """
    assert [as_tuple(error) for error in errors_of(text)] == [
        (3, 5, "steps[0] must be a mapping", "steps[0]", 4),
        (6, 22, "depends_on[1] must be a string", "steps[1].depends_on[1]", 4),
        (6, 32, "depends_on[2] must be a string", "steps[1].depends_on[2]", 4),
    ]


def test_errors_are_sorted_by_line_column_then_rule_number():
    text = """\
        hooks:
          on_success:
            - {action: core/log}
        triggers:
          - {type: fax}
        steps:
          - if: steps.zz.output ==
        name: Bad
        """
    assert [(error.line, error.column, error.rule) for error in errors_of(text)] == [
        (3, 8, 32),
        (5, 6, 15),
        (7, 5, 21), (7, 5, 24), (7, 5, 28), (7, 5, 30),
        (8, 1, 6),
    ]


def test_all_errors_are_reported_not_just_the_first():
    text = """\
        name: demo
        on_limit: never
        max_parallel_executions: -1
        steps:
          - {name: a}
          - {action: core/log}
        """
    assert sorted(error.rule for error in errors_of(text)) == [10, 11, 21, 24]


def test_each_error_stays_on_one_line_whatever_the_file_holds():
    """SPEC 2.7: one line per error. A value, name or key with a line break (or a carriage
    return, which hid the start of the line on a terminal) was printed as is."""
    text = """\
        name: demo
        on_limit: "x\\ny"
        steps: [{name: a, action: core/log, depends_on: ["b\\rc"]}]
        inputs: {"bad\\u2028name": {}, "t\\tab": {}}
        """
    assert [error.format("f.yaml") for error in errors_of(text)] == [
        'f.yaml:2:1: error: on_limit must be one of: queue, reject (got "x\\ny") (on_limit)',
        'f.yaml:3:37: error: references undefined step "b\\rc" (steps[0].depends_on)',
        "f.yaml:4:10: error: input name must match ^[a-z][a-z0-9_]*$ (inputs.bad\\u2028name)",
        "f.yaml:4:31: error: input name must match ^[a-z][a-z0-9_]*$ (inputs.t\\tab)",
    ]
