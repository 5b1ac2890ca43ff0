"""Plugin actions (SPEC 5.4): ``<plugin>/<action>`` runs the executable ``<plugins_dir>/<plugin>``.

One process per attempt in its own process group, fed one JSON object on stdin. The worker
thread itself drives the pipes with a selector (no reader threads), so it can look at
``cancel`` and the deadline every ``TICK`` and SIGKILL the group at once. The group is also
killed when the plugin exits, so background children cannot hold the pipes open or outlive
their attempt. The leader is reaped only after the last kill, so its process-group id cannot
have been reused by then.

Linux only: the plugin dies with mantle, whatever kills mantle (SIGKILL, the OOM killer), so
an attempt resumed by another process never runs alongside it. Before exec the child asks for
SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``). The kernel sends it when the
*thread* that started the child ends, so ``run_plugin`` keeps its thread until the plugin is
reaped (a pool thread ends only when idle). A parent that died before the request took hold
is caught by comparing ``getppid()`` with the pid that started the child. The plugin's own
children are not covered (the request is not inherited): they keep running, with pipes that
no longer have a reader, unless they tie themselves to the plugin.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field

from mantle.connectors.base import (TICK, ConnectorError, ConnectorInterrupted, Invocation,
                                    parse_json)
from mantle.connectors.credentials import longest_secret
from mantle.durations import parse_duration

__all__ = [
    "run_plugin",
    "plugin_environment",
    "PASSED_VARIABLES",
    "plugin_path",
    "PLUGIN_NAME",
    "DEFAULT_TIMEOUT",
    "MAX_STDOUT_BYTES",
    "MAX_STDERR_BYTES",
]

PLUGIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
DEFAULT_TIMEOUT = "60s"  # replaced by the step's own timeout when it has one (SPEC 4.7)
MAX_STDOUT_BYTES = 10 * 1024 * 1024
MAX_STDERR_BYTES = 64 * 1024
# After the plugin itself exits, how long to keep draining pipes still held open by a
# descendant that escaped the group (setsid); its output is not the plugin's anyway.
_DRAIN_GRACE = 0.5
# The only variables a plugin inherits (SPEC 13.1.4): never MANTLE_* (the database URL, the
# encryption key, MANTLE_SECRET_*); its credential arrives on stdin.
PASSED_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
# prctl(2), looked up once here: the child runs Python between fork and exec (preexec_fn) in a
# process with many threads, so it only calls what is already resolved there.
_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _prctl.argtypes = (ctypes.c_int,) + (ctypes.c_ulong,) * 4
    _prctl.restype = ctypes.c_int
except AttributeError:  # not Linux: plugins cannot run (see _die_with)
    _prctl = None
_JSON_TYPES = {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
               int: "a number", float: "a number"}


def plugin_path(plugins_dir: str, plugin: str) -> str | None:
    """The executable for ``plugin``, or None when the name is unsafe or nothing is there."""
    if not PLUGIN_NAME.fullmatch(plugin):
        return None
    path = os.path.abspath(os.path.join(plugins_dir, plugin))
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return None


def plugin_environment(environ=None) -> dict[str, str]:
    """The environment a plugin process gets: PASSED_VARIABLES from ``environ`` (default
    mantle's own), nothing else."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in PASSED_VARIABLES if name in environ}


def run_plugin(inv: Invocation, plugin: str, path: str) -> dict:
    """Run one attempt of ``inv`` through the plugin executable at ``path``."""
    payload = {
        "action": inv.action,
        "params": inv.params,
        "credential": dict(inv.credential.fields) if inv.credential else {},
    }
    stdin = json.dumps(payload, separators=(",", ":")).encode()
    try:
        proc = subprocess.Popen(
            [path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True, env=plugin_environment(),
            preexec_fn=_die_with(os.getpid()),
        )
    except OSError as exc:
        raise ConnectorError(f'plugin "{plugin}" failed: {exc.strerror or exc}') from None
    except subprocess.SubprocessError:  # prctl refused (or missing): it would not die with us
        raise ConnectorError(f'plugin "{plugin}" failed: cannot tie it to mantle '
                             "(prctl PR_SET_PDEATHSIG, Linux only)") from None
    deadline = None
    if inv.step_timeout is None:
        deadline = time.monotonic() + parse_duration(DEFAULT_TIMEOUT)
    run = _Run(proc, guard=longest_secret(inv.credential))
    try:
        outcome = run.communicate(stdin, inv.cancel, deadline)
    finally:
        run.finish()
    return _result(plugin, outcome, run)


def _die_with(parent: int):
    """What the child runs before exec: SIGKILL when its parent thread dies, or exit now if
    the parent is already gone (it died between fork and prctl)."""

    def tie() -> None:
        if _prctl is None or _prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0:
            raise OSError("prctl")
        if os.getppid() != parent:
            os._exit(1)

    return tie


@dataclass
class _Run:
    """The pipes and bookkeeping of one plugin process, driven by the worker thread."""

    proc: subprocess.Popen
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exited_at: float | None = None
    guard: int = 0  # bytes dropped after stderr's cut: the end of a secret may begin there
    cut: bool = False  # stderr went over its limit and only its tail was kept

    def communicate(self, data: bytes, cancel, deadline: float | None) -> str:
        """Feed stdin and collect output until the plugin is done or must be stopped.

        Returns ``exited``, ``cancel``, ``timeout`` or ``overflow`` (stdout over its limit).
        """
        with selectors.DefaultSelector() as selector:
            for pipe, event in ((self.proc.stdout, selectors.EVENT_READ),
                                (self.proc.stderr, selectors.EVENT_READ),
                                (self.proc.stdin, selectors.EVENT_WRITE)):
                os.set_blocking(pipe.fileno(), False)
                selector.register(pipe, event)
            pending = memoryview(data)
            while True:
                if cancel.is_set():
                    return "cancel"
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return "timeout"
                if self._leader_exited(now) and (
                    not selector.get_map() or now - self.exited_at > _DRAIN_GRACE
                ):
                    return "exited"
                if not selector.get_map():
                    cancel.wait(TICK)  # pipes closed, leader still running
                    continue
                for key, _ in selector.select(TICK):
                    if key.fileobj is self.proc.stdin:
                        pending = self._write(selector, pending)
                    elif not self._read(selector, key.fileobj):
                        return "overflow"

    def _leader_exited(self, now: float) -> bool:
        """Whether the plugin process exited (seen without reaping it); kills the rest then."""
        if self.exited_at is None:
            if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return False
            self.exited_at = now
            self.kill_group()
        return True

    def _write(self, selector, pending: memoryview) -> memoryview:
        try:
            written = os.write(self.proc.stdin.fileno(), pending)
        except BlockingIOError:
            return pending
        except OSError:  # the plugin closed stdin or died: it does not want the rest
            written = len(pending)
        pending = pending[written:]
        if not pending:
            selector.unregister(self.proc.stdin)
            self.proc.stdin.close()
        return pending

    def _read(self, selector, pipe) -> bool:
        """Take what the pipe has; False when stdout went over its limit."""
        try:
            chunk = os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            return True
        if not chunk:
            selector.unregister(pipe)
            return True
        if pipe is self.proc.stdout:
            self.stdout += chunk
            return len(self.stdout) <= MAX_STDOUT_BYTES
        # Keep the tail: the last lines of stderr (a traceback's error) say what went wrong.
        self.stderr += chunk
        if len(self.stderr) > MAX_STDERR_BYTES:
            del self.stderr[:-MAX_STDERR_BYTES]
            self.cut = True
        return True

    def stderr_tail(self) -> bytes:
        """What stderr said last. After a cut, less its first ``guard`` bytes: the cut may
        have kept the end of the credential without its start, which redaction would not
        recognise (SPEC 13.2: values never reach errors)."""
        if not self.cut:
            return bytes(self.stderr)
        return b"..." + bytes(self.stderr[self.guard:])

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self) -> None:
        """Kill whatever is left of the group, reap the leader, close the pipes."""
        self.kill_group()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _result(plugin: str, outcome: str, run: _Run) -> dict:
    if outcome == "cancel":
        raise ConnectorInterrupted()
    if outcome == "timeout":
        raise ConnectorError(f'plugin "{plugin}" timed out after {DEFAULT_TIMEOUT}')
    if outcome == "overflow":
        raise ConnectorError(
            f'plugin "{plugin}" returned invalid output: '
            f"stdout exceeds {MAX_STDOUT_BYTES} bytes"
        )
    output, problem = _parse_output(bytes(run.stdout))
    code = run.proc.returncode
    if code != 0:
        raise ConnectorError(f'plugin "{plugin}" failed: {_failure(code, run.stderr_tail())}',
                             output=output)
    if problem:
        raise ConnectorError(f'plugin "{plugin}" returned invalid output: {problem}')
    return output


def _parse_output(data: bytes) -> tuple[dict | None, str | None]:
    """The stdout object, or None and why not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
    if not text.strip():
        return None, "no output"
    try:
        value = parse_json(text)
    except (ValueError, RecursionError) as exc:
        return None, str(exc) or "not JSON"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {_JSON_TYPES.get(type(value), 'a value')}"
    return value, None


def _failure(code: int, stderr: bytes) -> str:
    text = stderr.decode("utf-8", "replace").strip()
    if text:
        return text
    if code < 0:
        return f"killed by signal {_signal_name(-code)}"
    return f"exit status {code}"


def _signal_name(number: int) -> str:
    """``SIGKILL``; the number for those Python has no name for (real-time signals)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
