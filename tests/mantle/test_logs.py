"""JSON log lines (SPEC 9.2): keys, order, time format."""

from __future__ import annotations

import io
import json
import logging

import pytest

from mantle.logs import setup_logging


@pytest.fixture
def lines():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("debug", stream)
    yield lambda: [json.loads(text) for text in stream.getvalue().splitlines()]
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def _record(created: float, msg: str = "execution finished", **extra) -> logging.LogRecord:
    record = logging.getLogger("mantle.engine").makeRecord(
        "mantle.engine", logging.INFO, __file__, 1, msg, (), None, extra=extra)
    record.created, record.msecs = created, (created - int(created)) * 1000
    return record


def test_a_log_line_has_time_level_msg_then_context_in_spec_order(lines):
    log = logging.getLogger("mantle.engine")
    log.info("execution finished", extra={"status": "completed", "step": "a",
                                          "execution_id": "e1", "workflow": "w"})
    log.warning("step retrying")
    first, second = lines()
    assert list(first) == ["time", "level", "msg", "workflow", "execution_id", "step", "status"]
    assert first["level"] == "INFO" and second["level"] == "WARN"


def test_log_time_is_utc_with_milliseconds_across_second_boundaries(lines):
    handler = logging.getLogger().handlers[0]
    stamps = [json.loads(handler.format(_record(t)))["time"]
              for t in (1773824400.412, 1773824400.999, 1773824401.0, 1773824400.5)]
    assert stamps == ["2026-03-18T09:00:00.412Z", "2026-03-18T09:00:00.999Z",
                      "2026-03-18T09:00:01.000Z", "2026-03-18T09:00:00.500Z"]


def test_non_ascii_and_non_json_values_are_written_as_text(lines):
    logging.getLogger("mantle.steps").info("héllo ✓", extra={"when": object})
    (line,) = lines()
    assert line["msg"] == "héllo ✓" and line["when"] == str(object)
