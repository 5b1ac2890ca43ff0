"""``mantle serve``: startup (SPEC 10.2), signals and graceful shutdown (10.3), systemd (10.4).

This is the composition root: the one place that wires the engine (``actors``), the REST API
(``web``), the cron scheduler and the HTTP listener together.

Threads: the main thread starts everything, then only waits for signals; the shutdown runs
on a thread of its own so that the main thread can turn a second signal into "jump to the
deadline" (a signal handler itself only records the signal: it may interrupt the main thread
anywhere, even inside a lock the engine needs).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from mantle.config import Config
from mantle.daemon.http import HttpServer
from mantle.daemon.notify import Notifier, Watchdog, watchdog_interval
from mantle.daemon.readiness import Readiness
from mantle.daemon.retention import RetentionSweeper
from mantle.db import migrations
from mantle.db.connect import database_failure
from mantle.metrics import Metrics
from mantle.retention import retention_from

__all__ = ["Daemon", "HURRY", "Signals", "SWITCH_INTERVAL"]

log = logging.getLogger("mantle.server")

# The daemon is a pipeline of threads handing work to each other (HTTP worker -> journal ->
# Supervisor -> Execution actor -> journal ...). CPython's switch interval (how long a thread
# waiting for the GIL lets the running one keep it) stays at its 5 ms default, set here so
# that the figures in bench/README.md do not depend on the interpreter's: 0.5 ms, which the
# first milestone used, forced a switch at every hand-off and cost 15-30 % more CPU per
# execution once the hand-offs had become few (interleaved runs, bench/README.md item 19).
SWITCH_INTERVAL = 0.005
# After ``shutdown_timeout``, the most the rest of a shutdown may take (docs/systemd.md: 30 s
# + 8 s stays inside the shipped unit's TimeoutStopSec=45 with 7 s to spare).
STOP_MARGIN = 8.0
# What a ``serve --workers`` parent sends its workers for a second SIGTERM/SIGINT.
HURRY = signal.SIGUSR1


class Signals:
    """Counts SIGTERM/SIGINT; the handlers only record (see the module docstring).

    ``hurry``: skip the rest of the grace period. Without a ``hurry`` signal a second stop
    signal says so. A ``serve --workers`` worker has one (HURRY): systemd's stop sends
    SIGTERM to every process of the service, so the parent's relay of it is the worker's
    second SIGTERM, not an operator's second request."""

    def __init__(self):
        self.count = 0
        self.hurry = False
        self.arrived = threading.Event()
        self._hurry_signal: int | None = None  # the one installed, if any

    def install(self, signals=(signal.SIGTERM, signal.SIGINT), hurry=None) -> Signals:
        self._hurry_signal = hurry
        for sig in signals:
            signal.signal(sig, self._handle)
        if hurry is not None:
            signal.signal(hurry, self._hurry)
        return self

    def _handle(self, *_args) -> None:
        self.count += 1
        if self.count > 1 and self._hurry_signal is None:
            self.hurry = True
        self.arrived.set()

    def _hurry(self, *_args) -> None:
        self.hurry = True
        self.arrived.set()


