"""``mantle serve``: the daemon that runs the REST API, webhooks, cron and resumption.

``Daemon(config, database, threads=..., shutdown_timeout=...).run()`` is the whole lifecycle
(SPEC 10); the pieces are ``HttpServer`` (waitress), ``Readiness`` (``/readyz``) and the
systemd ``Notifier``/``Watchdog``.
"""

from mantle.daemon.daemon import Daemon
from mantle.daemon.http import HttpServer, ListenError
from mantle.daemon.notify import Notifier, Watchdog, watchdog_interval
from mantle.daemon.readiness import Readiness

__all__ = ["Daemon", "HttpServer", "ListenError", "Notifier", "Watchdog", "watchdog_interval",
           "Readiness"]
