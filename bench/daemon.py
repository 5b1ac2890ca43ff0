"""A `mantle serve` subprocess for benchmarks, its REST client and RSS sampling."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PG_BIN = "/usr/lib/postgresql/15/bin"

__all__ = ["Daemon", "Client", "PostgresServer", "RssSampler"]


class Client:
    """One keep-alive HTTP/1.1 connection per thread to the daemon, spoken over a bare socket.

    The benchmark client shares this 2-core machine with the daemon it measures: with
    ``http.client`` (whose header parsing goes through the ``email`` package) it took
    0.35 ms of CPU per W1 execution, a sixth of a core at 500 executions/s that the daemon
    then did not have. This one writes the request bytes and reads the status line, the
    ``Content-Length`` and ``X-Mantle-Node`` headers and the body; it is meant for mantle's
    own answers only (no chunked bodies, no redirects).
    """

    def __init__(self, port: int):
        self.port = port
        self._local = threading.local()

    def _conn(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _Connection(self.port)
        return conn

    def request(self, method: str, path: str, body=None) -> tuple[int, dict]:
        status, payload, _ = self.exchange(method, path, body)
        return status, payload

    def exchange(self, method: str, path: str, body=None) -> tuple[int, dict, str | None]:
        """(status, JSON body, the answering node from ``X-Mantle-Node``)."""
        data = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
        for attempt in (1, 2):
            conn = self._conn()
            try:
                status, payload, node, keep = conn.exchange(head.encode() + data)
            except OSError:
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
                continue
            if not keep:  # the daemon closes it after this answer
                conn.close()
                self._local.conn = None
            return status, json.loads(payload) if payload else {}, node
        raise AssertionError("unreachable")


class _Connection:
    def __init__(self, port: int):
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def close(self) -> None:
        self._sock.close()

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        self._buffer += chunk

    def exchange(self, request: bytes) -> tuple[int, bytes, str | None, bool]:
        """(status, body, ``X-Mantle-Node``, whether the connection stays open)."""
        self._sock.sendall(request)
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        lines = self._buffer[:end].decode("latin-1").split("\r\n")
        self._buffer = self._buffer[end + 4:]
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            length = int(headers["content-length"])
        elif status in (204, 304):
            length = 0
        else:
            raise OSError(f"no Content-Length in the answer: {lines[0]}")
        while len(self._buffer) < length:
            self._fill()
        payload, self._buffer = self._buffer[:length], self._buffer[length:]
        keep = headers.get("connection", "").lower() != "close"
        return status, payload, headers.get("x-mantle-node"), keep


class RssSampler:
    """Peak RSS (MiB) of a process and its children, sampled from /proc every 20 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mib = max(self.peak_mib, self.current_mib())

    def current_mib(self) -> float:
        total = 0
        for pid in [self.pid] + _children(self.pid):
            try:
                with open(f"/proc/{pid}/status") as handle:
                    for line in handle:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            direct = [int(p) for p in handle.read().split()]
    except OSError:
        return []
    return direct + [c for p in direct for c in _children(p)]


class Daemon:
    """`mantle init`, `apply` of the bench workflows, then `mantle serve` on a free port."""

    def __init__(self, workflows: dict[str, str], database_url: str | None = None,
                 workers: int = 1):
        self.dir = tempfile.mkdtemp(prefix="mantle-bench-")
        self.database_url = database_url or f"sqlite:///{self.dir}/mantle.db"
        self.workflows = workflows
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.client: Client | None = None
        self.pool = None  # workloads.client_pool() sets it

    def _mantle(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "mantle", *args, "--database-url",
                        self.database_url], cwd=self.dir, check=True,
                       env=self._env(), stdout=subprocess.DEVNULL)

    def _env(self) -> dict:
        # The repository first; a PYTHONPATH already set stays after it (dependencies installed
        # with ``pip install --target`` on a machine without a package registry).
        path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": path, "MANTLE_LOG_LEVEL": "warn"}

    def __enter__(self) -> Daemon:
        self._mantle("init")
        for name, text in self.workflows.items():
            path = os.path.join(self.dir, f"{name}.yaml")
            with open(path, "w") as handle:
                handle.write(text)
            self._mantle("apply", path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mantle", "serve", "--api-address", "127.0.0.1:0",
             "--database-url", self.database_url, "--log-level", "info",
             "--workers", str(self.workers)],
            cwd=self.dir, env=self._env(), stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("mantle serve exited during startup")
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("msg") == "server listening":
                port = int(str(record["address"]).rsplit(":", 1)[1])
        threading.Thread(target=self._drain, daemon=True).start()
        self.client = Client(port)
        return self

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the daemon and its worker processes."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in [self.proc.pid] + _children(self.proc.pid):
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / tick

    def owners(self, ids) -> dict[str, str]:
        """execution id -> owning node, read from the SQLite file (benchmarks only)."""
        import sqlite3

        path = self.database_url[len("sqlite:///"):]
        with sqlite3.connect(path) as conn:
            rows = conn.execute("SELECT id, owner FROM workflow_executions").fetchall()
        wanted = set(ids)
        return {i: owner for i, owner in rows if i in wanted}

    def _drain(self) -> None:
        for _ in self.proc.stdout:
            pass

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer:
    """A throwaway PostgreSQL 15 cluster on a free port (run as `postgres` when root)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mantle-bench-pg-")
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        kwargs = {}
        if os.geteuid() == 0:
            import pwd
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            kwargs = {"user": user.pw_uid, "group": user.pw_gid}
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       **kwargs)

    def __enter__(self) -> PostgresServer:
        data = os.path.join(self.dir, "data")
        self._run(f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "--auth=trust")
        self._run(f"{PG_BIN}/pg_ctl", "-D", data, "-w", "-l", os.path.join(self.dir, "log"),
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                        "-c synchronous_commit=off -c max_connections=200", "start")
        return self

    def __exit__(self, *exc) -> None:
        self._run(f"{PG_BIN}/pg_ctl", "-D", os.path.join(self.dir, "data"), "-m",
                  "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
