"""``@pytest.mark.alone``: a test that measures time runs while no other test runs.

The suite runs on several pytest-xdist workers (``-n``). Most tests wait on conditions and
do not mind a busy machine, but a test that asserts a latency or a duration (a cancel within
100 ms, an evaluation cut at its one-second limit) would read another worker's CPU load as a
regression. Such a test takes the run's lock exclusively; every other test holds it shared.

Two lock files make it fair (a readers-writer lock with a turnstile): every test passes the
turnstile before it takes the lock shared, and a test marked ``alone`` holds the turnstile
while it waits for the lock, so no new test starts meanwhile and it gets the machine as soon
as the tests already running end. Without xdist (one process) nothing is locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

import pytest

__all__ = ["pytest_runtest_protocol"]


def _lock_dir() -> Path | None:
    """A directory shared by the workers of this run; None when the run has no workers."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        return None
    path = Path(tempfile.gettempdir()) / f"mantle-tests-{run}"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def _flock(path: Path, mode: int):
    with open(path, "a") as handle:
        fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _turn(alone: bool):
    locks = _lock_dir()
    if locks is None:
        yield
        return
    turnstile, machine = locks / "turnstile", locks / "machine"
    if alone:
        with _flock(turnstile, fcntl.LOCK_EX), _flock(machine, fcntl.LOCK_EX):
            yield
        return
    with _flock(turnstile, fcntl.LOCK_EX):
        pass
    with _flock(machine, fcntl.LOCK_SH):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Around the whole test: its fixtures' setup and teardown count too."""
    with _turn(item.get_closest_marker("alone") is not None):
        yield
