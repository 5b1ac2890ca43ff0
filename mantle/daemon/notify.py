"""systemd notifications (SPEC 10.4): ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``.

The protocol is one datagram per message on the unix socket named by ``NOTIFY_SOCKET`` (a
path, or an abstract socket when it starts with ``@``); no systemd library is needed.
Without ``NOTIFY_SOCKET`` nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "Watchdog", "watchdog_interval"]

log = logging.getLogger("mantle.systemd")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or ""
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send one message; False (and a debug log) when it cannot be delivered."""
        if self._address is None:
            return False
        try:
            with self._lock, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode("utf-8"), self._address)
            return True
        except OSError as exc:
            log.debug("systemd notification failed", extra={"error": str(exc)})
            return False


def watchdog_interval(environ: Mapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` messages (half of ``WATCHDOG_USEC``), or None when the
    watchdog is off or meant for another process (``WATCHDOG_PID``)."""
    environ = os.environ if environ is None else environ
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid if pid is not None else os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC") or 0)
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


class Watchdog:
    """Sends ``WATCHDOG=1`` every ``interval`` seconds while ``alive()`` says the engine
    answers; a stuck Supervisor therefore lets systemd's watchdog expire."""

    def __init__(self, notifier: Notifier, interval: float, alive: Callable[[], bool]):
        self._notifier = notifier
        self._interval = interval
        self._alive = alive
        self._stopping = threading.Event()
        self._shutting_down = False
        self._thread = threading.Thread(target=self._loop, name="mantle-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def shutting_down(self) -> None:
        """From now on notify without asking the engine: it is being stopped on purpose, and
        the shutdown's own deadline (plus its hard exit) bounds how long that takes."""
        self._shutting_down = True

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _loop(self) -> None:
        """Runs on the watchdog thread."""
        was_alive = True
        while True:
            try:
                alive = self._shutting_down or self._alive()
            except Exception:  # the engine is gone (e.g. stopped): not alive
                alive = self._shutting_down
            if self._stopping.is_set():
                return
            if alive:
                self._notifier.notify("WATCHDOG=1")
            elif was_alive:  # once per streak, not every interval
                log.warning("engine not responding; watchdog notification withheld")
            was_alive = alive
            if self._stopping.wait(self._interval):
                return
