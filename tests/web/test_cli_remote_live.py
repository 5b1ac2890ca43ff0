"""``mantle run --server`` against a real ``mantle serve``, on SQLite and PostgreSQL: step
lines printed live as the steps finish, the execution line last (SPEC 13.1.2), and ``-o json``
printing the API's detail document (13.1.7)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import psycopg
import pytest

from tests.helpers.database import bound_database
from tests.web.support import REPO, Daemon, apply_yaml, wait_until


def test_run_with_server_prints_live_lines_and_json(migrated_db_url, tmp_path, http_target):
    http_target.route("/gate", hold=True, json={"ok": True})
    with bound_database(migrated_db_url):
        apply_yaml(f"""
            name: remote-live
            steps:
              - {{name: gated, action: http/request,
                 params: {{url: "{http_target.url('/gate')}"}}}}
              - {{name: quick, action: core/log, params: {{message: hi}}}}
            hooks:
              on_success: [{{name: cheer, action: core/log, params: {{message: yay}}}}]
        """)
        daemon = Daemon(tmp_path, migrated_db_url).start()
        try:
            env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
            argv = [sys.executable, "-m", "mantle", "run", "remote-live", "--server", daemon.url]
            runner = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            seen: list[str] = []
            reader = threading.Thread(
                target=lambda: seen.extend(line.rstrip("\n") for line in runner.stdout))
            reader.start()
            wait_until(lambda: "  quick: completed" in seen or runner.poll() is not None,
                       message=f"no live line: {seen}")
            # gated is still held by the server while quick's line is already out.
            assert seen == ["Running remote-live (version 1)...", "  quick: completed"]
            http_target.release("/gate")
            assert runner.wait(30) == 0, runner.stderr.read()
            reader.join(5)
            execution_id = seen[-1].split()[1].rstrip(":")
            assert seen == ["Running remote-live (version 1)...", "  quick: completed",
                            "  gated: completed", "  cheer (hook): completed",
                            f"Execution {execution_id}: completed"]

            as_json = subprocess.run(argv + ["-o", "json"], cwd=tmp_path, env=env,
                                     capture_output=True, text=True, timeout=60)
            assert (as_json.returncode, as_json.stderr) == (0, "")
            document = json.loads(as_json.stdout)
            assert document == daemon.get(f"/api/v1/executions/{document['id']}").json
            assert document["status"] == "completed"
            assert [hook["name"] for hook in document["hooks"]] == ["cheer"]
        finally:
            assert daemon.stop() == 0, daemon.output()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_signal_while_the_run_is_being_accepted_cancels_what_it_created(
        migrated_db_url, tmp_path):
    # The test holds the workflow row that a limited workflow's POST locks, so the CLI is
    # inside its POST (seen as a backend waiting on a lock) when the signal comes: the
    # execution the server then accepts is cancelled, as an early Ctrl-C in-process is.
    with bound_database(migrated_db_url):
        apply_yaml("""
            name: napping
            max_parallel_executions: 1
            steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
        """)
        daemon = Daemon(tmp_path, migrated_db_url).start()
        try:
            with psycopg.connect(migrated_db_url, autocommit=True) as watcher, \
                    psycopg.connect(migrated_db_url) as holder:
                holder.execute("SELECT 1 FROM workflows WHERE name = 'napping' FOR UPDATE")
                env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
                runner = subprocess.Popen(
                    [sys.executable, "-m", "mantle", "run", "napping", "--server", daemon.url],
                    cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
                wait_until(lambda: watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                ).fetchone()[0] > 0, message="the POST never waited on the workflow row")
                runner.send_signal(signal.SIGINT)
                holder.commit()
                stdout, stderr = runner.communicate(timeout=30)
            assert (runner.returncode, stderr) == (130, ""), stderr
            lines = stdout.splitlines()
            assert lines[0] == "Running napping (version 1)..."
            execution_id = lines[-1].split()[1].rstrip(":")
            assert lines[-1] == f"Execution {execution_id}: cancelled", stdout
            assert daemon.get(f"/api/v1/executions/{execution_id}").json["status"] == \
                "cancelled"
        finally:
            assert daemon.stop() == 0, daemon.output()
