"""Opening databases from URLs (SPEC 1, 10.1): URL forms, errors, SQLite settings, sharing."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading

import peewee
import pytest

from mantle import db
from mantle.db.connect import PG_POOL_SIZE, SQLITE_BUSY_TIMEOUT_MS
from mantle.errors import ConfigError, DatabaseUnavailable
from tests.helpers import Background, refusing_port
from tests.web.support import REPO


def test_connect_opens_and_answers_on_both_engines(db_url):
    database = db.connect(db_url)
    try:
        assert database.execute_sql("SELECT 1").fetchone()[0] == 1
        assert db.is_sqlite(database) == db_url.startswith("sqlite:")
        assert db.is_postgres(database) == db_url.startswith("postgresql:")
    finally:
        database.close()


def test_bind_points_the_proxy_and_unwrap_finds_the_database(blank_db):
    assert db.unwrap(db.database_proxy) is blank_db
    assert db.is_sqlite(db.database_proxy) == db.is_sqlite(blank_db)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "sqlite:relative.db", "", "mantle.db",
                                 "http://example.com/db"])
def test_unknown_scheme_is_a_config_error_naming_the_url(url):
    with pytest.raises(ConfigError) as caught:
        db.connect(url)
    assert str(caught.value).startswith(f'invalid database URL "{url}": ')


@pytest.mark.parametrize("url", ["sqlite://host/file.db", "sqlite:///", "sqlite:///x.db?mode=ro"])
def test_malformed_sqlite_url_is_a_config_error(url):
    with pytest.raises(ConfigError, match="invalid database URL"):
        db.connect(url)


@pytest.mark.parametrize("url", ["postgresql://u:s3cret@h:notaport/db",
                                 "postgres://u:s3cret@h/db?nosuchparam=1",
                                 "postgresql://u:s3cret@127.0.0.1:5432",
                                 # libpq's reason quotes the whole URL, or the token it
                                 # cannot decode
                                 "postgresql://u:s3cret@[::1/db",
                                 "postgresql://u:s3cret%ZZ@h/db"])
def test_malformed_postgres_url_is_a_config_error_without_the_password(url):
    with pytest.raises(ConfigError, match="invalid database URL") as caught:
        db.connect(url)
    assert "s3cret" not in str(caught.value)
    assert "u:***@" in str(caught.value)


def test_a_password_given_as_a_url_parameter_is_hidden_too():
    with pytest.raises(ConfigError) as caught:
        db.connect("postgresql://u@h/db?password=s3cret%ZZ&sslmode=disable")
    assert str(caught.value) == ('invalid database URL "postgresql://u@h/db?password=***'
                                 '&sslmode=disable": invalid percent-encoded token: "***"')


def test_relative_sqlite_url_is_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    database = db.connect("sqlite:///relative.db")
    database.close()
    assert database.database == str(tmp_path / "relative.db")
    assert (tmp_path / "relative.db").exists()


def test_absolute_sqlite_url_has_four_slashes(tmp_path):
    database = db.connect(f"sqlite:////{tmp_path.relative_to('/')}/abs.db")
    database.close()
    assert database.database == str(tmp_path / "abs.db")


def test_sqlite_file_in_a_missing_directory_is_unavailable_with_the_directory_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatabaseUnavailable) as caught:
        db.connect(f"sqlite:///{missing}/mantle.db")
    assert caught.value.detail == (f'cannot open SQLite database "{missing}/mantle.db": '
                                   f'directory "{missing}" does not exist')
    assert str(caught.value).startswith("failed to connect to database: ")


def test_a_file_that_is_not_a_database_is_unavailable(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite file, just text. " * 100)
    with pytest.raises(DatabaseUnavailable) as caught:
        db.connect(f"sqlite:///{junk}")
    assert caught.value.detail == f'cannot open SQLite database "{junk}": file is not a database'


def test_unreachable_postgres_port_is_unavailable_with_the_driver_reason():
    with refusing_port() as port, pytest.raises(DatabaseUnavailable) as caught:
        db.connect(f"postgresql://mantle:s3cret@127.0.0.1:{port}/mantle")
    detail = caught.value.detail
    assert f"port {port} failed" in detail and "Connection refused" in detail
    assert "\n" not in detail and "s3cret" not in detail


@pytest.mark.postgres
def test_missing_postgres_database_is_unavailable(pg_cluster):
    with pytest.raises(DatabaseUnavailable, match='database "no_such_db" does not exist'):
        db.connect(pg_cluster.url_for("no_such_db"))


@pytest.mark.postgres
def test_postgres_url_is_decoded_and_its_parameters_passed_through(pg_cluster):
    pg_cluster.execute('CREATE ROLE "us@er:x" LOGIN')
    try:
        url = (f"postgres://us%40er%3Ax:any%2Fpass@{pg_cluster.host}:{pg_cluster.port}/postgres"
               "?application_name=mantle-test&sslmode=disable")
        database = db.connect(url)
        try:
            row = database.execute_sql("SELECT current_user, current_setting('application_name')")
            assert row.fetchone() == ("us@er:x", "mantle-test")
        finally:
            database.close()
    finally:
        pg_cluster.execute('DROP ROLE "us@er:x"')


@pytest.mark.postgres
def test_postgres_connections_notice_dead_peers_and_never_wait_forever(pg_cluster):
    """SPEC 13.7: connect timeout 5 s, TCP keepalives, tcp_user_timeout 10 s, statement
    timeout 30 s; a session idle inside a transaction ends after 15 s (a paused node)."""
    database = db.connect(pg_cluster.url)
    try:
        settings = database.execute_sql(
            "SELECT current_setting('statement_timeout'), "
            "current_setting('idle_in_transaction_session_timeout')").fetchone()
        info = database.connection().info.get_parameters()
    finally:
        database.close()
    assert settings == ("30s", "15s")
    assert (info["connect_timeout"], info["keepalives"], info["tcp_user_timeout"]) == (
        "5", "1", "10000")


def test_a_url_may_set_its_own_postgres_timeouts():
    from mantle.db.connect import _postgres_database  # builds, connects nothing

    database = _postgres_database(
        "postgresql://u@h/db?connect_timeout=2&options=-c%20statement_timeout%3D5000")
    assert database.connect_params["connect_timeout"] == "2"
    assert "statement_timeout=5000" in database.connect_params["options"]
    assert database.connect_params["options"].count("statement_timeout") == 1


def _pragmas(database) -> dict:
    return {name: database.execute_sql(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")}


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout_on_every_thread(tmp_path):
    database = db.connect(f"sqlite:///{tmp_path}/p.db")
    expected = {"journal_mode": "wal", "busy_timeout": SQLITE_BUSY_TIMEOUT_MS,
                "synchronous": 1, "foreign_keys": 1}  # synchronous 1 = NORMAL
    try:
        assert _pragmas(database) == expected
        assert SQLITE_BUSY_TIMEOUT_MS >= 5000
        other = Background(lambda: (_pragmas(database), database.close())[0]).join()
        assert other.error is None and other.result == expected
    finally:
        database.close()


def _counter_table(url: str):
    setup = db.connect(url)
    setup.execute_sql("CREATE TABLE counter (id INTEGER PRIMARY KEY, writer TEXT, seen INTEGER)")
    setup.close()


def test_two_sqlite_connections_writing_at_once_both_succeed(tmp_path):
    """Read-then-write transactions from two connections interleave without 'database is
    locked': every transaction takes the write lock when it begins."""
    url = f"sqlite:///{tmp_path}/shared.db"
    _counter_table(url)
    start = threading.Barrier(2)

    def writer(name: str) -> int:
        database = db.connect(url)
        try:
            start.wait(5)
            for _ in range(40):
                with database.atomic():
                    seen = database.execute_sql("SELECT COUNT(*) FROM counter").fetchone()[0]
                    database.execute_sql("INSERT INTO counter (writer, seen) VALUES (?, ?)",
                                         (name, seen))
            return 40
        finally:
            database.close()

    first, second = Background(lambda: writer("a")), Background(lambda: writer("b"))
    for job in (first.join(30), second.join(30)):
        assert job.error is None, job.error
    check = db.connect(url)
    try:
        rows = check.execute_sql("SELECT seen FROM counter ORDER BY id").fetchall()
    finally:
        check.close()
    # Serialised: each transaction saw exactly the rows committed before it.
    assert [seen for (seen,) in rows] == list(range(80))


