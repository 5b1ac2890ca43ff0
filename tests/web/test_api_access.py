"""Access control of the REST API (issue 15 items 4-7; SPEC 13.8): refusals audited in bulk,
key roles and expiry, ``/metrics`` behind a key when configured, rate limits.

Over a real socket (``tests.web.served``, or a ``mantle serve`` subprocess where the setting
comes from its configuration) and the real command line, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time

import falcon.testing
import pytest

from mantle import apikeys
from mantle import db as mantle_db
from mantle.db.connect import connect, is_postgres
from mantle.db.fields import utcnow
from mantle.db.models import ApiKey, AuditEvent
from tests.helpers.database import bound_database
from tests.helpers.pgproxy import CommitCutter, LateCommit
from tests.web.served import served
from tests.web.support import Daemon, apply_yaml, cli, wait_until, wait_until_keys_apply
from web.auth import AuthFailures
from web.errors import ApiError
from web.ratelimit import RateLimit, TokenBuckets
from web.settings import ApiSettings

NAP = """
    name: nap
    triggers: [{type: webhook, path: /hooks/nap}]
    steps: [{name: a, action: core/sleep, params: {duration: 20s}}]
"""
BROKEN = """
    name: broken
    steps: [{name: boom, action: core/fail}]
"""


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _refusal_rows() -> list[AuditEvent]:
    return list(AuditEvent.select().where(AuditEvent.action == "auth.failed")
                .order_by(AuditEvent.id))


@pytest.mark.alone
def test_a_flood_of_refused_requests_writes_one_audit_row_per_route_and_interval(
        tmp_path, db, migrated_db_url):
    apikeys.create_key("ci")
    daemon = Daemon(tmp_path, migrated_db_url,
                    env={"MANTLE_API_AUTH_AUDIT_INTERVAL": "1s"}).start()
    try:
        started = time.monotonic()
        for index in range(200):
            reply = daemon.get("/api/v1/executions",
                               headers=_bearer("mk_wrong") if index % 2 else None)
            assert reply.status == 401
        took = time.monotonic() - started
        # The first refusal is written at once, the rest summed into one row a second.
        wait_until(lambda: sum(row.metadata["count"] for row in _refusal_rows()) == 200,
                   timeout=15, message="the refusals were never all counted")
    finally:
        daemon.stop()
    rows = _refusal_rows()
    assert 2 <= len(rows) <= 3 + took
    first = rows[0]
    assert (first.actor, first.resource_type, first.resource_id) == (
        "api", "http_request", "/api/v1/executions")
    assert first.metadata["count"] == 1
    assert first.metadata["error"] == "missing Authorization header"
    total_errors: dict[str, int] = {}
    for row in rows:
        for error, count in row.metadata["errors"].items():
            total_errors[error] = total_errors.get(error, 0) + count
        assert set(row.metadata["addresses"]) == {"127.0.0.1"}
        assert row.metadata["first_at"] <= row.metadata["last_at"]
    assert total_errors == {"missing Authorization header": 100, "invalid API key": 100}


@contextlib.contextmanager
def _audit_table_held(url: str):
    """Another session keeps every insert into ``audit_events`` waiting until the block ends
    (SQLite: the write lock; PostgreSQL: a SHARE lock on the table)."""
    other = connect(url)
    try:
        if is_postgres(other):
            other.execute_sql("BEGIN")
            other.execute_sql("LOCK TABLE audit_events IN SHARE MODE")
        else:
            other.execute_sql("BEGIN IMMEDIATE")
        yield
    finally:
        other.execute_sql("ROLLBACK")
        other.close()


def test_the_first_refusal_after_a_quiet_interval_gets_a_row_of_its_own_however_late_the_writer(
        db, migrated_db_url):
    """docs/api.md: the first refusal after a quiet interval is written at once, the ones
    after it are summed into the next row. Here the writer is held up (by another route's
    row, waiting for the table) while a route's first and second refusals come: the first
    still gets a row of its own (a run with the CPU busy once wrote both in one)."""
    failures = AuthFailures(db, interval=0.2)
    try:
        with _audit_table_held(migrated_db_url):
            failures.record("/other", "GET", "127.0.0.1", "missing Authorization header")
            wait_until(lambda: not failures._pending and not getattr(failures, "_ready", ()),
                       timeout=5)  # the writer took it and waits for the table
            failures.record("/api/v1/executions", "GET", "127.0.0.1",
                            "missing Authorization header")
            failures.record("/api/v1/executions", "GET", "127.0.0.1", "invalid API key")
    finally:
        failures.close()
    rows = [row.metadata for row in _refusal_rows() if row.resource_id == "/api/v1/executions"]
    assert [(row["count"], row["error"]) for row in rows] == [
        (1, "missing Authorization header"), (1, "invalid API key")]


def test_refusals_from_ever_new_addresses_keep_the_busiest_ones_in_bounded_memory(db):
    """A flood of refusals from ever new client addresses (one IPv6 /64 holds 2**64 of
    them) between two rows, or through a database outage, must not grow the count per
    address without bound; the busiest addresses are still counted exactly."""
    route = "/api/v1/executions"
    failures = AuthFailures(db, interval=3600.0)
    try:
        failures.record(route, "GET", "10.0.0.1", "invalid API key")  # a row of its own
        for index in range(20_000):
            failures.record(route, "GET", f"2001:db8::{index:x}", "invalid API key")
            if index % 10 == 0:
                failures.record(route, "GET", "10.0.0.2", "invalid API key")
        assert len(failures._pending[route].addresses) <= 1000
    finally:
        failures.close()
    rows = [row.metadata for row in _refusal_rows()]
    assert [row["count"] for row in rows] == [1, 22_000]
    assert rows[1]["addresses"]["10.0.0.2"] == 2000
    assert len(rows[1]["addresses"]) == 20


@pytest.mark.parametrize("lose", ["answer", "commit"])
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_refusal_row_whose_commit_outcome_was_lost_is_written_exactly_once(
        db, migrated_db_url, lose):
    """The connection breaks while the COMMIT of an ``auth.failed`` row is in flight, after
    the server committed it (``answer``) or before (``commit``): the writer takes either for
    an outage, and writes the row again only if it did not commit (refusals counted once)."""
    with CommitCutter(migrated_db_url, b"audit_events", lose=lose) as proxy:
        with bound_database(proxy.url) as database:
            failures = AuthFailures(database, interval=0.2)
            proxy.armed.set()
            try:
                failures.record("/api/v1/executions", "GET", "127.0.0.1", "invalid API key")
                assert proxy.cut.wait(10), "the proxy never saw the COMMIT"
            finally:
                failures.close()
    mantle_db.bind(db)  # bound_database unbound the models
    assert [row.metadata["count"] for row in _refusal_rows()] == [1]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_refusal_row_whose_commit_is_still_in_the_network_is_written_once(
        db, migrated_db_url):
    """The COMMIT of an ``auth.failed`` row is held up in the network while its connection
    breaks; its server process, idle in the transaction, would commit it when it arrives.
    The writer must not write the row again while that process lives (it ends it first)."""
    def written() -> int:
        return db.execute_sql("SELECT count(*) FROM audit_events "
                              "WHERE action = 'auth.failed'").fetchone()[0]

    with LateCommit(migrated_db_url, b"COMMIT") as proxy:
        with bound_database(proxy.url) as database:
            failures = AuthFailures(database, interval=0.2)
            proxy.armed.set()
            try:
                failures.record("/api/v1/executions", "GET", "127.0.0.1", "invalid API key")
                assert proxy.cut.wait(10), "the proxy never saw the COMMIT"
                old_pid = wait_until(lambda: db.execute_sql(
                    "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' "
                    "AND query LIKE '%%INSERT INTO \"audit_events\"%%'").fetchone(),
                    timeout=10)[0]
                wait_until(lambda: written() == 1, timeout=10,
                           message="the writer never wrote the row again")
                proxy.deliver.set()  # the held COMMIT reaches the old server process now

                def old_transaction_over():
                    row = db.execute_sql("SELECT state FROM pg_stat_activity WHERE pid = %s",
                                         (old_pid,)).fetchone()
                    return row is None or row[0] == "idle"

                wait_until(old_transaction_over, timeout=10)
            finally:
                proxy.deliver.set()
                proxy.finish.set()
                failures.close()
    mantle_db.bind(db)  # bound_database unbound the models
    assert [row.metadata["count"] for row in _refusal_rows()] == [1]


@pytest.fixture
def api(engine, db):
    apply_yaml(NAP)
    apply_yaml(BROKEN)
    with served(engine, db) as server:
        yield server


def test_a_viewer_may_only_get_an_operator_also_runs_and_an_admin_does_everything(api,
                                                                                 engine):
    viewer = _bearer(apikeys.create_key("watcher", role="viewer"))
    operator = _bearer(apikeys.create_key("deployer", role="operator"))
    admin = _bearer(apikeys.create_key("root"))
    for path in ("/api/v1/executions", "/api/v1/workflows/nap", "/api/v1/openapi.json"):
        assert api.get(path, headers=viewer).status == 200, path
    for path, route in (("/api/v1/run/nap", "/api/v1/run/{workflow}"),
                        ("/api/v1/cancel/x", "/api/v1/cancel/{execution}"),
                        ("/api/v1/retry/x", "/api/v1/retry/{execution}"),
                        ("/hooks/nap", "/hooks/{path}")):
        reply = api.post(path, body=b"{}", headers=viewer)
        assert (reply.status, reply.json) == (403, {
            "error": f'API key role "viewer" cannot POST {route}'}), path
    # Unknown paths and missing methods stay 404 and 405 whatever the role.
    assert api.post("/api/v1/nothing", body=b"", headers=viewer).status == 404
    assert api.request("DELETE", "/api/v1/executions", headers=viewer).status == 405
    run = api.post("/api/v1/run/nap", {}, headers=operator)
    assert run.status == 202
    assert api.post("/hooks/nap", body=b"{}", headers=operator).status == 202
    assert api.post(f"/api/v1/cancel/{run.json['execution_id']}", {},
                    headers=operator).status == 200
    failed = api.post("/api/v1/run/broken", {}, headers=admin).json["execution_id"]
    assert engine.wait(failed, timeout=10) == "failed"
    assert api.post(f"/api/v1/retry/{failed}", {}, headers=operator).status == 202
    assert api.get("/api/v1/executions", headers=admin).status == 200
    for row in api.get("/api/v1/executions", headers=admin).json["executions"]:
        if row["status"] in ("pending", "running"):
            api.post(f"/api/v1/cancel/{row['id']}", {}, headers=admin)


def test_an_expired_key_is_refused_like_a_wrong_one_and_keeps_the_api_closed(api):
    key = apikeys.create_key("short", expires_in=0.5)
    wait_until(lambda: api.get("/api/v1/executions", headers=_bearer(key)).status == 401,
               timeout=10, message="the key never expired")
    reply = api.get("/api/v1/executions", headers=_bearer(key))
    assert (reply.status, reply.json) == (401, {"error": "invalid API key"})
    assert reply.headers["www-authenticate"] == "Bearer"
    # The only key expired, but the API does not open up again.
    reply = api.get("/api/v1/executions")
    assert (reply.status, reply.json) == (401, {"error": "missing Authorization header"})


def test_keys_create_takes_a_role_and_an_expiry_and_keys_list_shows_them(tmp_path, db,
                                                                        migrated_db_url):
    def mantle(*args):
        result = cli(tmp_path, migrated_db_url, "keys", *args)
        return result.returncode, result.stdout, result.stderr

    code, out, err = mantle("create", "ci", "--role", "viewer", "--expires", "30d")
    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith("API Key: mk_")
    row = ApiKey.get(ApiKey.name == "ci")
    assert row.role == "viewer"
    assert abs(row.expires_at - (utcnow() + dt.timedelta(days=30))) < dt.timedelta(minutes=1)
    assert mantle("create", "ops", "--role", "operator", "--expires", "1h30m")[0] == 0
    assert mantle("create", "boss")[0] == 0
    assert ApiKey.get(ApiKey.name == "boss").role == "admin"
    assert ApiKey.get(ApiKey.name == "boss").expires_at is None
    audit = AuditEvent.get(AuditEvent.action == "apikey.created", AuditEvent.resource_id == "ci")
    assert audit.metadata["role"] == "viewer" and audit.metadata["expires_at"].endswith("Z")
    ApiKey.update(expires_at=utcnow() - dt.timedelta(seconds=1)).where(
        ApiKey.name == "ops").execute()
    code, out, _ = mantle("list")
    line = "%-20s %-10s %-8s %-20s %-20s %-20s %s"
    table = {row.name: row for row in ApiKey.select()}

    def shown(name, role, status):
        key = table[name]
        expires = key.expires_at.strftime("%Y-%m-%d %H:%M:%S") if key.expires_at else "never"
        return line % (name, key.prefix, role, key.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                       expires, "never", status)

    assert out.splitlines() == [
        line % ("NAME", "PREFIX", "ROLE", "CREATED", "EXPIRES", "LAST USED", "STATUS"),
        shown("ci", "viewer", "active"), shown("ops", "operator", "expired"),
        shown("boss", "admin", "active")]
    for args, message in (
            (("--role", "root"), 'invalid role "root": must be one of admin, operator, viewer'),
            (("--expires", "soon"), 'invalid --expires value "soon": must be a positive '
                                    "duration such as 12h or 30d"),
            (("--expires", "0"), 'invalid --expires value "0": must be a positive duration '
                                 "such as 12h or 30d"),
            (("--expires", "-5m"), 'invalid --expires value "-5m": must be a positive '
                                   "duration such as 12h or 30d")):
        assert mantle("create", "x", *args) == (1, "", f"Error: {message}\n"), args
    assert not ApiKey.select().where(ApiKey.name == "x").exists()


class _daemon:
    """``with _daemon(cwd, url, env) as daemon``: a started ``mantle serve``, stopped after."""

    def __init__(self, cwd, url, env):
        self.daemon = Daemon(cwd, url, env=env)

    def __enter__(self) -> Daemon:
        return self.daemon.start()

    def __exit__(self, *exc) -> None:
        self.daemon.stop()


def test_metrics_needs_a_key_only_when_configured_and_probes_stay_open(tmp_path, db,
                                                                      migrated_db_url):
    key = apikeys.create_key("scraper", role="viewer")
    with _daemon(tmp_path, migrated_db_url, {}) as daemon:
        assert daemon.get("/metrics").status == 200  # default: Prometheus convention
    with _daemon(tmp_path, migrated_db_url, {"MANTLE_METRICS_REQUIRE_KEY": "true"}) as daemon:
        reply = daemon.get("/metrics")
        assert (reply.status, reply.json) == (401, {"error": "missing Authorization header"})
        reply = daemon.get("/metrics", headers=_bearer(key))
        assert reply.status == 200 and b"mantle_http_requests_total" in reply.body
        for path in ("/healthz", "/readyz"):
            assert daemon.get(path).status == 200, path


def test_the_rate_limit_answers_429_with_retry_after_per_address_and_per_key(
        tmp_path, db, migrated_db_url):
    env = {"MANTLE_API_RATE_LIMIT": "0.2", "MANTLE_API_RATE_BURST": "3"}
    with _daemon(tmp_path, migrated_db_url, env) as daemon:
        # Without keys: one bucket per client address.
        assert [daemon.get("/api/v1/workflows").status for _ in range(3)] == [200] * 3
        reply = daemon.get("/api/v1/executions")
        assert (reply.status, reply.json) == (429, {"error": "rate limit exceeded"})
        assert 1 <= int(reply.headers["retry-after"]) <= 5
        assert daemon.post("/hooks/any", body=b"{}").status == 429
        for path in ("/healthz", "/readyz", "/metrics"):  # never limited
            assert daemon.get(path).status == 200, path
        # With keys: one bucket per key, whatever the address.
        first, second = apikeys.create_key("first"), apikeys.create_key("second")
        wait_until_keys_apply(daemon)
        statuses = [daemon.get("/api/v1/workflows", headers=_bearer(first)).status
                    for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        assert daemon.get("/api/v1/workflows", headers=_bearer(second)).status == 200


def test_a_rate_as_slow_as_the_settings_allow_still_answers_429_with_a_retry_after():
    """``api.rate_limit: 1e-320`` is a number >= 0: the wait for the next token is beyond any
    float, and turning it into ``Retry-After`` raised OverflowError (a 500 for every request
    after the first of each client)."""
    limit = RateLimit(TokenBuckets(1e-320, 1.0))
    request = falcon.testing.create_req(path="/api/v1/workflows", remote_addr="192.0.2.7")
    limit.process_request(request, None)  # the first token of a new bucket
    with pytest.raises(ApiError) as refused:
        limit.process_request(request, None)
    assert (refused.value.status, refused.value.headers) == (429, {"Retry-After": "1000000000"})


def test_without_a_configured_rate_limit_no_request_is_refused(api):
    statuses = {api.get("/api/v1/workflows").status for _ in range(60)}
    assert statuses == {200}


@pytest.mark.parametrize("env,message", [
    ({"MANTLE_API_RATE_LIMIT": "fast"}, 'invalid api.rate_limit "fast": must be a number >= 0'),
    ({"MANTLE_API_RATE_LIMIT": "5", "MANTLE_API_RATE_BURST": "0.5"},
     'invalid api.rate_burst "0.5": must be at least 1 when api.rate_limit is set'),
    ({"MANTLE_API_MAX_EVENT_STREAMS": "-1"},
     'invalid api.max_event_streams "-1": must be an integer from 0 to 10000'),
    ({"MANTLE_METRICS_REQUIRE_KEY": "maybe"},
     'invalid metrics.require_key "maybe": must be true or false'),
    ({"MANTLE_API_AUTH_AUDIT_INTERVAL": "0s"},
     'invalid api.auth_audit_interval "0s": must be a positive duration'),
])
def test_serve_refuses_bad_api_settings_before_touching_the_database(tmp_path, env, message):
    result = cli(tmp_path, "sqlite:///never-created.db", "serve", env=env, timeout=30)
    assert (result.returncode, result.stderr.splitlines()[-1]) == (1, f"Error: {message}")
    assert not (tmp_path / "never-created.db").exists()


def test_api_settings_come_from_mantle_yaml_too(tmp_path):
    from mantle.config import load_config

    (tmp_path / "mantle.yaml").write_text(
        "api:\n  rate_limit: 2.5\n  rate_burst: 10\n  max_event_streams: 7\n"
        "metrics:\n  require_key: true\nwebhooks:\n  drop_headers: [X-One, x-two]\n")
    settings = ApiSettings.from_config(load_config({}, {}, cwd=tmp_path))
    assert (settings.rate_limit, settings.rate_burst, settings.max_event_streams,
            settings.metrics_require_key) == (2.5, 10.0, 7, True)
    assert {"x-one", "x-two", "cookie", "authorization"} <= settings.dropped_headers
    default = ApiSettings.from_config(load_config({}, {}, cwd=tmp_path / "nowhere"))
    assert (default.rate_limit, default.max_event_streams, default.metrics_require_key,
            default.auth_audit_interval) == (0.0, 100, False, 60.0)


@pytest.mark.parametrize("env,message", [
    ({"MANTLE_API_AUTH_AUDIT_INTERVAL": "3000000h"},
     'invalid api.auth_audit_interval "3000000h": must be a positive duration'),
    # digits to str.isdigit() that int() refused with a ValueError (a traceback from serve)
    ({"MANTLE_API_MAX_EVENT_STREAMS": "\u00b2"},
     'invalid api.max_event_streams "\u00b2": must be an integer from 0 to 10000'),
    ({"MANTLE_API_MAX_EVENT_STREAMS": "1" * 5000},
     f'invalid api.max_event_streams "{"1" * 5000}": must be an integer from 0 to 10000'),
])
def test_api_settings_the_api_could_not_run_with_are_refused(tmp_path, env, message):
    """Values that passed the checks, then failed at run time: an interval longer than a
    thread can wait (292 years) killed the ``auth.failed`` writer at its first wait (no row
    written after it)."""
    from mantle.config import load_config
    from mantle.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        ApiSettings.from_config(load_config({}, env, cwd=tmp_path))
    assert str(refused.value) == message


@pytest.mark.alone
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_reads_with_a_key_answer_at_once_while_another_process_holds_the_write_lock(
        api, migrated_db_url):
    """docs/api.md: on SQLite another process holding the write lock blocks writers only,
    "so reads keep answering 200". With API keys, a request refreshes its key's
    ``last_used_at`` (at most every 30 s): that write waited the busy timeout (10 s) for the
    lock before the read was answered, and since it failed it was tried again, for 10 s,
    on every request with that key while the lock was held."""
    key = _bearer(apikeys.create_key("reader", role="viewer"))
    with _audit_table_held(migrated_db_url):  # on SQLite: the write lock
        for _ in range(3):
            started = time.monotonic()
            reply = api.get("/api/v1/workflows", headers=key)
            took = time.monotonic() - started
            assert reply.status == 200 and took < 2.0, (reply.status, took)
    # The lock gone, the use is recorded again.
    assert api.get("/api/v1/workflows", headers=key).status == 200
    assert ApiKey.get(ApiKey.name == "reader").last_used_at is not None
