"""PostgreSQL stops under a running daemon and comes back (SPEC 10.2, 4.11, 7.5).

The test has a cluster of its own (the session's is shared), stops it with ``pg_ctl stop -m
fast`` while an execution is in a step, and starts it again on the same port.
"""

from __future__ import annotations

import datetime as dt
import http.client
import threading
import time

import pytest

from mantle import db as mantle_db
from mantle.db.fields import utcnow
from tests.helpers.pgproxy import Blackhole
from tests.pg import PausableCluster, started_or_skip
from tests.web.support import Daemon, apply_yaml, wait_until

pytestmark = pytest.mark.postgres

PAUSE = """
    name: through-outage
    steps:
      - {name: first, action: core/sleep, params: {duration: 2s}}
      - {name: second, action: core/log, depends_on: [first], params: {message: after}}
"""


@pytest.fixture
def cluster():
    started = started_or_skip(PausableCluster())
    yield started
    started.stop()


def _readyz(daemon) -> tuple[int, dict]:
    reply = daemon.get("/readyz")
    return reply.status, reply.json


def test_a_postgres_outage_pauses_checkpoints_and_everything_recovers(cluster, tmp_path):
    url = cluster.create_database("mantle")
    daemon = Daemon(tmp_path, url).start()
    try:
        database = mantle_db.connect(url)
        mantle_db.bind(database)
        try:
            apply_yaml(PAUSE)
        finally:
            mantle_db.close_all(database)
            mantle_db.database_proxy.initialize(None)
        execution_id = daemon.post("/api/v1/run/through-outage", {}).json["execution_id"]
        running = wait_until(lambda: daemon.get(f"/api/v1/executions/{execution_id}").json[
            "steps"][0]["started_at"])
        sleep_ends = dt.datetime.strptime(running, "%Y-%m-%dT%H:%M:%S.%fZ") + \
            dt.timedelta(seconds=2)

        cluster.pause()
        wait_until(lambda: _readyz(daemon) == (503, {"status": "unavailable",
                                                     "details": {"database": "unreachable"}}),
                   timeout=10, interval=0.2)
        assert daemon.get("/healthz").json == {"status": "ok"}
        for method, path in (("GET", "/api/v1/executions"), ("POST", "/api/v1/run/x"),
                             ("GET", f"/api/v1/executions/{execution_id}"),
                             ("POST", "/hooks/anything")):
            reply = daemon.request(method, path)
            assert (reply.status, reply.json) == (503, {"error": "database unavailable"}), path
        daemon.wait_for_log("database unavailable", timeout=15)
        # The step's 2 s sleep ends during the outage; its checkpoint has to wait, and so does
        # the step after it.
        wait_until(lambda: utcnow() > sleep_ends + dt.timedelta(seconds=0.5), timeout=10)

        resumed_at = utcnow()
        cluster.resume()
        wait_until(lambda: _readyz(daemon) == (200, {"status": "ok"}), timeout=15,
                   interval=0.2)
        detail = daemon.wait_for_status(execution_id, timeout=30)
        assert detail["status"] == "completed"
        first, second = detail["steps"]
        assert (first["name"], first["status"], first["attempt"]) == ("first", "completed", 1)
        assert (second["name"], second["status"]) == ("second", "completed")
        stamp = resumed_at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"
        assert first["completed_at"] < stamp < second["started_at"]
        assert daemon.messages().count("database unavailable") == 1

        again = daemon.post("/api/v1/run/through-outage", {})
        assert again.status == 202
        assert daemon.wait_for_status(again.json["execution_id"])["status"] == "completed"
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_probes_answer_while_every_api_worker_waits_on_a_blackholed_database(
        pg_cluster, _pg_migrated_template, tmp_path):
    """SPEC 13.7: /healthz never waits on the database. With the database's packets
    swallowed, each request that queries it holds an API worker thread until its timeouts;
    the probes, which answer from memory, have threads of their own and answer at once."""
    url = pg_cluster.create_database(pg_cluster.new_name("blackhole"),
                                     template=_pg_migrated_template)
    proxy = Blackhole(url)
    # 2 + 1 worker threads, so that a few requests take them all
    daemon = Daemon(tmp_path, proxy.url, args=("--threads", "2"),
                    env={"MANTLE_API_MAX_EVENT_STREAMS": "1"}).start()
    try:
        assert daemon.get("/api/v1/executions").status == 200
        proxy.open.clear()
        waiting = []

        def query() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
            connection.request("GET", "/api/v1/executions")
            waiting.append(connection)

        for _ in range(6):
            threading.Thread(target=query, daemon=True).start()
        wait_until(lambda: len(waiting) == 6)
        for path in ("/healthz", "/readyz", "/healthz"):
            asked = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
            connection.request("GET", path)
            status = connection.getresponse().status
            connection.close()
            assert time.monotonic() - asked < 1.0, f"{path} waited behind the database"
            assert status == 200 if path == "/healthz" else status in (200, 503)
    finally:
        proxy.open.set()
        for connection in waiting:
            connection.close()
        assert daemon.stop() == 0
        proxy.close()
