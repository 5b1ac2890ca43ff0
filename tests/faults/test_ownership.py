"""Ownership across processes and hosts (SPEC 13.7): three `mantle serve` on one PostgreSQL,
or one `mantle serve --workers 3` on SQLite, with a counting local HTTP target.

- killing one node mid-run loses nothing and repeats no completed step, and the work was
  spread over several nodes;
- a node paused past its lease has its late writes refused, repeats no step, and logs
  `execution lease lost`;
- a process that comes back with its predecessor's hostname and pid resumes its executions;
- cron fires once per minute across all nodes;
- an in-process `mantle run` paused past its lease while a daemon runs repeats no step;
- a cancel sent to a node that does not own the execution reaches the owner at once;
- a plugin dies with the daemon or worker that started it (SIGKILL), so the attempt resumed
  elsewhere never runs alongside it.

Each process gets ``MANTLE_LEASE_TTL=3s`` so takeovers happen in seconds.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import pytest

from mantle.db.fields import utcnow
from mantle.db.models import Node, StepExecution, WorkflowExecution
from tests.web.support import REPO, Daemon, apply_yaml, wait_until

TTL = {"MANTLE_LEASE_TTL": "3s"}
CRON_MINUTES = int(os.environ.get("MANTLE_CRON_MINUTES", "1"))
FAN_EXECUTIONS = int(os.environ.get("MANTLE_OWNERSHIP_EXECUTIONS", "200"))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


class Cluster:
    """Three nodes on one database: three daemons (PostgreSQL) or three workers (SQLite)."""

    def __init__(self, backend: str, cwd, url: str, env: dict | None = None):
        self.backend = backend
        env = {**TTL, **(env or {})}
        if backend == "postgres":
            self.daemons = []
            for index in range(3):
                home = cwd / f"node{index}"
                home.mkdir(exist_ok=True)
                self.daemons.append(Daemon(home, url, env=dict(env)))
        else:
            self.daemons = [Daemon(cwd, url, args=("--workers", "3"), env=dict(env))]
        self._next = 0

    def start(self) -> Cluster:
        for daemon in self.daemons:
            daemon.start(timeout=60)
        if self.backend == "sqlite":
            wait_until(lambda: len(self.node_pids()) == 3, timeout=30)
        return self

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop(timeout=60)

    def node_pids(self) -> list[int]:
        """The pids of the three processes that run executions."""
        if self.backend == "postgres":
            return [daemon.process.pid for daemon in self.daemons if daemon.process.poll()
                    is None]
        return _children(self.daemons[0].process.pid)

    def any(self) -> Daemon:
        """A daemon to send a request to, in turn (one port for all workers on SQLite)."""
        live = [d for d in self.daemons if d.process.poll() is None]
        self._next += 1
        return live[self._next % len(live)]

    def lines(self) -> list[dict]:
        return [line for daemon in self.daemons for line in daemon.lines]


def _submit(cluster: Cluster, workflow: str, key: str):
    """POST a run as a careful client does: a 503 (busy, or a slow commit on a loaded
    machine) is retried with the same Idempotency-Key."""
    deadline = time.monotonic() + 60
    while True:
        reply = cluster.any().post(f"/api/v1/run/{workflow}", {},
                                   headers={"Idempotency-Key": key})
        if reply.status != 503 or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


# Records its pid in params.runs; the first run holds (until killed), a later one reports which
# earlier runs are still alive (not even a zombie), then ends.
HOLD_PLUGIN = """\
    #!{python}
    import json, os, sys, time
    runs = json.load(sys.stdin)["params"]["runs"]
    earlier = open(runs).read().split() if os.path.exists(runs) else []
    def alive(pid):
        try:
            stat = open(f"/proc/{{pid}}/stat").read()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    with open(runs, "a") as handle:
        handle.write(f"{{os.getpid()}}\\n")
    if not earlier:
        time.sleep(120)
    print(json.dumps({{"overlapped": [pid for pid in earlier if alive(int(pid))]}}))
