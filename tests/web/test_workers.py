"""``mantle serve --workers N`` (SPEC 13.7): pre-forked workers on one port, supervised by a
parent that restarts them, relays SIGTERM, and speaks to systemd once for all."""

from __future__ import annotations

import os
import select
import signal
import socket
import sqlite3
import subprocess
import time
from collections import Counter

from mantle.daemon.arbiter import SILENT_AFTER, Arbiter, _Worker
from mantle.db.fields import utcnow
from mantle.db.models import Node, StepExecution, WorkflowExecution
from tests.web.support import Daemon, apply_yaml, call, cli, wait_until


# Answers the mask of signals it ignores (/proc/PID/status SigIgn, hexadecimal).
_SIGNALS_PLUGIN = r"""#!/bin/sh
cat >/dev/null
printf '{"mask": "%s"}\n' "$(awk '/^SigIgn/ {print $2}' /proc/$$/status)"
"""


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


class _Systemd:
    """A NOTIFY_SOCKET that keeps every message it gets."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(256).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def close(self) -> None:
        self.sock.close()


def test_workers_serve_one_port_as_separate_nodes_and_tell_systemd_once(tmp_path, sqlite_url):
    apply_yaml("""
        name: hello
        steps: [{name: say, action: core/log, params: {message: hi}}]
    """)
    apply_yaml("""
        name: signals
        steps: [{name: ignored, action: probe/act}]
    """)
    plugin = tmp_path / ".mantle" / "plugins" / "probe"
    plugin.parent.mkdir(parents=True)
    plugin.write_text(_SIGNALS_PLUGIN)
    plugin.chmod(0o755)
    systemd = _Systemd(str(tmp_path / "notify.sock"))
    daemon = Daemon(tmp_path, sqlite_url, args=("--workers", "3"),
                    env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "400000"})
    daemon.start()
    try:
        workers = wait_until(lambda: len(_children(daemon.process.pid)) == 3
                             and _children(daemon.process.pid), timeout=30)
        wait_until(lambda: "READY=1" in systemd.read(), timeout=30)
        wait_until(lambda: systemd.read().count("WATCHDOG=1") >= 3, timeout=10)
        nodes = {row.pid: row.kind for row in Node.select()}
        assert all(nodes.get(pid) == "worker" for pid in workers), nodes
        replies = [daemon.post("/api/v1/run/hello", {}) for _ in range(12)]
        for reply in replies:
            daemon.wait_for_status(reply.json["execution_id"], ("completed",))
        # a plugin starts with the signal dispositions of any program: workers ignored
        # SIGINT (the terminal's Ctrl-C is for the parent), and their plugins inherited that
        probe = daemon.post("/api/v1/run/signals", {}).json["execution_id"]
        detail = daemon.wait_for_status(probe, ("completed",))
        mask = int(detail["steps"][0]["output"]["mask"], 16)
        assert not mask & (1 << (signal.SIGINT - 1)), f"the plugin ignores SIGINT: {mask:x}"
        # X-Mantle-Node names the worker that answered: the owner of the run it accepted
        worker_nodes = {row.id for row in Node.select() if row.pid in workers}
        for reply in replies:
            node = reply.headers["x-mantle-node"]
            assert node in worker_nodes
            assert WorkflowExecution.get_by_id(reply.json["execution_id"]).owner == node
    finally:
        assert daemon.stop() == 0
    messages = systemd.read()
    systemd.close()
    assert messages.count("READY=1") == 1
    assert messages.count("STOPPING=1") == 1
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in workers)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_a_worker_that_dies_is_restarted_and_its_executions_go_on(tmp_path, sqlite_url):
    apply_yaml("""
        name: napping
        steps:
          - {name: nap, action: core/sleep, params: {duration: 2s}}
          - {name: after, action: core/log, depends_on: [nap], params: {message: done}}
    """)
    daemon = Daemon(tmp_path, sqlite_url, args=("--workers", "2")).start()
    try:
        before = wait_until(lambda: len(_children(daemon.process.pid)) == 2
                            and _children(daemon.process.pid), timeout=30)
        ids = [daemon.post("/api/v1/run/napping", {}).json["execution_id"] for _ in range(10)]
        wait_until(lambda: StepExecution.select().where(
            StepExecution.execution_id.in_(ids), StepExecution.status == "running"
        ).count() == len(ids))
        owners = Counter(WorkflowExecution.get_by_id(i).owner for i in ids)
        victim_node = owners.most_common(1)[0][0]
        victim = Node.get_by_id(victim_node).pid
        os.kill(victim, signal.SIGKILL)
        daemon.wait_for_log("worker exited", pid=victim)
        wait_until(lambda: len(_children(daemon.process.pid)) == 2
                   and victim not in _children(daemon.process.pid), timeout=30)
        for execution_id in ids:
            daemon.wait_for_status(execution_id, ("completed",), timeout=30)
        after = _children(daemon.process.pid)
    finally:
        assert daemon.stop() == 0
    assert len(set(after) - set(before)) == 1
    assert victim_node not in {WorkflowExecution.get_by_id(i).owner for i in ids}


def _two_workers_running(tmp_path, sqlite_url, nap: str, shutdown_timeout: str):
    """``serve --workers 2`` with one execution of a step sleeping ``nap`` running; returns
    (the daemon, its workers' pids, the execution's id)."""
    apply_yaml(f"""
        name: nap
        steps: [{{name: nap, action: core/sleep, params: {{duration: {nap}}}}}]
    """)
    daemon = Daemon(tmp_path, sqlite_url, args=("--workers", "2",
                                                "--shutdown-timeout", shutdown_timeout)).start()
    workers = wait_until(lambda: len(_children(daemon.process.pid)) == 2
                         and _children(daemon.process.pid), timeout=30)
    execution_id = daemon.post("/api/v1/run/nap", {}).json["execution_id"]
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id == execution_id, StepExecution.status == "running").exists())
    return daemon, workers, execution_id


def test_sigterm_to_the_parent_stops_every_worker_gracefully(tmp_path, sqlite_url):
    """As ``systemctl stop`` with the shipped unit (KillMode=control-group) does it: SIGTERM
    to the parent and to every worker at once. A worker got two SIGTERMs (systemd's and the
    parent's relay), took the second for an impatient operator's and skipped the grace
    period: running steps were interrupted at once, to run again at the next start."""
    daemon, workers, execution_id = _two_workers_running(tmp_path, sqlite_url, "1s", "10s")
    started = time.monotonic()
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    daemon.send(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert time.monotonic() - started < 10
    assert WorkflowExecution.get_by_id(execution_id).status == "completed"  # it had time
    assert daemon.messages().count("server stopped") == 3  # two workers and the parent
    assert all(_zombie(pid) for pid in workers)


def test_a_worker_stopped_on_its_own_is_replaced_at_once_and_its_slot_stays_served(
        tmp_path, sqlite_url):
    """A SIGTERM to one worker (an operator recycling it) let it drain for up to its
    shutdown timeout while the socket of its slot, which the parent keeps for the worker's
    successor, went on taking its share of new connections: nobody accepted them, not even
    ``/healthz``, until the worker had exited and its successor had started. A worker that
    begins to stop on its own now tells the parent, which starts the successor at once."""
    daemon, workers, execution_id = _two_workers_running(tmp_path, sqlite_url, "60s", "20s")
    owner = Node.get_by_id(WorkflowExecution.get_by_id(execution_id).owner).pid
    os.kill(owner, signal.SIGTERM)
    wait_until(lambda: daemon.messages().count("server listening") == 4, timeout=5,
               message="no successor while the stopped worker drains")  # parent + 3 workers
    assert len(_children(daemon.process.pid)) == 3 and owner in _children(daemon.process.pid)
    for _ in range(12):  # new connections, spread by the kernel over both slots
        assert call(daemon.url, "GET", "/healthz", timeout=2).status == 200
    assert WorkflowExecution.get_by_id(execution_id).status == "running"  # still draining
    daemon.send(signal.SIGTERM)
    wait_until(lambda: daemon.messages().count("shutting down") == 4)
    daemon.send(signal.SIGTERM)  # the second: every worker skips the rest of its grace
    assert daemon.wait(30) == 0
    assert "worker exited" not in daemon.messages()  # replaced, not dead


def test_after_sigterm_new_connections_are_refused_while_the_workers_drain(tmp_path,
                                                                          sqlite_url):
    """10.3 step 2 with workers: the listener closes, so a client (or a load balancer) is
    refused at once instead of waiting in a backlog nobody accepts from any more; then a
    second signal (10.3 step 4) reaches the workers through the parent."""
    daemon, _, execution_id = _two_workers_running(tmp_path, sqlite_url, "6s", "20s")
    daemon.send(signal.SIGTERM)
    wait_until(lambda: daemon.messages().count("shutting down") == 3)  # the parent and both
    refused = []

    def connect_refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", daemon.port), 1).close()
        except ConnectionRefusedError:
            refused.append(True)
        return len(refused) >= 10  # every socket of the port, not just one of them

    wait_until(connect_refused, timeout=5,
               message="connections are still accepted during the shutdown")
    assert WorkflowExecution.get_by_id(execution_id).status == "running"  # still draining
    # a second signal to the parent: the workers skip the rest of the grace period
    daemon.send(signal.SIGTERM)
    hurried = time.monotonic()
    assert daemon.wait(30) == 0
    assert time.monotonic() - hurried < 5
    assert WorkflowExecution.get_by_id(execution_id).status == "running"  # for the next start


def test_workers_whose_parent_was_killed_shut_down(tmp_path, sqlite_url):
    """Nobody would restart them or forward a SIGTERM to them any more: they shut down as on
    SIGTERM (their executions stay for the next start) instead of serving the port and
    owning their executions for good."""
    daemon, workers, execution_id = _two_workers_running(tmp_path, sqlite_url, "60s", "1s")
    daemon.send(signal.SIGKILL)
    daemon.process.wait(10)
    try:
        wait_until(lambda: all(_zombie(pid) for pid in workers), timeout=15,
                   message="the workers outlived their parent")
    finally:
        for pid in workers:
            if not _zombie(pid):
                os.kill(pid, signal.SIGKILL)
    wait_until(lambda: daemon.messages().count("server stopped") == 2)
    assert daemon.messages().count("parent process gone; shutting down") == 2
    execution = WorkflowExecution.get_by_id(execution_id)
    assert execution.status == "running"  # for the next start to resume
    assert Node.get_by_id(execution.owner).lease_expires_at <= utcnow()  # ended, not lapsing


def test_a_signal_while_the_workers_start_sends_no_ready_after_stopping(tmp_path, sqlite_url):
    """Workers held up in their startup (here by a write lock held elsewhere) finish it, say
    ready and stop: the parent, already stopping, must not tell systemd READY=1 then."""
    systemd = _Systemd(str(tmp_path / "notify.sock"))
    lock = sqlite3.connect(sqlite_url.split("sqlite:///", 1)[1], isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        daemon = Daemon(tmp_path, sqlite_url, args=("--workers", "2"),
                        env={"NOTIFY_SOCKET": systemd.path}).start(ready=False)
        # each worker logs it after installing its signal handler, before its engine starts
        wait_until(lambda: daemon.messages().count("migrations complete") == 3, timeout=30)
        daemon.send(signal.SIGTERM)
        wait_until(lambda: "STOPPING=1" in systemd.read())
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert daemon.wait(30) == 0
    wait_until(lambda: daemon.messages().count("server stopped") == 3)  # every worker started
    messages = systemd.read()
    systemd.close()
    assert messages == ["STOPPING=1"]


def _handles(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig``."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            caught = next(line for line in handle if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & (1 << (sig - 1)))


def test_a_sigterm_that_comes_while_the_workers_are_forked_reaches_every_one(tmp_path,
                                                                            sqlite_url):
    """A signal reaching a worker in the moment after its fork ran the parent's handler in
    the worker and was lost there: that worker served on (resuming executions) until the
    parent killed it shutdown_timeout + 10 s later. The moment is short, so a few tries
    (each one hit it about one time in three)."""
    for attempt in range(6):
        daemon = Daemon(tmp_path, sqlite_url, args=("--workers", "4",
                                                    "--shutdown-timeout", "1s"))
        daemon.start(ready=False)
        # the parent's handlers are in place: it forks its workers now
        wait_until(lambda: _handles(daemon.process.pid, signal.SIGCHLD), timeout=30,
                   interval=0.001)
        daemon.send(signal.SIGTERM)
        signalled = time.monotonic()
        assert daemon.wait(30) == 0
        assert time.monotonic() - signalled < 8, \
            f"try {attempt}: a worker missed the SIGTERM: {daemon.output()}"


def test_workers_on_a_port_another_server_listens_on_exit_1(tmp_path, sqlite_url):
    """SPEC 10.2 step 5 as for one process: the workers' sockets share their port with each
    other (SO_REUSEPORT), never with a server already there (another mantle, whose clients
    would silently be split between the two)."""
    first = Daemon(tmp_path, sqlite_url, args=("--workers", "2")).start()
    try:
        address = f"127.0.0.1:{first.port}"
        second = cli(tmp_path, sqlite_url, "serve", "--workers", "2", "--api-address", address,
                     timeout=20)
        assert second.returncode == 1
        assert second.stderr == f"Error: cannot listen on {address}: Address already in use\n"
        with socket.socket() as taken:  # and no other server's socket, bound or listening
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            third = cli(tmp_path, sqlite_url, "serve", "--workers", "2", "--api-address",
                        address, timeout=20)
        assert (third.returncode, third.stderr) == \
            (1, f"Error: cannot listen on {address}: Address already in use\n")
    finally:
        assert first.stop() == 0


def _has_open(pid: int, name: str) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name)
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_a_sigterm_while_the_parent_migrates_ends_it_with_exit_0(tmp_path):
    """SPEC 10.3 as for one process, whose handlers are in place before it migrates: the
    parent finishes migrating, starts no worker, and exits 0 (the signal killed it)."""
    path = tmp_path / "fresh.db"
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the migrations wait for it
    try:
        daemon = Daemon(tmp_path, f"sqlite:///{path}", args=("--workers", "2"))
        daemon.start(ready=False)
        wait_until(lambda: _has_open(daemon.process.pid, "fresh.db"), timeout=30)
        daemon.send(signal.SIGTERM)  # pending at once, whenever the parent gets to it
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert daemon.wait(30) == 0, daemon.output()
    assert _children(daemon.process.pid) == []
    assert daemon.messages()[-1] == "server stopped"
    assert "migrations complete" in daemon.messages()


def test_the_parent_pings_systemd_every_half_watchdog_period_also_when_it_is_short(
        tmp_path, sqlite_url):
    """The workers said "alive" once a second whatever WatchdogSec was, and the parent pings
    only while every worker spoke within WatchdogSec: with WatchdogSec under about 2 s its
    pings came about once a second or less, and systemd killed a healthy service."""
    systemd = _Systemd(str(tmp_path / "notify.sock"))
    daemon = Daemon(tmp_path, sqlite_url, args=("--workers", "3"),
                    env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "400000"}).start()
    try:
        wait_until(lambda: "READY=1" in systemd.read(), timeout=30)
        before = systemd.read().count("WATCHDOG=1")
        started = time.monotonic()
        wait_until(lambda: time.monotonic() - started > 4)
        pings = systemd.read().count("WATCHDOG=1") - before
    finally:
        assert daemon.stop() == 0
        systemd.close()
    assert pings >= 12, f"{pings} WATCHDOG=1 in 4 s, with WatchdogSec=0.4s (20 are due)"


def test_a_worker_whose_startup_hangs_is_killed_like_a_silent_one():
    """Only workers that had said ready were watched: one whose startup hung (stopped, or
    waiting on a lock for good) was never killed or restarted, no READY=1 or WATCHDOG=1 went
    to systemd, and the connections the kernel queued on its slot's socket were never
    accepted. Its silence counts from its fork; one that just started is left alone."""
    arbiter = Arbiter(None, None, workers=2, threads=1, shutdown_timeout=1.0)
    hung, starting = (subprocess.Popen(["sleep", "30"]) for _ in range(2))
    try:
        now = time.monotonic()
        arbiter._workers = {hung.pid: _Worker(0, hung.pid, -1, heard_at=now - SILENT_AFTER - 1),
                            starting.pid: _Worker(1, starting.pid, -1, heard_at=now - 1)}
        arbiter._kill_silent(now)
        assert hung.wait(2) == -signal.SIGKILL
        assert starting.poll() is None
    finally:
        for process in (hung, starting):
            process.kill()
            process.wait()


def test_a_worker_that_cannot_be_forked_is_tried_again_instead_of_ending_the_server(
        monkeypatch, caplog):
    """A restart whose fork failed (EAGAIN: the service's TasksMax or the user's process
    limit reached for a moment, or ENOMEM) raised out of the parent's loop: the parent died
    with a traceback and took the whole server down (its other workers shut down without
    it). The slot is tried again a second later, as for a worker that died."""
    arbiter = Arbiter(None, None, workers=2, threads=1, shutdown_timeout=1.0)
    opened = len(os.listdir("/proc/self/fd"))

    def fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", fork)
    arbiter._restart_at = {1: 0.0}
    before = time.monotonic()
    arbiter._reap([])
    assert arbiter._workers == {}
    assert arbiter._restart_at[1] >= before + 1.0  # tried again, not in a tight loop
    assert len(os.listdir("/proc/self/fd")) == opened  # the worker's pipe was closed
    assert "worker could not be started" in caplog.text


def test_workers_take_sqlite_writer_turns_on_lock_files_of_their_own(tmp_path):
    """The parent migrates before it forks, which opens its main thread's ``-writer`` lock
    file (``_WriterTurn``); each worker's main thread inherited that open file, and a flock
    belongs to the open file, not the process: every worker's startup writes (its node row)
    and the parent "held" the turn at once, and one releasing it released it for all."""
    from mantle.db import connect
    from mantle.db.engine import _WriterTurn

    turn = _WriterTurn.of(connect(f"sqlite:///{tmp_path / 'turns.db'}"))
    with turn:  # as the parent's migrations
        pass
    go_read, go_write = os.pipe()
    got_read, got_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: its first write transaction, once the parent holds the turn
        try:
            os.read(go_read, 1)
            with turn:
                os.write(got_write, b"x")
        finally:
            os._exit(0)
    try:
        with turn:
            os.write(go_write, b"x")
            taken_alongside = select.select([got_read], [], [], 0.5)[0]
        assert select.select([got_read], [], [], 5)[0], "the worker never got its turn"
    finally:
        os.waitpid(pid, 0)
        for fd in (go_read, go_write, got_read, got_write):
            os.close(fd)
    assert not taken_alongside, "the worker took the writer turn the parent held"
