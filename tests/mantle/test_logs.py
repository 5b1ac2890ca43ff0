"""JSON log lines (SPEC 9.2): keys, order, time format."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import struct
import subprocess
import sys
import termios
import threading

import pytest

from mantle.logs import BackgroundStreamHandler, JsonFormatter, setup_logging
from tests.helpers.waiting import wait_until


@pytest.fixture
def lines():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("debug", stream)
    # Lines logged by this test only, not by a thread another test left winding down (the
    # handler writes on the thread that logs; records carry no thread id: logThreads off).
    test_thread = threading.get_ident()
    root.handlers[0].addFilter(lambda _record: threading.get_ident() == test_thread)
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


def test_extra_fields_follow_in_the_order_given_with_nested_values_and_the_error(lines):
    """Only ``extra`` is written after the context: none of LogRecord's own attributes, nor
    private ``_`` keys; an exception becomes ``error`` unless the line names one."""
    log = logging.getLogger("mantle.engine")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("step failed", extra={"zeta": 1, "alpha": {"b": [1, 2.5, None]},
                                            "_private": True, "workflow": "w"})
        log.error("step failed", exc_info=True, extra={"error": "given"})
    first, second = lines()
    assert list(first) == ["time", "level", "msg", "workflow", "zeta", "alpha", "error"]
    assert first["alpha"] == {"b": [1, 2.5, None]}
    assert first["error"].startswith("Traceback") and "ValueError: boom" in first["error"]
    assert second["error"] == "given"


def test_the_background_handler_writes_every_line_in_order_and_flush_waits_for_them():
    stream = io.StringIO()
    handler = BackgroundStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.background")
    log.propagate, log.level = False, logging.INFO
    log.addHandler(handler)
    try:
        def burst(prefix):
            for index in range(500):
                log.info(f"{prefix}{index}")

        threads = [threading.Thread(target=burst, args=(p,)) for p in "abcd"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        handler.flush()
        messages = [json.loads(line)["msg"] for line in stream.getvalue().splitlines()]
        assert len(messages) == 2000
        for prefix in "abcd":  # each thread's lines in the order it logged them
            assert [m for m in messages if m[0] == prefix] == [f"{prefix}{i}" for i in range(500)]
    finally:
        log.removeHandler(handler)
        handler.close()
    assert not handler._writer.is_alive()


def test_closing_the_background_handler_writes_what_it_still_holds():
    stream = io.StringIO()
    handler = BackgroundStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.handle(_record(1773824400.412, "server stopped"))
    handler.close()
    assert json.loads(stream.getvalue())["msg"] == "server stopped"


def _waiting_in(pipe: int) -> int:
    """Bytes written to ``pipe`` and not read yet."""
    return struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0" * 4))[0]


_WRITER = """
import logging, sys
from mantle.logs import setup_logging
setup_logging("info", sys.stdout, background=True)
for i in range(3000):
    logging.getLogger("mantle.test").info("line", extra={"writer": sys.argv[1], "i": i,
                                                          "pad": "x" * 300})
logging.shutdown()
"""


def test_processes_sharing_a_pipe_never_split_each_others_lines():
    """``serve --workers``: every worker writes its JSON lines to the one stdout. A write to a
    pipe is whole only up to PIPE_BUF bytes; a batch of lines written at once was split where
    the pipe was full, and another worker's lines landed inside a line."""
    read, write = os.pipe()
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, name], stdout=write)
               for name in ("a", "b", "c")]
    os.close(write)
    # the pipe fills while nobody reads: the writers block in the middle of their batches
    wait_until(lambda: _waiting_in(read) >= 49152, timeout=30)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    assert all(writer.wait(30) == 0 for writer in writers)
    lines = data.decode().splitlines()
    assert len(lines) == 9000
    assert all(json.loads(line)["msg"] == "line" for line in lines)


def test_a_lone_surrogate_is_escaped_and_costs_no_line():
    """SPEC 9.2: one JSON object per line. A value decoded with ``surrogateescape`` (an
    ``env.<KEY>`` from a variable that is not UTF-8, a config key) holds a lone surrogate,
    which UTF-8 cannot encode: the daemon's writer dropped the whole batch of lines it was
    in, other executions' lines with it. It is written as the JSON escape ``\\udce9``."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    handler = BackgroundStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.handle(_record(1773824400.412, "before"))
    handler.handle(_record(1773824400.412, "caf\udce9", workflow="w\ud800"))
    handler.handle(_record(1773824400.412, "after"))
    handler.close()
    lines = raw.getvalue().decode("utf-8").splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["before", "caf\udce9", "after"]
    assert json.loads(lines[1])["workflow"] == "w\ud800"
    assert "\\udce9" in lines[1]


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_a_stream_that_is_not_utf8_gets_every_line_as_ascii_json(encoding):
    """``mantle serve`` under a non-UTF-8 locale (stdout latin-1 or ASCII, strict): a line
    with a character the stream cannot encode (a core/log message "done ✓") made the
    daemon's writer drop the whole batch it was in, other executions' lines with it. Such a
    stream gets JSON with every non-ASCII character escaped, which it can always write."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding=encoding, errors="strict")
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        handler = setup_logging("info", stream, background=True)
        for text in ("before", "done \u2713 caf\u00e9 \U0001f600", "after"):
            handler.handle(_record(1773824400.412, text, workflow="w"))
        handler.close()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = raw.getvalue().decode("ascii").splitlines()
    assert [json.loads(line)["msg"] for line in lines] == [
        "before", "done \u2713 caf\u00e9 \U0001f600", "after"]
