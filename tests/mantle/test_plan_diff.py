"""Leaf diff used by ``mantle plan`` (SPEC 6.1)."""

from mantle.workflow.diff import diff_definitions, leaves


def test_leaves_are_addressed_by_dotted_paths_and_list_indexes():
    doc = {"name": "x", "steps": [{"name": "a", "retry": {"max_attempts": 3}}], "inputs": {}}
    assert leaves(doc) == {"name": "x", "steps[0].name": "a",
                           "steps[0].retry.max_attempts": 3, "inputs": {}}


def test_changed_and_added_follow_new_order_then_removed():
    old = {"name": "r", "description": "Daily metrics",
           "steps": [{"name": "a", "timeout": "10s"}, {"name": "b"}]}
    new = {"name": "r", "steps": [{"name": "a", "timeout": "30s"},
                                  {"name": "b", "retry": {"max_attempts": 3}}]}
    lines = [c.render() for c in diff_definitions(old, new)]
    assert lines == ["  ~ steps[0].timeout: 10s → 30s",
                     "  + steps[1].retry.max_attempts: 3",
                     "  - description: Daily metrics"]


def test_non_string_values_render_as_compact_json_and_types_matter():
    old = {"a": 1, "b": {"k": [1, 2]}, "c": "true"}
    new = {"a": 1.0, "b": {"k": [1, 2]}, "c": True}
    lines = [c.render() for c in diff_definitions(old, new)]
    assert lines == ["  ~ a: 1 → 1.0", "  ~ c: true → true"]


def test_identical_documents_have_no_changes():
    doc = {"name": "x", "steps": [{"name": "a", "params": {"body": {"t": None}}}]}
    assert diff_definitions(doc, doc) == []


def test_a_key_holding_a_dot_or_bracket_is_quoted_so_moving_it_is_a_change():
    """A key ``"a.b"`` and a key ``a`` holding ``b`` both had the path ``params.a.b``: plan
    said only formatting differed while apply stored a different definition."""
    old = {"params": {"a.b": 1, "x[0]": 2, '"q': 3}}
    new = {"params": {"a": {"b": 1}, "x": [2], '"q': 3}}
    assert list(leaves(old)) == ['params["a.b"]', 'params["x[0]"]', 'params["\\"q"]']
    lines = [c.render() for c in diff_definitions(old, new)]
    assert lines == ["  + params.a.b: 1", "  + params.x[0]: 2",
                     '  - params["a.b"]: 1', '  - params["x[0]"]: 2']
