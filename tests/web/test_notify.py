"""systemd notifications over real unix datagram sockets (SPEC 10.4)."""

from __future__ import annotations

import os
import socket
import uuid

from mantle.daemon.notify import Notifier, Watchdog, watchdog_interval


def _listen(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notifications_reach_a_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with _listen(path) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": path})
        assert notifier.enabled
        assert notifier.notify("READY=1")
        assert sock.recv(64) == b"READY=1"


def test_notifications_reach_an_abstract_socket():
    name = f"mantle-test-{uuid.uuid4().hex}"
    with _listen("\0" + name) as sock:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify("STOPPING=1")
        assert sock.recv(64) == b"STOPPING=1"


def test_without_notify_socket_nothing_is_sent_and_a_dead_socket_is_not_an_error(tmp_path):
    assert not Notifier({}).enabled
    assert Notifier({}).notify("READY=1") is False
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")}).notify("READY=1") is False


def test_the_watchdog_interval_is_half_of_watchdog_usec_for_this_process():
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}, pid) \
        == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid) is None
    assert watchdog_interval({}, pid) is None
    assert watchdog_interval({"WATCHDOG_USEC": "zero"}, pid) is None


def test_the_watchdog_pings_only_while_the_engine_answers(tmp_path):
    path = str(tmp_path / "watchdog.sock")
    answers = [True, False, True]
    with _listen(path) as sock:
        watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path}), 0.01,
                            lambda: answers.pop(0) if answers else False).start()
        try:
            assert sock.recv(64) == b"WATCHDOG=1"
            assert sock.recv(64) == b"WATCHDOG=1"
        finally:
            watchdog.stop()
        assert answers == []
        sock.settimeout(0.2)
        try:
            extra = sock.recv(64)
        except socket.timeout:
            extra = None
        assert extra is None


def test_during_shutdown_the_watchdog_pings_without_asking_the_stopping_engine(tmp_path,
                                                                                caplog):
    path = str(tmp_path / "watchdog.sock")
    asked = []
    with _listen(path) as sock:
        watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path}), 0.01,
                            lambda: asked.append(1) or False)
        watchdog.shutting_down()
        watchdog.start()
        try:
            assert sock.recv(64) == b"WATCHDOG=1"
            assert sock.recv(64) == b"WATCHDOG=1"
        finally:
            watchdog.stop()
    assert asked == []
    assert "engine not responding" not in caplog.text
