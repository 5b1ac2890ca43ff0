"""``mantle serve --workers N`` (SPEC 13.7): a parent that only binds, forks, reaps and relays.

Like gunicorn's arbiter: the parent binds the listening address and migrates the database,
then forks N workers, each a complete daemon (engine, API, cron, its own node and lease).
The parent holds one socket per worker slot, all bound to the one port with SO_REUSEPORT, so
the kernel spreads connections evenly (one socket accepted by all let whichever worker polled
first take nearly every keep-alive connection), and a restarted worker takes over its slot's
socket with the connections waiting in it. The parent starts no thread of its own, so forking
is safe; it waits on one self-pipe for signals and on one pipe per worker for its messages:

- ``R`` (ready): once every worker has said it, the parent sends systemd ``READY=1`` once
  (never after ``STOPPING=1``);
- ``W`` (alive, every second or twice per watchdog period if that is shorter, while the
  worker's engine answers): the parent sends systemd ``WATCHDOG=1`` only while every worker
  has spoken lately, and kills a worker silent for ``SILENT_AFTER`` seconds, also one whose
  startup has not ended that long after its fork (it is then restarted like any dead worker);
- ``S`` (stopping): a worker that shuts down while the parent does not (its own SIGTERM, from
  an operator) is replaced within a second; it drains beside its successor, which serves its slot's
  socket meanwhile (else that socket's share of new connections would wait, unaccepted, for
  the whole grace period);
- ``F`` and a line (failed to start: the ``Error: ...`` line ``mantle serve`` would print),
  a worker's last word: the parent prints the first such line once, when it gives up the
  start (each worker writing its own, the lines of several interleaved on stderr).

A worker that dies is restarted (at most once a second per slot), and a fork that fails
(the service's task limit or memory reached) is tried again as often; its executions are
taken over by its siblings at once (same host, process gone). One that exits (not killed)
before the first ``READY=1`` without having said ready failed the server's start: the parent stops
the others and exits 1, as one process whose start fails does (SPEC 10.2). A worker whose
parent dies shuts down as on SIGTERM. SIGTERM or SIGINT: ``STOPPING=1``, the parent closes
its copies of the sockets (so the port refuses connections once each worker has closed its
own), SIGTERM to every worker (a second signal is passed on as ``HURRY``: the workers jump
to their deadline; a worker takes no SIGTERM for that, as systemd's stop sends one to every
process); the parent exits 0 when all have exited, killing any still alive
``shutdown_timeout`` + ``STOP_MARGIN`` seconds after the first signal. A signal while the
parent migrates stops it once the migrations are done, before any worker starts.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from mantle.daemon.daemon import HURRY
from mantle.daemon.http import format_address, listen
from mantle.daemon.notify import Notifier, watchdog_interval
from mantle.db import migrations
from mantle.db.connect import database_failure
from mantle.errors import MantleError

__all__ = ["Arbiter", "SILENT_AFTER", "STOP_MARGIN"]

log = logging.getLogger("mantle.server")

SILENT_AFTER = 30.0
STOP_MARGIN = 10.0
_RESTART_EVERY = 1.0
# How long after a worker said it stops on its own its successor starts: systemd's stop sends
# SIGTERM to every process of the unit at once, and the parent's own stops it meanwhile.
_SUCCESSOR_AFTER = 0.5
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)  # by the parent


@dataclass
class _Worker:
    slot: int
    pid: int
    pipe: int  # read end of the worker's message pipe
    ready: bool = False
    heard_at: float = field(default_factory=time.monotonic)
    retiring: bool = False  # stopping on its own; a successor has its slot
    failure: bytes | None = None  # what followed ``F``: its start's error line


class _PipeNotifier:
    """What a worker's Watchdog and readiness speak to instead of systemd: the parent.
    ``interval``: how often the worker says it is alive."""

    def __init__(self, fd: int, parent: int, interval: float):
        self._fd = fd
        self._parent = parent
        self.interval = interval
        self.enabled = True

    def parent_gone(self) -> bool:
        """Whether the parent died (SIGKILL, OOM): then nobody restarts this worker or
        forwards a SIGTERM to it any more, so it shuts down on its own."""
        return os.getppid() != self._parent

    def notify(self, message: str) -> bool:
        code = {"READY=1": b"R", "STOPPING=1": b"S"}.get(message, b"W")
        try:
            os.write(self._fd, code)
            return True
        except OSError:  # the parent is gone; the worker will be stopped soon
            return False


class Arbiter:
    def __init__(self, config, context, workers: int, threads: int, shutdown_timeout: float):
        self._config = config
        self._context = context
        self._count = workers
        self._threads = threads
        self._timeout = shutdown_timeout
        self._notifier = Notifier()
        self._workers: dict[int, _Worker] = {}  # pid -> worker
        self._restart_at: dict[int, float] = {}  # slot -> earliest restart
        self._signals: list[int] = []
        self._stopping_since: float | None = None
        self._code = 0  # the exit code
        self._announced_ready = False
        # systemd's WATCHDOG=1 period; the workers speak at least twice in it, so that every
        # one has spoken lately whenever a ping is due
        self._ping_every = watchdog_interval() if self._notifier.enabled else None
        self._alive_every = min(1.0, self._ping_every / 2) if self._ping_every else 1.0

    def run(self) -> int:
        """Bind, migrate, fork the workers and supervise them until a signal; the exit code."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        self._install_signals(wake_write)  # a signal while migrating: stop after it
        sockets = listen(self._config.api_address, self._count)
        database = self._context.database(require_head=False)
        with database_failure():
            migrations.migrate(database)
        log.info("migrations complete")
        self._context.close()  # no connection may cross a fork
        log.info("server listening", extra={
            "address": format_address(sockets[0].getsockname()), "workers": self._count})
        self._handle_signals(sockets)
        if self._stopping_since is None:
            for slot in range(self._count):
                self._spawn(slot, sockets)
        try:
            self._loop(sockets, wake_read)
        finally:
            for sock in sockets:
                sock.close()
        log.info("server stopped")
        return self._code

    # --- the parent's loop ---

    def _install_signals(self, wake_fd: int) -> None:
        def handle(signum, _frame):
            self._signals.append(signum)
            try:
                os.write(wake_fd, b"s")
            except OSError:
                pass

        for sig in _HANDLED:
            signal.signal(sig, handle)

    def _loop(self, sockets: list[socket.socket], wake_fd: int) -> None:
        interval = self._ping_every
        next_ping = time.monotonic()
        while self._workers or self._stopping_since is None:
            pipes = {worker.pipe: worker for worker in self._workers.values()}
            readable, _, _ = select.select([wake_fd, *pipes], [], [], 0.5)
            for fd in readable:
                if fd == wake_fd:
                    os.read(wake_fd, 512)
                else:
                    self._heard(pipes[fd], os.read(fd, 512))
            self._handle_signals(sockets)
            self._reap(sockets)
            now = time.monotonic()
            self._kill_silent(now)
            if interval and now >= next_ping and self._all_alive(now, interval * 2):
                self._notifier.notify("WATCHDOG=1")
                next_ping = now + interval
            if self._stopping_since is not None and \
                    now - self._stopping_since > self._timeout + STOP_MARGIN:
                self._signal_all(signal.SIGKILL)

    def _heard(self, worker: _Worker, data: bytes) -> None:
        worker.heard_at = time.monotonic()
        if worker.failure is not None:  # the rest of its error line
            worker.failure += data
            return
        data, failed, line = data.partition(b"F")
        if failed:
            worker.failure = line
        if b"R" in data and not worker.ready:
            worker.ready = True
            # A worker that was still starting when the signal came says ready, then stops.
            serving = self._serving()
            if not self._announced_ready and self._stopping_since is None and \
                    len(serving) == self._count and all(w.ready for w in serving):
                self._announced_ready = True
                log.info("workers ready", extra={"workers": self._count})
                self._notifier.notify("READY=1")
        if b"S" in data and not worker.retiring and self._stopping_since is None:
            worker.retiring = True
            log.info("worker stopping; starting its successor",
                     extra={"pid": worker.pid, "slot": worker.slot})
            self._restart_at[worker.slot] = time.monotonic() + _SUCCESSOR_AFTER

    def _serving(self) -> list[_Worker]:
        """The workers that hold their slots (not those draining beside a successor)."""
        return [w for w in self._workers.values() if not w.retiring]

    def _handle_signals(self, sockets: list[socket.socket]) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGCHLD:
                continue
            if self._stopping_since is None:
                self._stop(sockets)
            else:
                self._signal_all(HURRY)

    def _stop(self, sockets: list[socket.socket]) -> None:
        self._stopping_since = time.monotonic()
        log.info("shutting down")
        self._notifier.notify("STOPPING=1")
        for sock in sockets:  # no worker starts any more: the listener closes
            sock.close()  # when each worker closes its own copy (10.3 step 2)
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for pid in list(self._workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _reap(self, sockets: list[socket.socket]) -> None:
        while self._workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            self._drain(worker)
            os.close(worker.pipe)
            if self._stopping_since is None and not worker.retiring:
                log.error("worker exited", extra={"pid": pid, "status": _status(status),
                                                  "slot": worker.slot})
                if worker.ready or self._announced_ready or not os.WIFEXITED(status):
                    self._restart_at[worker.slot] = time.monotonic() + _RESTART_EVERY
                else:  # its start failed, so the server's did (SPEC 10.2): exit 1
                    self._code = 1
                    if worker.failure:
                        sys.stderr.write(worker.failure.decode(errors="replace"))
                    self._stop(sockets)
        if self._stopping_since is None:
            now = time.monotonic()
            for slot, when in list(self._restart_at.items()):
                if now >= when:
                    del self._restart_at[slot]
                    self._spawn(slot, sockets)

    def _drain(self, worker: _Worker) -> None:
        """Read what an exited worker wrote last (its error line may not have been read).
        Without waiting: a plugin it started could still hold the pipe open."""
        os.set_blocking(worker.pipe, False)
        try:
            while data := os.read(worker.pipe, 4096):
                self._heard(worker, data)
        except BlockingIOError:
            pass

    def _kill_silent(self, now: float) -> None:
        """Kill a worker silent for SILENT_AFTER: a ready one whose engine stopped answering,
        or one whose startup hangs (it says nothing before ready; heard_at is its fork)."""
        for worker in list(self._workers.values()):
            if now - worker.heard_at > SILENT_AFTER:
                log.error("worker not responding; killing it",
                          extra={"pid": worker.pid, "ready": worker.ready})
                try:
                    os.kill(worker.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                worker.heard_at = now  # once; the reap restarts it

    def _all_alive(self, now: float, within: float) -> bool:
        serving = self._serving()
        return len(serving) == self._count and all(
            w.ready and now - w.heard_at <= within for w in serving)

    # --- a worker ---

    def _spawn(self, slot: int, sockets: list[socket.socket]) -> None:
        """Fork the worker of ``slot``; one that cannot be forked now (the service's task
        limit or memory, for a moment) is tried again like a worker that died."""
        parent = os.getpid()
        pid = None
        read_fd = write_fd = -1
        # A signal reaching the child before it drops the parent's handlers would run the
        # parent's handler there and be lost (the worker would serve on until killed): the
        # signals wait, blocked, until the child's own dispositions are in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
        except OSError as exc:
            log.error("worker could not be started", extra={"slot": slot, "error": str(exc)})
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            self._restart_at[slot] = time.monotonic() + _RESTART_EVERY
            return
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        if pid:
            os.close(write_fd)
            self._workers[pid] = _Worker(slot, pid, read_fd)
            return
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        # The terminal's Ctrl-C reaches the workers too; the parent forwards SIGTERM. Caught,
        # not SIG_IGN: an ignored signal stays ignored across exec, in every plugin.
        signal.signal(signal.SIGINT, _unheeded)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        os.close(read_fd)
        code = 1
        try:
            for index, other in enumerate(sockets):
                if index != slot:
                    other.close()  # only the parent keeps every slot's socket
            heartbeat = _PipeNotifier(write_fd, parent, self._alive_every)
            code = self._work(sockets[slot], heartbeat, sweeps=slot == 0)
        except MantleError as exc:  # a startup failure: the parent says it as ``serve`` does
            try:
                os.write(write_fd, f"FError: {exc}\n".encode())
            except OSError:  # the parent is gone
                pass
        except BaseException:  # never let a worker return into the parent's loop
            logging.getLogger("mantle.server").exception("worker failed")
        finally:
            logging.shutdown()
            os._exit(code)

    def _work(self, sock: socket.socket, heartbeat: _PipeNotifier, sweeps: bool) -> int:
        """Runs in the forked worker: a full daemon on the inherited socket."""
        from mantle.daemon.daemon import Daemon
        from mantle.logs import setup_logging

        os.environ.pop("NOTIFY_SOCKET", None)  # only the parent speaks to systemd
        setup_logging(self._config.log_level, sys.stdout, background=True)
        database = self._context.database(require_head=False)
        return Daemon(self._config, database, threads=self._threads,
                      shutdown_timeout=self._timeout, kind="worker", listener=sock,
                      heartbeat=heartbeat, sweeps=sweeps).run()


def _unheeded(_signum, _frame) -> None:
    """A worker's SIGINT handler."""


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"
