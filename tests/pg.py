"""A throw-away PostgreSQL 15 cluster for the test session.

The cluster lives in a fresh directory in /dev/shm (else the temp dir), listens on a free port of
127.0.0.1 with trust authentication and ``fsync=off``, and is stopped with ``pg_ctl stop -m
immediate``. PostgreSQL refuses to run as root, so when the tests run as root the server runs as
the ``postgres`` system user (the data directory is created for it); otherwise as the current
user.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import psycopg
import pytest

__all__ = ["PG_BIN", "PgCluster", "PgUnavailable", "find_pg_bin"]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"
_SERVER_SETTINGS = ("-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                    "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")


class PgUnavailable(RuntimeError):
    """The cluster cannot be started on this machine (binaries or service user missing)."""


def find_pg_bin() -> Path:
    """The PostgreSQL 15 binary directory; PgUnavailable (with the reason) when it is missing."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).is_file():
            raise PgUnavailable(f"{PG_BIN / tool} not found (install postgresql-15)")
    return PG_BIN


def _scratch_dir() -> str | None:
    """/dev/shm when it is a writable tmpfs: cloning a database per test is disk-bound."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return str(shm)
    return None  # the system temp dir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgCluster:
    """initdb + pg_ctl around one data directory; ``url`` is the superuser's ``postgres`` DB."""

    def __init__(self, bin_dir: Path | None = None):
        self.bin_dir = bin_dir or find_pg_bin()
        self._account = self._service_account()
        self.root = Path(tempfile.mkdtemp(prefix="mantle-pg-", dir=_scratch_dir()))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_file = self.root / "server.log"
        self.host = "127.0.0.1"
        self.port = 0
        self._names = itertools.count(1)
        self._lock = threading.Lock()

    # --- lifecycle ---

    def start(self) -> "PgCluster":
        """initdb and start the server; on failure nothing is left running or on disk."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "PgCluster":
        self.socket_dir.mkdir()
        self.log_file.touch()
        if self._account is not None:
            uid, gid = self._account
            for path in (self.root, self.socket_dir, self.log_file):
                os.chown(path, uid, gid)
        self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        # The port can be taken between probing and binding; a second try picks another.
        for attempt in range(2):
            self.port = _free_port()
            options = f"-p {self.port} -k {self.socket_dir} {_SERVER_SETTINGS}"
            try:
                self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir),
                          "-l", str(self.log_file), "-o", options)
                return self
            except PgUnavailable:
                if attempt:
                    raise
        return self

    def stop(self) -> None:
        """Stop the server at once and delete its directory."""
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.data_dir))
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- databases ---

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def new_name(self, prefix: str = "t") -> str:
        with self._lock:
            return f"{prefix}_{os.getpid()}_{next(self._names)}"

    def create_database(self, name: str | None = None, template: str = "template0") -> str:
        """CREATE DATABASE (a copy of ``template``); returns its URL."""
        name = name or self.new_name()
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE, disconnecting whoever is still connected (tests may leak threads)."""
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def execute(self, sql: str) -> None:
        """Run one statement as superuser on the ``postgres`` database, outside a transaction."""
        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    # --- helpers ---

    @staticmethod
    def _service_account() -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise PgUnavailable("running as root but there is no 'postgres' system user "
                                "to run the server as") from None
        return entry.pw_uid, entry.pw_gid

    def _run(self, tool: str, *args: str) -> None:
        env = {"PATH": f"{self.bin_dir}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C",
               "HOME": str(self.root), "TZ": "UTC"}
        extra = {}
        if self._account is not None:
            uid, gid = self._account
            extra = {"user": uid, "group": gid, "extra_groups": []}
        result = subprocess.run([str(self.bin_dir / tool), *args], cwd=self.root, env=env,
                                capture_output=True, text=True, timeout=120, **extra)
        if result.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-2000:] \
                if self.log_file.exists() else ""
            raise PgUnavailable(f"{tool} failed ({result.returncode}): "
                                f"{result.stderr.strip() or result.stdout.strip()}\n{log}")


class PausableCluster(PgCluster):
    """A cluster that can be stopped and started again on the same port and data."""

    def pause(self) -> None:
        self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data_dir))

    def resume(self) -> None:
        options = f"-p {self.port} -k {self.socket_dir} {_SERVER_SETTINGS}"
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir),
                  "-l", str(self.log_file), "-o", options)


def started_or_skip(cluster: PgCluster) -> PgCluster:
    """``cluster.start()``; without PostgreSQL 15 the test is skipped, or fails when CI=true."""
    try:
        return cluster.start()
    except PgUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL 15 is required when CI=true: {exc}", pytrace=False)
        pytest.skip(f"PostgreSQL 15 not available: {exc}")
