"""A `mantle serve` subprocess for benchmarks, its REST client and RSS sampling."""

from __future__ import annotations

import http.client
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
    """One keep-alive HTTP connection per thread to the daemon."""

    def __init__(self, port: int):
        self.port = port
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                                 timeout=60)
        return conn

    def request(self, method: str, path: str, body=None) -> tuple[int, dict]:
        status, payload, _ = self.exchange(method, path, body)
        return status, payload

    def exchange(self, method: str, path: str, body=None) -> tuple[int, dict, str | None]:
        """(status, JSON body, the answering node from ``X-Mantle-Node``)."""
        data = None if body is None else json.dumps(body)
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request(method, path, body=data,
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = resp.read()
                return (resp.status, json.loads(payload) if payload else {},
                        resp.getheader("X-Mantle-Node"))
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


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
        return {**os.environ, "PYTHONPATH": REPO, "MANTLE_LOG_LEVEL": "warn"}

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
