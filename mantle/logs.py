"""JSON log lines (SPEC 9.2): one object per line, ``time``, ``level``, ``msg``, then context."""

from __future__ import annotations

import codecs
import itertools
import json
import logging
import queue
import re
import select
import sys
import threading
import time
from typing import TextIO

from mantle.text import LONE_SURROGATE

__all__ = ["JsonFormatter", "BackgroundStreamHandler", "setup_logging", "LEVELS"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "error": logging.ERROR}
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN",
                logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}
# Context keys first, in this order; anything else passed through ``extra`` follows.
_CONTEXT = ("workflow", "execution_id", "step")
_RECORD_ATTRIBUTES = vars(logging.LogRecord("", 0, "", 0, "", None, None))
_STANDARD = frozenset(_RECORD_ATTRIBUTES) | {"message", "asctime"}
# A record's attributes start with those LogRecord.__init__ sets; ``extra`` comes after them.
_FIRST_EXTRA = len(_RECORD_ATTRIBUTES)
_GATHER = 0.005  # seconds the log writer lets lines gather between writes
# Lines waiting to be written beyond which new ones are dropped (and counted) instead of
# growing the queue without bound when stdout cannot keep up (issue 11.9).
MAX_QUEUED_LINES = 100_000
_PIPE_BUF = getattr(select, "PIPE_BUF", 512)  # the largest write a pipe keeps whole
# The json module's C encoder, made once: ``json.dumps`` with options builds an encoder per
# call. Compact, non-ASCII kept, ``str()`` of anything JSON has no type for. Without the
# circular-reference check (it would share state between threads): no log field
# refers to itself.
_encode_chunks = json.encoder.c_make_encoder(
    None, str, json.encoder.encode_basestring, None, ":", ",", False, False, True)
# The same with every non-ASCII character escaped: for a stream that is not UTF-8 (stdout under
# a latin-1 or ASCII locale), which could not write some characters and would refuse the line.
_encode_ascii_chunks = json.encoder.c_make_encoder(
    None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)


# A lone surrogate (text decoded with ``surrogateescape``: an environment variable or a file
# name that is not UTF-8) is kept by that encoder, but no UTF-8 stream can write it; as its
# JSON escape the line stays valid JSON and keeps the value.
def _escape_surrogate(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


class JsonFormatter(logging.Formatter):
    """Formats a record as one compact JSON object.

    The daemon writes three lines per execution at ``info``, so this sits on the hot path:
    the second-resolution part of the timestamp is formatted once per second.
    """

    def __init__(self, ascii_only: bool = False) -> None:
        """``ascii_only``: escape every non-ASCII character (a stream that is not UTF-8)."""
        super().__init__()
        self._cached = (-1, "")  # (second, its text), replaced as one value: thread-safe
        self._encode = _encode_ascii_chunks if ascii_only else _encode_chunks

    def _stamp(self, record: logging.LogRecord) -> str:
        # Rounded to the microsecond first, as datetime.fromtimestamp does: 0.412 is stored as
        # 0.41199..., which truncating straight to milliseconds would print as .411.
        second, micros = divmod(round(record.created * 1_000_000), 1_000_000)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._cached = (second, prefix)
        return f"{prefix}{micros // 1000:03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        line = {"time": self._stamp(record),
                "level": _LEVEL_NAMES.get(record.levelno, record.levelname),
                "msg": record.getMessage()}
        for key in _CONTEXT:
            if key in fields:
                line[key] = fields[key]
        for key, value in itertools.islice(fields.items(), _FIRST_EXTRA, None):
            if key not in _STANDARD and key not in line and not key.startswith("_"):
                line[key] = value
        if record.exc_info and "error" not in line:
            line["error"] = self.formatException(record.exc_info)
        text = "".join(self._encode(line, 0))
        if not text.isascii() and LONE_SURROGATE.search(text):  # isascii: O(1), the usual case
            text = LONE_SURROGATE.sub(_escape_surrogate, text)
        return text


