"""WAL checkpoints of a SQLite file on their own thread (``mantle.services.checkpoints``),
off the commits of the engine's writers."""

from __future__ import annotations

import struct

from mantle.db import connect
from mantle.services.checkpoints import WalCheckpointer
from tests.helpers.waiting import wait_until
from tests.web.support import Daemon, cli

W1 = "name: w1\nsteps: [{name: noop, action: core/log, params: {message: x}}]\n"


def _wal(path: str) -> tuple[int, int]:
    """(frames in the log, frames already copied back into the file), from the header of the
    WAL index (``<file>-shm``) that SQLite keeps; reading it changes nothing."""
    with open(path + "-shm", "rb") as handle:
        header = handle.read(100)
    return struct.unpack_from("=I", header, 16)[0], struct.unpack_from("=I", header, 96)[0]


def _copied_back(path: str) -> bool:
    frames, copied = _wal(path)
    return frames > 0 and copied == frames


def test_commits_leave_checkpoints_to_the_checkpointer(tmp_path):
    """Past SQLite's default of 1,000 pages a commit would copy the log back itself (with two
    disk syncs, holding the write lock); with a checkpointer for the database it does not,
    and the checkpointer copies it back without another write."""
    path = str(tmp_path / "mantle.db")
    database = connect(f"sqlite:///{path}")
    checkpointer = WalCheckpointer.for_database(database, interval=0.02)
    database.execute_sql("CREATE TABLE filler (data BLOB)")
    for _ in range(1200):  # one page each, one commit each
        database.execute_sql("INSERT INTO filler VALUES (randomblob(3000))")
    frames, copied = _wal(path)
    assert frames > 1200 and copied == 0
    checkpointer.start()
    try:
        wait_until(lambda: _copied_back(path), timeout=10,
                   message=f"the log was not copied back: {_wal(path)}")
    finally:
        checkpointer.stop()
        database.close()


def test_nothing_to_checkpoint_on_other_databases(tmp_path):
    assert WalCheckpointer.for_database(connect("sqlite:///:memory:")) is None


def test_the_daemon_copies_its_write_ahead_log_back_while_idle(tmp_path):
    """A few executions write far fewer than 1,000 pages, so no commit checkpoints; the
    daemon's checkpointer copies them back into the database file anyway."""
    path = str(tmp_path / "mantle.db")
    url = f"sqlite:///{path}"
    (tmp_path / "w1.yaml").write_text(W1)
    for command in (("init",), ("apply", "w1.yaml")):
        assert cli(tmp_path, url, *command).returncode == 0
    daemon = Daemon(tmp_path, url).start()
    try:
        ids = [daemon.post("/api/v1/run/w1", {}).json["execution_id"]
               for _ in range(5)]
        for execution_id in ids:
            daemon.wait_for_status(execution_id)
        wait_until(lambda: _copied_back(path), timeout=10,
                   message=f"the log was not copied back: {_wal(path)}")
    finally:
        assert daemon.stop() == 0
