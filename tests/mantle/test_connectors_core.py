"""core/sleep, core/log, core/fail (SPEC 5.2)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from mantle.connectors import ConnectorError, ConnectorInterrupted, Invocation, run_action
from tests.helpers import Background


def invocation(action, params, cancel=None, **context):
    return Invocation(action, params, cancel or threading.Event(), **context)


def fails(action, params) -> ConnectorError:
    with pytest.raises(ConnectorError) as caught:
        run_action(invocation(action, params))
    return caught.value


# --- core/sleep -----------------------------------------------------------------------------

def test_sleep_waits_the_duration_and_reports_it_in_ms():
    started = time.monotonic()
    assert run_action(invocation("core/sleep", {"duration": "50ms"})) == {"duration_ms": 50}
    assert time.monotonic() - started >= 0.05


@pytest.mark.parametrize("text, ms", [("0", 0), ("0s", 0), ("1.5ms", 2), ("+1ms", 1)])
def test_sleep_accepts_any_non_negative_duration(text, ms):
    assert run_action(invocation("core/sleep", {"duration": text})) == {"duration_ms": ms}


@pytest.mark.parametrize("params", [{}, {"duration": None}, None])
def test_sleep_without_duration_fails(params):
    assert fails("core/sleep", params).message == "core/sleep: duration is required"


@pytest.mark.parametrize("value, shown", [("soon", "soon"), ("-1s", "-1s"), ("10", "10"),
                                          (5, "5"), ([1], "[1]"), ("", ""),
                                          ("99999999999999999h", "99999999999999999h")])
def test_sleep_with_invalid_or_negative_duration_fails(value, shown):
    error = fails("core/sleep", {"duration": value})
    assert error.message == f'core/sleep: invalid duration "{shown}"'


@pytest.mark.alone
def test_sleep_is_cut_short_by_cancel():
    cancel = threading.Event()
    call = Background(lambda: run_action(invocation("core/sleep", {"duration": "1h"}, cancel)))
    cancelled_at = time.monotonic()
    cancel.set()
    call.join(2)
    assert isinstance(call.error, ConnectorInterrupted)
    assert call.ended_at - cancelled_at < 0.5


def test_params_that_are_not_a_map_fail():
    assert fails("core/sleep", ["1s"]).message == "core/sleep: params must be a map"


# --- core/log -------------------------------------------------------------------------------

def test_log_writes_the_message_at_info_with_step_context(caplog):
    caplog.set_level(logging.INFO, logger="mantle.steps")
    inv = invocation("core/log", {"message": "hello 100%"}, workflow="wf", execution_id="e1",
                     step="say")
    assert run_action(inv) == {"message": "hello 100%"}
    [record] = caplog.records
    assert record.name == "mantle.steps" and record.levelno == logging.INFO
    assert record.getMessage() == "hello 100%"
    assert (record.workflow, record.execution_id, record.step) == ("wf", "e1", "say")


@pytest.mark.parametrize("message, text", [({"a": [1, "é"]}, '{"a":[1,"é"]}'), (3, "3"),
                                           (None, "null"), (False, "false")])
def test_log_renders_non_string_messages_as_compact_json(caplog, message, text):
    caplog.set_level(logging.INFO, logger="mantle.steps")
    assert run_action(invocation("core/log", {"message": message})) == {"message": message}
    assert caplog.records[0].getMessage() == text


def test_log_without_message_fails():
    assert fails("core/log", {}).message == "core/log: message is required"


# --- core/fail ------------------------------------------------------------------------------

def test_fail_uses_the_message_and_is_retryable():
    error = fails("core/fail", {"message": "boom"})
    assert error.message == "boom" and error.retryable and error.output is None


def test_fail_without_message_uses_the_default():
    assert fails("core/fail", {}).message == "failed by core/fail"
