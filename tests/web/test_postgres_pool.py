"""A process's PostgreSQL connections come from a bounded pool (docs/configuration.md):
``serve --workers N`` holds at most ``N x PG_POOL_SIZE`` of the server's connections, not one
per HTTP thread (each process has 8 API threads plus 100 for event streams)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from mantle.db.connect import PG_POOL_SIZE
from tests.helpers.database import bound_database
from tests.web.support import Daemon, apply_yaml

pytestmark = pytest.mark.postgres


def _mantle_connections(database) -> int:
    return database.execute_sql(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'mantle'"
        " AND pid <> pg_backend_pid()").fetchone()[0]


def test_workers_under_many_concurrent_clients_hold_at_most_their_pools(tmp_path,
                                                                         pg_cluster):
    url = pg_cluster.create_database(pg_cluster.new_name("pool"))
    with bound_database(url, migrate=True) as database:
        apply_yaml("""
            name: hello
            steps: [{name: say, action: core/log, params: {message: hi}}]
        """)
        daemon = Daemon(tmp_path, url, args=("--workers", "2")).start(timeout=60)
        try:
            def one(index: int) -> int:
                if index % 3:
                    return daemon.get("/api/v1/executions?limit=5").status
                return daemon.post("/api/v1/run/hello", {}).status

            peak = 0
            with ThreadPoolExecutor(96) as clients:
                statuses: Counter = Counter()
                for _ in range(4):
                    statuses.update(clients.map(one, range(240)))
                    peak = max(peak, _mantle_connections(database))
            assert set(statuses) <= {200, 202}, statuses
            # each worker: its pool, plus the LISTEN connection of the cancel channel and the
            # lease renewal's own
            assert peak <= 2 * (PG_POOL_SIZE + 2), peak
        finally:
            assert daemon.stop(timeout=60) == 0
