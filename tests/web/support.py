"""Helpers for the web tests: workflows, waiting, a tiny HTTP client and a real daemon.

``Daemon`` runs ``python -m mantle serve`` as a subprocess on a free port (``--api-address
127.0.0.1:0``; the port comes from the ``server listening`` log line) and keeps every stdout
line, each of which must be a JSON log record.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from mantle import db as mantle_db
from mantle.db import migrations
from tests.helpers.waiting import (apply_yaml, wait_until,  # noqa: F401 - re-exported
                                   wait_until_keys_apply)

__all__ = ["REPO", "apply_yaml", "wait_until", "wait_until_keys_apply", "Reply", "call",
           "Daemon", "cli", "free_port", "gone_database"]

REPO = Path(__file__).resolve().parents[2]






@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    @property
    def json(self):
        return json.loads(self.body)


def call(base: str, method: str, path: str, body: bytes | str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 15.0) -> Reply:
    """One HTTP request with exactly the given body and headers (no Content-Type added)."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = body.encode() if isinstance(body, str) else body
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                     response.read())
    finally:
        conn.close()


def _env(cwd: Path, extra: dict[str, str] | None) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(cwd),
           "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def cli(cwd: Path, database_url: str, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``mantle <args> --database-url <url>`` in ``cwd``."""
    argv = [sys.executable, "-m", "mantle", *args, "--database-url", database_url]
    return subprocess.run(argv, cwd=cwd, env=_env(cwd, env), capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class Daemon:
    """``mantle serve`` in a subprocess. ``lines`` holds the parsed stdout log records."""

    cwd: Path
    database_url: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    lines: list[dict] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen | None = None

    def __post_init__(self):
        self._changed = threading.Condition()
        self._stderr: list[str] = []
        self._eof = False
        self._readers: list[threading.Thread] = []

    # --- lifecycle ---

    def start(self, ready: bool = True, timeout: float = 30.0) -> Daemon:
        argv = [sys.executable, "-m", "mantle", "serve", "--api-address", "127.0.0.1:0",
                "--database-url", self.database_url, *self.args]
        self.process = subprocess.Popen(argv, cwd=self.cwd, env=_env(self.cwd, self.env),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()
        if ready:
            listening = self.wait_for_log("server listening", timeout=timeout)
            self.port = int(listening["address"].rsplit(":", 1)[1])
            wait_until(lambda: self.get("/readyz").status == 200, timeout=timeout,
                       message=f"/readyz never turned 200: {self.output()}")
        return self

    def send(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code, once the process ended and its last lines were read: its exit
        does not wait for our reader threads, so ``messages()`` and ``stderr`` could still
        miss what it wrote last ("server stopped"). Workers that outlive a killed parent
        keep the pipes open: those lines are not waited for past a few seconds."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"daemon did not exit in {timeout}s: {self.output()}")
        deadline = time.monotonic() + 5.0
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        return code

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code (no-op when it already ended)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.send(signal.SIGTERM)
        return self.wait(timeout)

    # --- output ---

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.raw.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.lines.append({"msg": "<not JSON>", "line": line})
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def output(self) -> str:
        return "".join(self.raw[-40:]) + self.stderr

    def messages(self) -> list[str]:
        with self._changed:
            return [line.get("msg") for line in self.lines]

    def wait_for_log(self, msg: str, timeout: float = 15.0, **fields) -> dict:
        """The first log record with ``msg`` (and ``fields``); fails at the deadline or when
        the process ends without it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if line.get("msg") == msg and all(line.get(k) == v
                                                      for k, v in fields.items()):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"no {msg!r} log line: {self.output()}")
                self._changed.wait(min(left, 0.1))

    # --- HTTP ---

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, headers=None) -> Reply:
        return call(self.url, method, path, body, headers)

    def get(self, path: str, headers=None) -> Reply:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, payload=None, headers=None, body=None) -> Reply:
        if payload is not None:
            body = json.dumps(payload)
            headers = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", path, body, headers)

    def wait_for_status(self, execution_id: str, statuses=("completed", "failed", "cancelled"),
                        timeout: float = 20.0, headers=None) -> dict:
        """Poll the detail endpoint until the execution has one of ``statuses``."""
        seen = {}

        def reached():
            reply = self.get(f"/api/v1/executions/{execution_id}", headers=headers)
            seen["detail"] = reply.json
            return reply.status == 200 and reply.json["status"] in statuses

        try:
            wait_until(reached, timeout=timeout, interval=0.05)
        except AssertionError:
            raise AssertionError(f"execution never reached {statuses}: {seen.get('detail')}"
                                 ) from None
        return seen["detail"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gone_database(backend: str, request, tmp_path):
    """A migrated database, bound to the models, that then stops being reachable (dropped, or
    its SQLite directory removed). The caller un-binds it afterwards."""
    if backend == "postgres":
        cluster = request.getfixturevalue("pg_cluster")
        name = cluster.new_name("gone")
        url = cluster.create_database(name, template="template0")
    else:
        folder = tmp_path / "dbdir"
        folder.mkdir()
        url = f"sqlite:///{folder / 'gone.db'}"
    database = mantle_db.connect(url)
    migrations.migrate(database)
    mantle_db.bind(database)
    if backend == "postgres":
        cluster.drop_database(name)  # terminates the open connection too
    else:
        mantle_db.close_all(database)
        shutil.rmtree(folder)  # nothing left to open
    return database
