"""Plugin actions (SPEC 5.4) with real executables written to a temporary plugins dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mantle.connectors.credentials import Credential
from mantle.connectors import ConnectorError, ConnectorInterrupted, Invocation, run_action
from mantle.connectors import plugins
from tests.helpers import Background

PY = "#!/usr/bin/env python3\nimport json, os, sys\n"


@pytest.fixture
def plugins_dir(tmp_path) -> Path:
    directory = tmp_path / "plugins"
    directory.mkdir()
    return directory


def install(directory: Path, name: str, script: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(script).lstrip("\n"))
    path.chmod(0o755)
    return path


def invoke(directory, action, params=None, cancel=None, **fields):
    if isinstance(fields.get("credential"), str):
        fields["credential"] = Credential("token", "generic", {"key": fields["credential"]})
    inv = Invocation(action, {} if params is None else params, cancel or threading.Event(),
                     plugins_dir=str(directory), **fields)
    return run_action(inv)


def fails(directory, action, params=None, **fields) -> ConnectorError:
    with pytest.raises(ConnectorError) as caught:
        invoke(directory, action, params, **fields)
    return caught.value


def process_gone(pid: int) -> bool:
    """Dead or a zombie (a zombie waits for a reaper that may be slow in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_until_gone(pid: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.01)


def wait_for_file(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.005)
    return path.read_text().strip()


# --- the protocol ---------------------------------------------------------------------------

def test_plugin_receives_action_params_and_credential_on_stdin(plugins_dir, tmp_path):
    received = tmp_path / "stdin.json"
    install(plugins_dir, "echo", f"#!/bin/sh\ncat > {received}\necho '{{}}'\n")
    assert invoke(plugins_dir, "echo/do-thing", {"n": [1, "é"]}, credential="k-1") == {}
    assert json.loads(received.read_text()) == {
        "action": "echo/do-thing", "params": {"n": [1, "é"]}, "credential": {"key": "k-1"}
    }


def test_plugin_without_credential_gets_an_empty_credential_object(plugins_dir):
    install(plugins_dir, "echo", PY + 'print(json.dumps(json.load(sys.stdin)["credential"]))\n')
    assert invoke(plugins_dir, "echo/x") == {}


def test_plugin_runs_in_mantles_working_directory_with_only_the_allowed_variables(
        plugins_dir, tmp_path, monkeypatch):
    # The interpreter itself, not /usr/bin/env python3: a shim (pyenv) would add variables.
    direct = f"#!{sys.executable}\nimport json, os, sys\n"
    install(plugins_dir, "env", direct + textwrap.dedent("""
        print(json.dumps({"cwd": os.getcwd(), "env": dict(os.environ),
                          "own_group": os.getpgrp() == os.getpid()}))
    """))
    monkeypatch.chdir(tmp_path)
    for name, value in (("PLUGIN_TEST_VAR", "v1"), ("MANTLE_DATABASE_URL", "postgresql://a:b@h/d"),
                        ("MANTLE_ENCRYPTION_KEY", "ab" * 32), ("MANTLE_SECRET_TOKEN", "t0k"),
                        ("DATABASE_URL", "sqlite:///x.db"), ("HOME", "/home/someone"),
                        ("LANG", "C.UTF-8"), ("LC_ALL", "C.UTF-8"), ("TZ", "UTC"),
                        ("TMPDIR", str(tmp_path))):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    output = invoke("plugins", "env/x")  # relative plugins dir, resolved from the cwd
    assert output["cwd"] == str(tmp_path) and output["own_group"] is True
    # SPEC 13.1.4: PATH, HOME, LANG, LC_ALL, TZ, TMPDIR and nothing else (a Python plugin's
    # interpreter may add LC_CTYPE itself when it coerces the C locale).
    env = {k: v for k, v in output["env"].items() if k != "LC_CTYPE"}
    assert env == {"PATH": os.environ["PATH"], "HOME": "/home/someone", "LANG": "C.UTF-8",
                   "LC_ALL": "C.UTF-8", "TZ": "UTC", "TMPDIR": str(tmp_path)}


def test_plugin_environment_omits_allowed_variables_that_mantle_lacks():
    assert plugins.plugin_environment({"PATH": "/bin", "MANTLE_X": "1", "USER": "u"}) == \
        {"PATH": "/bin"}


def test_stdout_object_with_surrounding_whitespace_is_the_output(plugins_dir):
    install(plugins_dir, "ws", '#!/bin/sh\nprintf \'\\n  {"a": 1}  \\n\\n\'\n')
    assert invoke(plugins_dir, "ws/x") == {"a": 1}


def test_each_attempt_is_a_fresh_process(plugins_dir):
    install(plugins_dir, "pid", PY + 'print(json.dumps({"pid": os.getpid()}))\n')
    assert invoke(plugins_dir, "pid/x") != invoke(plugins_dir, "pid/x")


@pytest.mark.parametrize("stdout, reason", [
    ("", "no output"),
    ("not json", "Expecting value: line 1 column 1 (char 0)"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('"text"', "expected a JSON object, got a string"),
    ("null", "expected a JSON object, got null"),
    ('{"a": 1}\n{"b": 2}', "Extra data: line 2 column 1 (char 9)"),
    ('{"a": NaN}', "NaN is not JSON"),
])
def test_stdout_that_is_not_one_json_object_is_invalid_output(plugins_dir, stdout, reason):
    install(plugins_dir, "bad", PY + f"sys.stdout.write({stdout!r})\n")
    error = fails(plugins_dir, "bad/x")
    assert error.message == f'plugin "bad" returned invalid output: {reason}'
    assert error.retryable


def test_stdout_with_an_escaped_lone_surrogate_keeps_a_replacement_character(plugins_dir):
    install(plugins_dir, "cut", PY + 'sys.stdout.write(\'{"t": "a\\\\udc00", "\\\\ud800": 1}\')\n')
    output = invoke(plugins_dir, "cut/x")
    assert output == {"t": "a\ufffd", "\ufffd": 1}
    json.dumps(output, ensure_ascii=False).encode("utf-8")  # storable


def test_stdout_that_is_not_utf8_is_invalid_output(plugins_dir):
    install(plugins_dir, "bin", PY + 'sys.stdout.buffer.write(b\'{"a": "\\xff"}\')\n')
    error = fails(plugins_dir, "bin/x")
    assert error.message == (
        'plugin "bin" returned invalid output: not UTF-8 (invalid start byte at byte 7)'
    )


def test_nonzero_exit_fails_with_trimmed_stderr(plugins_dir):
    install(plugins_dir, "err", "#!/bin/sh\necho '  disk full\n' >&2\nexit 3\n")
    assert fails(plugins_dir, "err/x").message == 'plugin "err" failed: disk full'


def test_nonzero_exit_with_empty_stderr_reports_the_exit_status(plugins_dir):
    install(plugins_dir, "err", "#!/bin/sh\necho '   ' >&2\nexit 7\n")
    assert fails(plugins_dir, "err/x").message == 'plugin "err" failed: exit status 7'


def test_plugin_killed_by_a_signal_names_it(plugins_dir):
    install(plugins_dir, "sig", "#!/bin/sh\nkill -9 $$\n")
    assert fails(plugins_dir, "sig/x").message == 'plugin "sig" failed: killed by signal SIGKILL'


def test_plugin_killed_by_a_signal_python_has_no_name_for_names_its_number(plugins_dir):
    # Real-time signals between SIGRTMIN and SIGRTMAX have no signal.Signals member: naming
    # one raised ValueError, and the step failed with "sig/x: internal error: 40 is not a
    # valid Signals" and a "connector crashed" traceback in the log.
    install(plugins_dir, "sig", "#!/bin/sh\nkill -40 $$\n")
    assert fails(plugins_dir, "sig/x").message == 'plugin "sig" failed: killed by signal 40'


def test_failing_plugin_keeps_its_json_object_as_partial_output(plugins_dir):
    install(plugins_dir, "part", "#!/bin/sh\necho '{\"done\": 2}'\necho oops >&2\nexit 1\n")
    error = fails(plugins_dir, "part/x")
    assert error.message == 'plugin "part" failed: oops' and error.output == {"done": 2}


def test_plugin_that_cannot_be_executed_fails(plugins_dir):
    install(plugins_dir, "noint", "#!/nonexistent/interpreter\n")
    assert fails(plugins_dir, "noint/x").message == (
        'plugin "noint" failed: No such file or directory'
    )


# --- limits ---------------------------------------------------------------------------------

def test_stdout_over_10_mib_is_invalid_output(plugins_dir):
    install(plugins_dir, "big", PY + "sys.stdout.buffer.write(b' ' * (10 * 1024 * 1024 + 1))\n")
    assert fails(plugins_dir, "big/x").message == (
        'plugin "big" returned invalid output: stdout exceeds 10485760 bytes'
    )


def test_endless_stdout_is_stopped_at_the_limit(plugins_dir):
    install(plugins_dir, "yes", "#!/bin/sh\nexec yes\n")
    assert "stdout exceeds 10485760 bytes" in fails(plugins_dir, "yes/x").message


def test_stderr_keeps_its_last_64_kib(plugins_dir):
    install(plugins_dir, "loud", PY + textwrap.dedent("""
        sys.stderr.write("early\\n" + "x" * 200_000 + "\\nthe real error")
        sys.exit(1)
    """))
    message = fails(plugins_dir, "loud/x").message
    assert message.endswith("\nthe real error") and "early" not in message
    assert message.startswith('plugin "loud" failed: ...xxx')  # "...": the start is cut
    assert len(message) == len('plugin "loud" failed: ...') + 64 * 1024


def test_large_stdin_stdout_and_stderr_flow_without_deadlock(plugins_dir):
    install(plugins_dir, "pump", PY + textwrap.dedent("""
        sys.stderr.write("e" * 300_000)
        sys.stderr.flush()
        data = json.load(sys.stdin)
        print(json.dumps({"echo": data["params"]["blob"], "pad": "p" * 300_000}))
    """))
    blob = "b" * 1_000_000
    output = invoke(plugins_dir, "pump/x", {"blob": blob})
    assert output["echo"] == blob and len(output["pad"]) == 300_000


def test_plugin_that_ignores_stdin_still_works(plugins_dir):
    install(plugins_dir, "deaf", "#!/bin/sh\necho '{}'\n")
    assert invoke(plugins_dir, "deaf/x", {"blob": "b" * 1_000_000}) == {}


def test_default_timeout_is_60s():
    assert plugins.DEFAULT_TIMEOUT == "60s"


@pytest.mark.alone
def test_plugin_over_the_default_timeout_fails_and_its_group_is_killed(plugins_dir, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(plugins, "DEFAULT_TIMEOUT", "200ms")
    pid_file = tmp_path / "child.pid"
    install(plugins_dir, "slow", f"#!/bin/sh\nsleep 1000 &\necho $! > {pid_file}\nsleep 1000\n")
    started = time.monotonic()
    assert fails(plugins_dir, "slow/x").message == 'plugin "slow" timed out after 200ms'
    assert time.monotonic() - started < 1.0
    wait_until_gone(int(pid_file.read_text()))


def test_step_timeout_replaces_the_default_timeout(plugins_dir, monkeypatch):
    monkeypatch.setattr(plugins, "DEFAULT_TIMEOUT", "50ms")
    install(plugins_dir, "nap", "#!/bin/sh\nsleep 0.3\necho '{\"slept\": true}'\n")
    assert invoke(plugins_dir, "nap/x", step_timeout=10.0) == {"slept": True}


# --- cancellation and the process group -----------------------------------------------------

@pytest.mark.alone
def test_cancel_kills_the_plugin_and_its_grandchildren_within_100ms(plugins_dir, tmp_path):
    pid_file = tmp_path / "pids"
    install(plugins_dir, "hang", f"#!/bin/sh\nsleep 1000 &\necho $$ $! > {pid_file}\nwait\n")
    cancel = threading.Event()
    call = Background(lambda: invoke(plugins_dir, "hang/x", cancel=cancel, step_timeout=30.0))
    plugin_pid, grandchild_pid = map(int, wait_for_file(pid_file).split())
    cancelled_at = time.monotonic()
    cancel.set()
    call.join(2)
    assert isinstance(call.error, ConnectorInterrupted)
    latency = call.ended_at - cancelled_at
    print(f"plugin cancel latency: {latency * 1000:.1f} ms")
    assert latency < 0.5
    assert process_gone(plugin_pid)
    wait_until_gone(grandchild_pid)


@pytest.mark.alone
def test_background_child_holding_stdout_does_not_block_or_outlive_the_plugin(plugins_dir,
                                                                              tmp_path):
    pid_file = tmp_path / "child.pid"
    install(plugins_dir, "bg", f"#!/bin/sh\nsleep 1000 &\necho $! > {pid_file}\n"
                               "echo '{\"ok\": true}'\n")
    started = time.monotonic()
    assert invoke(plugins_dir, "bg/x") == {"ok": True}
    assert time.monotonic() - started < 0.5
    wait_until_gone(int(pid_file.read_text()))


def test_output_written_before_the_plugin_closes_its_pipes_and_keeps_running(plugins_dir):
    install(plugins_dir, "closer", "#!/bin/sh\necho '{\"a\": 1}'\nexec >&- 2>&-\nsleep 0.2\n")
    assert invoke(plugins_dir, "closer/x") == {"a": 1}


def test_credential_printed_by_a_plugin_is_redacted(plugins_dir):
    install(plugins_dir, "leak", PY + textwrap.dedent("""
        key = json.load(sys.stdin)["credential"]["key"]
        print(json.dumps({"said": "my key is " + key}))
    """))
    assert invoke(plugins_dir, "leak/x", credential="hunter2") == {
        "said": "my key is ********"
    }



def test_a_credential_that_is_not_utf8_reaches_the_plugin_and_is_redacted(plugins_dir):
    # MANTLE_SECRET_* and `secrets create --field` values come from the OS as text with the
    # bytes that are not UTF-8 as lone surrogates (Python's surrogateescape)
    key = os.fsdecode(b"hunter2-\xff")
    install(plugins_dir, "leak", PY + textwrap.dedent("""
        key = json.load(sys.stdin)["credential"]["key"]
        print(json.dumps({"said": "my key is " + key, "length": len(key)}))
    """))
    assert invoke(plugins_dir, "leak/x", credential=key) == {
        "said": "my key is ********", "length": 9}
    install(plugins_dir, "raw", PY + textwrap.dedent("""
        key = json.load(sys.stdin)["credential"]["key"]
        sys.stderr.buffer.write(b"bad key " + key.encode("utf-8", "surrogateescape"))
        sys.exit(1)
    """))
    assert fails(plugins_dir, "raw/x", credential=key).message == (
        'plugin "raw" failed: bad key ********')

# --- dying with mantle (Linux) --------------------------------------------------------------

def test_plugin_is_set_to_be_killed_when_the_thread_that_started_it_dies(plugins_dir):
    install(plugins_dir, "deathsig", f"#!{sys.executable}\n" + textwrap.dedent("""
        import ctypes, json, os
        prctl = ctypes.CDLL(None).prctl
        value = ctypes.c_int(0)
        prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
        print(json.dumps({"signal": value.value, "own_group": os.getpgrp() == os.getpid()}))
    """))
    assert invoke(plugins_dir, "deathsig/x") == {"signal": 9, "own_group": True}


def test_plugin_whose_parent_died_before_the_kill_request_held_never_runs(plugins_dir, tmp_path):
    """The race between fork and prctl: the child sees another parent and exits at once."""
    ran = tmp_path / "ran"
    path = install(plugins_dir, "late", f"#!/bin/sh\ntouch {ran}\n")
    # Expecting our own parent: as if the child had already been adopted by another process.
    child = subprocess.run([str(path)], preexec_fn=plugins._die_with(os.getppid()), timeout=10)
    assert child.returncode == 1 and not ran.exists()