class Daemon:
    """One run of ``mantle serve`` on an already connected ``database``."""

    def __init__(self, config: Config, database, *, threads: int = 8,
                 shutdown_timeout: float = 30.0, kind: str = "serve", listener=None,
                 heartbeat=None, sweeps: bool = True):
        """``listener`` and ``heartbeat`` are given to a ``serve --workers`` worker: the
        parent's listening socket, and where to say "ready" and "alive" instead of systemd
        (``mantle.daemon.arbiter``), which also says whether that parent is gone (the
        worker then shuts down on its own). ``sweeps``: whether this process runs the
        retention sweep (one worker of several does)."""
        self._config = config
        self._database = database
        self._threads = threads
        self._timeout = shutdown_timeout
        self._signals = Signals()
        self._notifier = Notifier()
        self._hurry = threading.Event()
        self._engine = None
        self._api = None  # web.app.ApiRuntime
        self._http: HttpServer | None = None
        self._scheduler = None
        self._retention = None
        self._checkpoints = None  # mantle.services.checkpoints.WalCheckpointer (SQLite)
        self._watchdog: Watchdog | None = None
        self._readiness = Readiness(database)
        self._kind = kind
        self._listener = listener
        self._heartbeat = heartbeat
        self._sweeps = sweeps

    def run(self) -> int:
        """Start, serve until a signal, shut down; the exit code. Startup failures raise."""
        sys.setswitchinterval(SWITCH_INTERVAL)
        if self._heartbeat is not None:  # the parent relays SIGTERM and sends HURRY
            self._signals.install((signal.SIGTERM,), hurry=HURRY)
        else:
            self._signals.install((signal.SIGTERM, signal.SIGINT))
        self._start()
        while not self._signals.arrived.wait(0.5):
            if self._heartbeat is not None and self._heartbeat.parent_gone():
                log.error("parent process gone; shutting down")
                break
        signalled_at = time.monotonic()
        stopper = threading.Thread(target=self._shutdown, args=(signalled_at + self._timeout,),
                                   name="mantle-shutdown")
        stopper.daemon = True
        stopper.start()
        hurried = False
        overrun_at = signalled_at + self._timeout + STOP_MARGIN
        while stopper.is_alive():
            stopper.join(0.05)
            if self._signals.hurry and not hurried:
                hurried = True
                self._jump_to_deadline()
            if time.monotonic() > overrun_at:
                # Something hangs (a database that does not answer while the last writes are
                # flushed): leave anyway, inside systemd's TimeoutStopSec. What is still
                # running stays so in the database and is resumed by the next start.
                log.error("shutdown overran; exiting", extra={"seconds": STOP_MARGIN})
                logging.shutdown()
                os._exit(0)
        self._database.close()  # the main thread's connection (migrations, startup)
        log.info("server stopped")
        return 0

    # --- startup (10.2) ---

    def _start(self) -> None:
        from actors.engine import Engine
        from mantle.services.checkpoints import WalCheckpointer
        from mantle.services.scheduler import Scheduler
        from web.app import ApiRuntime, create_app
        from web.settings import ApiSettings

        # The CLI wraps every command in database_failure too, but a ``serve --workers``
        # worker must say it here: the arbiter's fork catches MantleError before that wrap.
        with database_failure():
            migrations.migrate(self._database)
        log.info("migrations complete")
        config = self._config
        metrics = Metrics()
        self._readiness.start()
        # Before the engine: its connections leave checkpoints to this thread.
        self._checkpoints = WalCheckpointer.for_database(self._database)
        if self._checkpoints is not None:
            self._checkpoints.start()
        with database_failure():  # its first write: the node's row
            self._engine = Engine(self._database, metrics=metrics,
                                  plugins_dir=config.plugins_dir, env=config.env,
                                  resume_orphans=True, kind=self._kind,
                                  lease_ttl=config.lease_ttl_seconds,
                                  max_depth=config.max_depth).start()
        self._readiness.watch(self._engine.problem)
        settings = ApiSettings.from_config(config)
        self._api = ApiRuntime(self._database, settings)
        app = create_app(self._engine, metrics, self._database, self._readiness, self._api)
        # Event streams hold a worker each while open: they get workers of their own.
        self._http = HttpServer(app, config.api_address, self._threads,
                                streams=settings.max_event_streams)
        try:
            address = self._http.bind(self._listener)
        except Exception:
            self._engine.shutdown(timeout=0)
            raise
        log.info("server listening", extra={"address": address})
        self._scheduler = Scheduler(self._engine, self._database).start()
        if self._sweeps:
            self._retention = RetentionSweeper(retention_from(config), metrics,
                                               self._database).start()
        self._readiness.mark_ready()
        notifier, interval = self._notifier, watchdog_interval()
        if self._heartbeat is not None:
            notifier, interval = self._heartbeat, self._heartbeat.interval
        notifier.notify("READY=1")
        if notifier.enabled and interval:
            engine = self._engine
            self._watchdog = Watchdog(notifier, interval,
                                      lambda: engine.responsive(timeout=min(2.0, interval)))
            self._watchdog.start()

    # --- shutdown (10.3) ---

    def _shutdown(self, deadline: float) -> None:
        """Runs on the shutdown thread; ``deadline`` is monotonic.

        The engine stops starting executions and steps first, at once (10.3 step 3); only
        then is HTTP drained (a run that arrives meanwhile answers 503). The worst case after
        the signal is ``shutdown_timeout`` + Engine.STOP_GRACE + HTTP_STOP_GRACE
        (docs/systemd.md has the arithmetic against the unit's TimeoutStopSec).
        """
        log.info("shutting down")
        if self._watchdog is not None:
            self._watchdog.shutting_down()
        self._notifier.notify("STOPPING=1")
        if self._heartbeat is not None:  # the parent starts a successor if it goes on
            self._heartbeat.notify("STOPPING=1")
        self._readiness.mark_stopping()
        self._engine.stop_starting(deadline)
        self._scheduler.stop()
        if self._retention is not None:
            self._retention.stop()
        self._http.close_listener()
        self._api.close()  # event streams end, so that requests in flight can finish
        self._http.wait_idle(deadline, self._hurry)
        left = 0.0 if self._hurry.is_set() else max(0.0, deadline - time.monotonic())
        self._engine.shutdown(timeout=left)
        # Open connections were served while running steps finished (a run got 503); a
        # request begun on one meanwhile is answered before the connections close.
        self._http.wait_idle(deadline, self._hurry)
        if self._checkpoints is not None:
            self._checkpoints.stop()
        self._http.stop()
        self._readiness.stop()
        if self._watchdog is not None:
            self._watchdog.stop()

    def _jump_to_deadline(self) -> None:
        """Second signal: interrupt running attempts now (their rows stay for resume)."""
        self._hurry.set()
        try:
            self._engine.stop_now()
        except Exception:  # the engine already stopped on its own
            pass