def test_sqlite_writer_waits_for_a_held_lock_instead_of_failing(tmp_path):
    url = f"sqlite:///{tmp_path}/held.db"
    _counter_table(url)
    holder, waiter = db.connect(url), db.connect(url)
    holding, waiter_done = threading.Event(), threading.Event()

    def hold():
        with db.transaction(holder):
            holder.execute_sql("INSERT INTO counter (writer) VALUES ('holder')")
            holding.set()
            # Keep the lock a while; the waiter must not finish meanwhile.
            finished_early = waiter_done.wait(0.4)
        holder.close()
        return finished_early

    def write():
        holding.wait(5)
        with db.transaction(waiter):
            waiter.execute_sql("INSERT INTO counter (writer) VALUES ('waiter')")
        waiter_done.set()
        rows = waiter.execute_sql("SELECT writer FROM counter ORDER BY id").fetchall()
        waiter.close()
        return rows

    held, waited = Background(hold), Background(write)
    assert held.join(10).error is None and held.result is False
    assert waited.join(10).error is None, waited.error
    assert waited.result == [("holder",), ("waiter",)]


_HOLDER = """
import sys, time
from mantle import db
database = db.connect(sys.argv[1])
with db.transaction(database):
    database.execute_sql("INSERT INTO counter (writer) VALUES ('holder')")
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_sqlite_writer_gives_up_on_a_writer_that_never_lets_go(tmp_path, monkeypatch):
    """Another mantle process stopped inside a write (SIGSTOP, Ctrl-Z) keeps its turn: a
    writer here fails as a locked database after the busy timeout (an outage, waited out by
    the journal), instead of waiting for ever, and writes once the holder is gone."""
    monkeypatch.setattr(db.engine._WriterTurn, "wait_s", 0.3)
    url = f"sqlite:///{tmp_path}/stopped.db"
    _counter_table(url)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, url], cwd=tmp_path,
                              env={"PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              text=True)
    database = db.connect(url)

    def write():
        with db.transaction(database):
            database.execute_sql("INSERT INTO counter (writer) VALUES ('here')")

    try:
        assert holder.stdout.readline() == "holding\n"
        holder.send_signal(signal.SIGSTOP)
        refused = Background(write).join(5)
        assert isinstance(refused.error, peewee.OperationalError), refused.error
        assert "database is locked" in str(refused.error)
        holder.kill()
        holder.wait(10)
        assert Background(write).join(5).error is None
        rows = database.execute_sql("SELECT writer FROM counter").fetchall()
        assert rows == [("here",)]
    finally:
        holder.kill()
        holder.wait(10)
        database.close()


def test_threads_that_wrote_and_ended_leave_no_descriptor_open(tmp_path):
    """Each writing thread holds a descriptor of the ``<file>-writer`` lock file (a flock
    belongs to an open file); one that ends must not leave it open (a daemon's short-lived
    threads would run the process out of descriptors)."""
    url = f"sqlite:///{tmp_path}/threads.db"
    _counter_table(url)
    database = db.connect(url)

    def write():
        with db.transaction(database):
            database.execute_sql("INSERT INTO counter (writer) VALUES ('thread')")
        database.close()

    try:
        assert Background(write).join().error is None  # the process's own first opens
        gc.collect()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            assert Background(write).join().error is None
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        database.close()


def test_connections_are_per_thread(blank_db):
    mine = blank_db.connection()
    theirs = Background(lambda: (blank_db.connection(), blank_db.close())[0]).join()
    assert theirs.error is None
    assert theirs.result is not mine


def test_integrity_errors_surface_as_peewee_errors_on_both_engines(blank_db):
    blank_db.execute_sql("CREATE TABLE t (k VARCHAR(10) PRIMARY KEY)")
    blank_db.execute_sql("INSERT INTO t (k) VALUES ('a')")
    with pytest.raises(peewee.IntegrityError):
        with db.transaction(blank_db):
            blank_db.execute_sql("INSERT INTO t (k) VALUES ('a')")


def test_many_connections_opening_a_new_sqlite_file_at_once_all_succeed(tmp_path):
    """A CLI and a daemon may create the file together; switching it to WAL must not fail."""
    for round_ in range(20):
        url = f"sqlite:///{tmp_path}/fresh{round_}.db"
        start = threading.Barrier(6)

        def open_it():
            start.wait(5)
            database = db.connect(url)
            mode = database.execute_sql("PRAGMA journal_mode").fetchone()[0]
            database.close()
            return mode

        jobs = [Background(open_it) for _ in range(6)]
        assert [(job.join(15).error, job.result) for job in jobs] == [(None, "wal")] * 6


def test_postgres_threads_share_a_bounded_pool_and_give_connections_back(pg_cluster):
    """A released connection is reused by the next thread; a broken one (reset after an
    outage, even inside a transaction) frees its place instead of leaking it."""
    database = db.connect(pg_cluster.url)
    try:
        first = database.connection()
        db.release_connection(database)
        reused = Background(lambda: (database.connection(),
                                     db.release_connection(database))[0]).join()
        assert reused.result is first
        assert database.execute_sql("SELECT current_setting('application_name')").fetchone() \
            == ("mantle",)
        database.atomic().__enter__()  # an outage struck inside a transaction
        database.execute_sql("SELECT 1")
        db.reset_connection(database)
        assert database._in_use == {} and not database.in_transaction()
        for _ in range(PG_POOL_SIZE + 2):  # no place was leaked
            database.execute_sql("SELECT 1").fetchone()
            db.reset_connection(database)
    finally:
        db.close_all(database)