class BackgroundStreamHandler(logging.Handler):
    """Formats on the logging thread, writes on a thread of its own.

    A ``StreamHandler`` holds its lock across the write and flush system calls, during which
    the writer has let go of the GIL; every other thread that logs meanwhile blocks on the
    lock and then queues for the GIL again. Under load that was a tenth of the daemon's time.
    Here a line goes into a queue and one writer thread writes whatever has gathered, in
    order, with one flush. ``flush()`` waits until everything queued so far is written;
    lines still queued when the process is killed are lost (a few milliseconds' worth).
    While ``max_queued`` lines wait, further lines are dropped; a ``log lines dropped`` line
    with their ``count`` is written once the writer catches up.
    """

    def __init__(self, stream: TextIO, max_queued: int = MAX_QUEUED_LINES):
        super().__init__()
        self.stream = stream
        self._max_queued = max_queued
        self._dropped = 0
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="mantle-log-writer",
                                        daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: format() keeps no shared state, the queue is thread-safe.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if self._lines.qsize() >= self._max_queued:
            self._dropped += 1  # approximate under races; only reported
            return
        try:
            self._lines.put(self.format(record))
        except Exception:
            self.handleError(record)

    def flush(self, timeout: float = 5.0) -> None:
        if self._writer.is_alive():
            written = threading.Event()
            self._lines.put(written)
            written.wait(timeout)

    def close(self) -> None:
        if self._writer.is_alive():
            self._lines.put(None)
            self._writer.join(5.0)
        super().close()

    def _write_loop(self) -> None:
        while True:
            batch = [self._lines.get()]
            try:
                while len(batch) < 1000:
                    batch.append(self._lines.get_nowait())
            except queue.Empty:
                pass
            text = [line for line in batch if isinstance(line, str)]
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                text.append(self.format(logging.makeLogRecord({
                    "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": "log lines dropped", "count": dropped})))
            if text:
                try:
                    self._write("\n".join(text) + "\n")
                except (OSError, ValueError):  # stdout closed or gone: nothing to do
                    pass
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
            if None in batch:
                return
            # Let lines gather before the next write: under load one wake-up per interval instead
            # of one per line, each a GIL hand-off; when idle, get() above just waits.
            time.sleep(_GATHER)

    def _write(self, text: str) -> None:
        """Write whole lines, at most PIPE_BUF bytes per system call where the stream has a
        byte buffer: the processes of ``serve --workers`` share one stdout, and a pipe keeps
        a write whole only up to that size (a larger one was split where the pipe was full,
        with another worker's lines landing inside a line). Only a line longer than that
        can still be split."""
        buffer = getattr(self.stream, "buffer", None)
        if buffer is None:
            self.stream.write(text)
            self.stream.flush()
            return
        self.stream.flush()  # anything written through the text layer goes first
        data = text.encode(self.stream.encoding or "utf-8", self.stream.errors or "strict")
        start = 0
        while start < len(data):
            end = data.rfind(b"\n", start, start + _PIPE_BUF) + 1
            if end <= start:  # one line longer than PIPE_BUF
                end = data.find(b"\n", start) + 1 or len(data)
            buffer.write(data[start:end])
            buffer.flush()
            start = end


def setup_logging(level: str, stream: TextIO | None = None,
                  background: bool = False) -> logging.Handler:
    """Send all mantle logs as JSON lines to ``stream`` (stderr by default) at ``level``;
    ``background``: written by a thread of their own (the daemon)."""
    # None of these record attributes is ever written out; collecting them costs a stack
    # walk and three lookups per line (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    stream = stream or sys.stderr
    handler = BackgroundStreamHandler(stream) if background else logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(ascii_only=not _writes_utf8(stream)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, BackgroundStreamHandler):
            old.close()  # writes what it still holds, ends its thread
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # Debug logs are about requests and executions, not SQL text or actor bookkeeping; SQL
    # lines would also carry every statement's parameters, webhook secrets among them.
    for noisy in ("peewee", "pykka"):
        logging.getLogger(noisy).setLevel(logging.INFO)
    return handler


def _writes_utf8(stream: TextIO) -> bool:
    """Whether ``stream`` encodes text as UTF-8 (a stream without an encoding keeps text)."""
    encoding = getattr(stream, "encoding", None)
    if not encoding:
        return True
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False