"""


def _hold_plugin(cwd) -> str:
    """Install the ``hold`` plugin and a workflow running it; the file it records runs in."""
    folder = cwd / ".mantle" / "plugins"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hold"
    path.write_text(textwrap.dedent(HOLD_PLUGIN.format(python=sys.executable)))
    path.chmod(0o755)
    runs = cwd / "runs.txt"
    apply_yaml(f"""
        name: hold
        steps: [{{name: hold, action: hold/x, timeout: 5m, params: {{runs: "{runs}"}}}}]
    """)
    return str(runs)


def _runs(path: str) -> list[int]:
    try:
        with open(path) as handle:
            return [int(line) for line in handle.read().splitlines(keepends=True)
                    if line.endswith("\n")]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: it may wait for a slow reaper in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def _node_of(pid: int) -> str | None:
    row = Node.select(Node.id).where(Node.pid == pid).order_by(Node.started_at.desc()).first()
    return row.id if row else None


def _hits(target, path: str) -> Counter:
    counts: Counter = Counter()
    for received in target.requests(path):
        query = parse_qs(urlsplit(received.target).query)
        counts[query["e"][0]] += 1
    return counts


def test_killing_one_node_mid_run_loses_nothing_and_repeats_no_completed_step(
        bound, backend, http_target, tmp_path):
    for step in ("b", "c", "d"):
        http_target.route(f"/{step}", body=step, delay=0.3 if step == "b" else 0.0)
    url = http_target.url("")
    apply_yaml(f"""
        name: fan
        steps:
          - {{name: a, action: core/log, params: {{message: start}}}}
          - {{name: b, action: http/request, depends_on: [a],
             params: {{url: "{url}/b?e={{{{ execution.id }}}}"}}}}
          - {{name: c, action: http/request, depends_on: [a],
             params: {{url: "{url}/c?e={{{{ execution.id }}}}"}}}}
          - {{name: d, action: http/request, depends_on: [a],
             params: {{url: "{url}/d?e={{{{ execution.id }}}}"}}}}
          - {{name: e, action: core/log, depends_on: [b, c, d], params: {{message: end}}}}
    """)
    cluster = Cluster(backend, tmp_path, bound).start()
    try:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda n: _submit(cluster, "fan", f"fan-{n}"),
                                    range(FAN_EXECUTIONS)))
        assert {reply.status for reply in replies} <= {200, 202}
        ids = {reply.json["execution_id"] for reply in replies}
        wait_until(lambda: WorkflowExecution.select().where(
            WorkflowExecution.workflow_name == "fan",
            WorkflowExecution.status == "completed").count() >= FAN_EXECUTIONS // 3,
            timeout=60)
        victim = cluster.node_pids()[0]
        os.kill(victim, signal.SIGKILL)
        completed_at_kill = {(row.execution_id, row.step_name) for row in StepExecution.select()
                             .where(StepExecution.status == "completed")}
        running_at_kill = {(row.execution_id, row.step_name) for row in StepExecution.select()
                           .where(StepExecution.status == "running")}
        hits_at_kill = {step: _hits(http_target, f"/{step}") for step in ("b", "c", "d")}
        wait_until(lambda: WorkflowExecution.select().where(
            WorkflowExecution.workflow_name == "fan",
            WorkflowExecution.status == "completed").count() == FAN_EXECUTIONS, timeout=90,
            message="not every execution completed after the kill")
        owners = {row.owner for row in WorkflowExecution.select(WorkflowExecution.owner)}
    finally:
        cluster.stop()
    assert {row.id for row in WorkflowExecution.select()} == ids
    assert len(owners) >= 2, "all work landed on one node"
    for step in ("b", "c", "d"):
        hits = _hits(http_target, f"/{step}")
        for execution_id in ids:
            key = (execution_id, step)
            assert hits[execution_id] >= 1, key
            if key in completed_at_kill:
                assert hits[execution_id] == hits_at_kill[step][execution_id], \
                    f"completed {key} ran again"
            assert hits[execution_id] <= 1 + (key in running_at_kill), key
    attempts = Counter((row.execution_id, row.step_name) for row in StepExecution.select()
                       .where(StepExecution.status == "completed"))
    assert set(attempts.values()) == {1}


def test_a_node_paused_past_its_lease_has_its_late_writes_refused(
        bound, backend, http_target, tmp_path):
    http_target.route("/after")
    apply_yaml(f"""
        name: pausable
        steps:
          - {{name: nap, action: core/sleep, params: {{duration: 4s}}}}
          - {{name: after, action: http/request, depends_on: [nap],
             params: {{url: "{http_target.url('/after')}?e={{{{ execution.id }}}}"}}}}
    """)
    cluster = Cluster(backend, tmp_path, bound).start()
    try:
        target = cluster.daemons[0]
        ids = [target.post("/api/v1/run/pausable", {}).json["execution_id"] for _ in range(12)]
        wait_until(lambda: StepExecution.select().where(
            StepExecution.execution_id.in_(ids), StepExecution.step_name == "nap",
            StepExecution.status == "running").count() == len(ids), timeout=30)
        owners = Counter(WorkflowExecution.get_by_id(i).owner for i in ids)
        owner_node, _ = owners.most_common(1)[0]
        paused = Node.get_by_id(owner_node).pid
        mine = [i for i in ids if WorkflowExecution.get_by_id(i).owner == owner_node]
        os.kill(paused, signal.SIGSTOP)
        try:
            wait_until(lambda: all(WorkflowExecution.get_by_id(i).status == "completed"
                                   for i in ids), timeout=60,
                       message="the paused node's executions were not taken over")
        finally:
            os.kill(paused, signal.SIGCONT)
        wait_until(lambda: any(line.get("msg") == "execution lease lost"
                               for line in cluster.lines()), timeout=30,
                   message="the paused node never logged 'execution lease lost'")
        time.sleep(1.0)  # what the resumed node would still do, it does now
        hits = _hits(http_target, "/after")
        new_owners = {WorkflowExecution.get_by_id(i).owner for i in mine}
    finally:
        cluster.stop()
    assert owner_node not in new_owners
    assert all(hits[i] == 1 for i in ids), hits
    assert all(WorkflowExecution.get_by_id(i).status == "completed" for i in ids)


def test_a_process_with_its_predecessors_hostname_and_pid_resumes_its_executions(
        bound, backend, tmp_path):
    apply_yaml("""
        name: handed-on
        steps:
          - {name: nap, action: core/sleep, params: {duration: 2s}}
          - {name: done, action: core/log, depends_on: [nap], params: {message: done}}
    """)
    first = Daemon(tmp_path, bound, env=dict(TTL)).start()
    ids = [first.post("/api/v1/run/handed-on", {}).json["execution_id"] for _ in range(3)]
    wait_until(lambda: StepExecution.select().where(
        StepExecution.execution_id.in_(ids), StepExecution.status == "running").count() == 3)
    first.send(signal.SIGKILL)
    first.wait()
    predecessor = WorkflowExecution.get_by_id(ids[0]).owner
    second = Daemon(tmp_path, bound, env=dict(TTL)).start()
    try:
        # The predecessor looks exactly like the new process (a container restarted with the
        # same hostname and pid 1): only its node id differs, and its lease still runs.
        Node.update(hostname=socket.gethostname(), pid=second.process.pid, host_key="other",
                    lease_expires_at=utcnow() + dt.timedelta(seconds=3)
                    ).where(Node.id == predecessor).execute()
        started = time.monotonic()
        for execution_id in ids:
            second.wait_for_status(execution_id, ("completed",), timeout=20)
        took = time.monotonic() - started
    finally:
        second.stop()
    assert took < 3 + 3 + 5  # the lease, the ttl of the new scan, SPEC's 5 s
    assert {WorkflowExecution.get_by_id(i).owner for i in ids} != {predecessor}


# Up to a minute waiting for the first boundary, 35 s into the last, and three nodes to start
# and stop: about 100 s at the worst second of the minute in CI, near the default 120 s.
@pytest.mark.timeout(CRON_MINUTES * 60 + 180)
def test_cron_fires_once_per_minute_across_three_nodes(bound, backend, tmp_path):
    """``MANTLE_CRON_MINUTES`` minute boundaries (1 in CI, 3 at full size)."""
    apply_yaml("""
        name: every-minute
        triggers: [{type: cron, schedule: "* * * * *"}]
        steps: [{name: tick, action: core/log, params: {message: tick}}]
    """)
    cluster = Cluster(backend, tmp_path, bound).start()
    try:
        first = int(time.time() // 60) + 1
        last = first + CRON_MINUTES - 1
        # SPEC 8: a minute fires within 30 s of its start; look 35 s into the last one.
        wait_until(lambda: time.time() >= last * 60 + 35, timeout=(CRON_MINUTES + 2) * 60,
                   interval=0.5)
        fired = Counter(_minute(row.started_at) for row in WorkflowExecution.select().where(
            WorkflowExecution.workflow_name == "every-minute"))
    finally:
        cluster.stop()
    assert [fired[minute] for minute in range(first, last + 1)] == [1] * CRON_MINUTES, fired


def _minute(stamp: dt.datetime) -> int:
    return int(stamp.replace(tzinfo=dt.timezone.utc).timestamp() // 60)


def test_an_in_process_run_paused_past_its_lease_while_a_daemon_runs_repeats_no_step(
        bound, backend, http_target, tmp_path):
    http_target.route("/after")
    apply_yaml(f"""
        name: cli-paused
        steps:
          - {{name: nap, action: core/sleep, params: {{duration: 2s}}}}
          - {{name: after, action: http/request, depends_on: [nap],
             params: {{url: "{http_target.url('/after')}"}}}}
    """)
    daemon = Daemon(tmp_path, bound, env=dict(TTL)).start()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
           "PYTHONUNBUFFERED": "1", **TTL}
    runner = subprocess.Popen([sys.executable, "-m", "mantle", "run", "cli-paused",
                               "--database-url", bound], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        row = wait_until(lambda: WorkflowExecution.get_or_none(
            WorkflowExecution.workflow_name == "cli-paused"), timeout=30)
        wait_until(lambda: StepExecution.select().where(
            StepExecution.execution_id == row.id, StepExecution.status == "running").exists())
        runner.send_signal(signal.SIGSTOP)
        try:
            daemon.wait_for_status(row.id, ("completed",), timeout=30)
        finally:
            runner.send_signal(signal.SIGCONT)
        out, err = runner.communicate(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
        daemon.stop()
    assert runner.returncode == 0, err
    assert out.splitlines()[-1] == f"Execution {row.id}: completed"
    assert len(http_target.requests("/after")) == 1
    assert WorkflowExecution.get_by_id(row.id).owner != _node_of(runner.pid)


def test_a_cancel_sent_to_a_node_that_does_not_own_the_execution_reaches_the_owner(
        bound, backend, tmp_path, capsys):
    apply_yaml("""
        name: long-nap
        steps: [{name: nap, action: core/sleep, params: {duration: 60s}}]
    """)
    cluster = Cluster(backend, tmp_path, bound).start()
    latencies = []
    try:
        ids = [cluster.any().post("/api/v1/run/long-nap", {}).json["execution_id"]
               for _ in range(30)]
        wait_until(lambda: StepExecution.select().where(
            StepExecution.execution_id.in_(ids), StepExecution.status == "running"
        ).count() == len(ids), timeout=30)
        for execution_id in ids:
            owner = WorkflowExecution.get_by_id(execution_id).owner
            sender = cluster.any()
            if backend == "postgres":  # pick a daemon that is not the owner
                sender = next(d for d in cluster.daemons if _node_of(d.process.pid) != owner)
            sent = time.time()
            assert sender.post(f"/api/v1/cancel/{execution_id}").status == 200
            step = wait_until(lambda: StepExecution.get_or_none(
                StepExecution.execution_id == execution_id,
                StepExecution.status == "cancelled"), timeout=5, interval=0.005)
            done = step.completed_at.replace(tzinfo=dt.timezone.utc).timestamp()
            latencies.append((done - sent) * 1000)
    finally:
        cluster.stop()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    with capsys.disabled():
        print(f"\ncancel to a non-owner [{backend}]: {len(latencies)} cancels, "
              f"p50 {latencies[len(latencies) // 2]:.1f} ms, p99 {p99:.1f} ms")
    assert max(latencies) < 1000  # the SPEC's 50 ms p99 is measured by bench/ (quiet machine)


def test_exactly_one_child_per_parent_step_attempt_across_a_crash(bound, backend, tmp_path):
    """SPEC 13.3: after a SIGKILL while the child runs, the resumed parent step awaits the
    child it created before instead of creating another."""
    apply_yaml("""
        name: slow-kid
        steps: [{name: nap, action: core/sleep, params: {duration: 2s}}]
    """)
    apply_yaml("""
        name: parent
        steps:
          - {name: child, action: workflow/run, params: {workflow: slow-kid}}
          - {name: after, action: core/log, depends_on: [child],
             params: {message: "{{ steps.child.output.status }}"}}
    """)
    daemon = Daemon(tmp_path, bound, env=dict(TTL)).start()
    parent = daemon.post("/api/v1/run/parent", {}).json["execution_id"]
    wait_until(lambda: StepExecution.select().join(WorkflowExecution).where(
        WorkflowExecution.parent_execution_id == parent,
        StepExecution.status == "running").exists(), timeout=20)
    daemon.send(signal.SIGKILL)
    daemon.wait()
    again = Daemon(tmp_path, bound, env=dict(TTL)).start()
    try:
        detail = again.wait_for_status(parent, timeout=30)
    finally:
        again.stop()
    children = list(WorkflowExecution.select().where(
        WorkflowExecution.parent_execution_id == parent))
    assert len(children) == 1
    assert detail["status"] == "completed", detail
    steps = {step["name"]: step for step in detail["steps"]}
    assert steps["child"]["output"]["execution_id"] == children[0].id
    assert steps["after"]["output"] == {"message": "completed"}


def test_idempotency_keys_and_limits_hold_across_nodes(bound, backend, tmp_path):
    """SPEC 13.7: limits (4.9) and idempotency keys are global, whichever node a request
    reaches."""
    apply_yaml("""
        name: one-at-a-time
        max_parallel_executions: 1
        steps: [{name: nap, action: core/sleep, params: {duration: 300ms}}]
    """)
    cluster = Cluster(backend, tmp_path, bound).start()
    try:
        targets = cluster.daemons * (12 // len(cluster.daemons))
        with ThreadPoolExecutor(12) as pool:
            same_key = list(pool.map(lambda d: d.post(
                "/api/v1/run/one-at-a-time", {}, headers={"Idempotency-Key": "only-once"}),
                targets))
        assert {reply.status for reply in same_key} <= {200, 202}
        assert len({reply.json["execution_id"] for reply in same_key}) == 1
        with ThreadPoolExecutor(8) as pool:
            ids = [reply.json["execution_id"] for reply in pool.map(
                lambda _: cluster.any().post("/api/v1/run/one-at-a-time", {}), range(8))]
        most, deadline = 0, time.monotonic() + 60
        while time.monotonic() < deadline:
            statuses = Counter(row.status for row in WorkflowExecution.select().where(
                WorkflowExecution.workflow_name == "one-at-a-time"))
            most = max(most, statuses["running"])
            if statuses["completed"] == len(ids) + 1:
                break
            time.sleep(0.05)
    finally:
        cluster.stop()
    assert statuses["completed"] == len(ids) + 1, statuses
    assert most == 1


def test_a_plugin_dies_with_the_daemon_that_started_it(bound, tmp_path):
    """A SIGKILLed (or OOM-killed) daemon runs no code: its plugin must still not outlive it,
    or it runs on unsupervised (no timeout, no cancel) while the attempt is resumed."""
    runs = _hold_plugin(tmp_path)
    daemon = Daemon(tmp_path, bound, env=dict(TTL)).start()
    pids = []
    try:
        daemon.post("/api/v1/run/hold", {})
        pids = wait_until(lambda: _runs(runs), timeout=20)
        assert _parent_of(pids[0]) == daemon.process.pid
        daemon.send(signal.SIGKILL)
        daemon.wait()
        wait_until(lambda: not _alive(pids[0]), timeout=5,
                   message="the plugin outlived the daemon that started it")
    finally:
        daemon.stop()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_killed_workers_plugin_never_runs_alongside_the_resumed_attempt(
        bound, tmp_path):
    """``serve --workers 2``: SIGKILL the worker whose plugin runs; its sibling takes the
    execution over at once and runs the step again, with the first plugin already dead."""
    runs = _hold_plugin(tmp_path)
    daemon = Daemon(tmp_path, bound, args=("--workers", "2"), env=dict(TTL)).start(timeout=60)
    pids = []
    try:
        wait_until(lambda: len(_children(daemon.process.pid)) == 2, timeout=30)
        execution_id = daemon.post("/api/v1/run/hold", {}).json["execution_id"]
        pids = wait_until(lambda: _runs(runs), timeout=20)
        worker = _parent_of(pids[0])
        assert worker in _children(daemon.process.pid)
        os.kill(worker, signal.SIGKILL)
        detail = daemon.wait_for_status(execution_id, timeout=60)
        pids = _runs(runs)
    finally:
        daemon.stop(timeout=60)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert detail["status"] == "completed", detail
    assert len(pids) == 2, pids
    step = {step["name"]: step for step in detail["steps"]}["hold"]
    assert step["output"] == {"overlapped": []}, "the killed worker's plugin still ran"
