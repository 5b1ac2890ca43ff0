"""Mixed crash soak (issue 11; SPEC 4.9, 4.11, 13.1 items 8, 10, 11): SIGKILL a real
``mantle serve`` again and again while executions are queued under a limit, a
``max_parallel`` step retries, hooks run and a long sleep waits.

Two workflows on one local counting HTTP server:

- ``soak-mixed``: ``max_parallel_executions: 2`` with ``on_limit: queue``; a slow ``fetch``
  step, then ``limited`` (``max_parallel: 1``, three attempts; the server answers each
  execution's first call with 500, so every execution retries once), and an ``on_finish``
  hook. Executions are submitted over REST in batches with an ``Idempotency-Key`` (resent
  after a restart when the answer was lost).
- ``soak-sleep``: one ``core/sleep`` long enough to span several kills.

Each kill lands at a seeded pseudo-random moment once a step of the current batch runs; the
daemon is restarted on the same database. Meanwhile a thread samples the running executions
through the API every 50 ms. At the end: no execution lost or stuck, the limit never
exceeded, ``limited`` never called twice at once, no completed step or hook called again, and
the sleep's wall time within 10 % of its duration.

Size: ``MANTLE_SOAK_KILLS`` (default 4, as the first soak), ``MANTLE_SOAK_MIXED_EXECUTIONS``
(default 12), ``MANTLE_SOAK_SLEEP`` (seconds, default 20); ``MANTLE_SOAK_SEED`` picks the
moments. See docs/guarantees.md.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

from mantle.db.models import StepExecution, WorkflowExecution
from tests.helpers.sampling import RunningSampler
from tests.web.support import Daemon, apply_yaml, wait_until

KILLS = int(os.environ.get("MANTLE_SOAK_KILLS", "4"))
EXECUTIONS = int(os.environ.get("MANTLE_SOAK_MIXED_EXECUTIONS", "12"))
SLEEP = float(os.environ.get("MANTLE_SOAK_SLEEP", "20"))
SEED = int(os.environ.get("MANTLE_SOAK_SEED", "6"))
LIMIT = 2
CALLS = ("fetch", "limited", "hook")  # the paths called, one per step or hook


def _workflows(target) -> tuple[str, str]:
    def url(path: str) -> str:
        return f"{target.url('/' + path)}?e={{{{ execution.id }}}}"

    mixed = f"""
        name: soak-mixed
        max_parallel_executions: {LIMIT}
        on_limit: queue
        steps:
          - {{name: fetch, action: http/request, params: {{url: "{url('fetch')}"}}}}
          - {{name: limited, action: http/request, depends_on: [fetch], max_parallel: 1,
             retry: {{max_attempts: 3}}, params: {{url: "{url('limited')}"}}}}
        hooks:
          on_finish:
            - {{name: hook, action: http/request, params: {{url: "{url('hook')}"}}}}
    """
    sleep = f"""
        name: soak-sleep
        steps:
          - {{name: nap, action: core/sleep, params: {{duration: {SLEEP:g}s}}}}
    """
    return mixed, sleep


class Soak:
    """The daemon, what was submitted, and what the database held at each kill."""

    def __init__(self, cwd, url, target):
        self.cwd, self.url, self.target = cwd, url, target
        self.daemon: Daemon | None = None
        self.accepted: dict[str, str] = {}  # idempotency key -> execution id
        self.unanswered: list[str] = []
        self.lock = threading.Lock()
        self.completed_at_kill: dict[tuple[str, str], int] = {}  # (id, call) -> hits then
        self.running_at_kills: Counter = Counter()  # (id, call) -> kills that caught it
        self.caught = Counter()  # what the kills caught: step, hook, backoff, queued, sleep

    def start(self) -> None:
        self.daemon = Daemon(self.cwd, self.url).start(timeout=60)

    def base_url(self) -> str | None:
        daemon = self.daemon
        return daemon.url if daemon and daemon.port and daemon.process.poll() is None \
            else None

    def submit(self, keys: list[str]) -> None:
        daemon = self.daemon

        def one(key):
            try:
                reply = daemon.post("/api/v1/run/soak-mixed", {},
                                    headers={"Idempotency-Key": key})
            except OSError:
                with self.lock:
                    self.unanswered.append(key)
                return
            assert reply.status in (200, 202), (reply.status, reply.body)
            with self.lock:
                previous = self.accepted.setdefault(key, reply.json["execution_id"])
            assert previous == reply.json["execution_id"], f"key {key} got two executions"

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, keys))

    def kill(self) -> None:
        self.daemon.send(signal.SIGKILL)
        self.daemon.wait(30)
        self._snapshot()

    def _snapshot(self) -> None:
        """With the daemon dead: which calls the database holds completed or running."""
        hits = self.hits()
        rows = StepExecution.select(StepExecution.execution_id, StepExecution.step_name,
                                    StepExecution.status, StepExecution.is_hook,
                                    StepExecution.wait_kind)
        for row in rows:
            key = (row.execution_id, row.step_name)
            if row.status == "completed":
                self.completed_at_kill.setdefault(key, hits[key])
            elif row.status == "running":
                self.running_at_kills[key] += 1
                kind = "sleep" if row.step_name == "nap" else (
                    "backoff" if row.wait_kind == "retry" else
                    "hook" if row.is_hook else "step")
                self.caught[kind] += 1
        queued = WorkflowExecution.select().where(WorkflowExecution.status == "pending").count()
        self.caught["queued"] += queued

    def hits(self) -> Counter:
        counts: Counter = Counter()
        for call in CALLS:
            for received in self.target.requests(f"/{call}"):
                execution_id = parse_qs(urlsplit(received.target).query)["e"][0]
                counts[(execution_id, call)] += 1
        return counts


def _mid_step() -> bool:
    """Whether an execution of ``soak-mixed`` has a step or hook running (or in back-off)."""
    return (StepExecution.select().join(WorkflowExecution)
            .where(WorkflowExecution.workflow_name == "soak-mixed",
                   StepExecution.status == "running").exists())


def _final_details(soak: Soak, ids: set[str], deadline: float) -> tuple[dict, set[str]]:
    """The detail of every execution once final, and the ids still not final at the
    deadline (stuck)."""
    details: dict[str, dict] = {}
    while time.monotonic() < deadline and len(details) < len(ids):
        for execution_id in ids - set(details):
            detail = soak.daemon.get(f"/api/v1/executions/{execution_id}").json
            if detail["status"] in ("completed", "failed", "cancelled"):
                details[execution_id] = detail
        time.sleep(0.2)
    return details, ids - set(details)


def test_sigkills_under_limits_retries_hooks_and_a_long_sleep_lose_nothing(
        bound, backend, http_target, tmp_path, capsys):
    http_target.route("/fetch", body="fetched", delay=0.3)
    http_target.route("/limited", body="limited", delay=0.1, fail_first=1)
    http_target.route("/hook", body="hooked", delay=0.2)
    mixed, sleep = _workflows(http_target)
    apply_yaml(mixed)
    apply_yaml(sleep)
    rng = random.Random(SEED)
    soak = Soak(tmp_path, bound, http_target)
    keys = [f"mixed-{i}" for i in range(EXECUTIONS)]
    batches = [keys[k::KILLS] for k in range(KILLS)]
    started = time.monotonic()
    soak.start()
    sampler = RunningSampler(soak.base_url, "soak-mixed").__enter__()
    try:
        nap = soak.daemon.post("/api/v1/run/soak-sleep", {}).json["execution_id"]
        for batch in batches:
            retry, soak.unanswered = soak.unanswered, []
            submitter = threading.Thread(target=soak.submit, args=(retry + batch,))
            submitter.start()
            wait_until(_mid_step, timeout=60, interval=0.01,
                       message="no step started before the kill")
            time.sleep(rng.uniform(0, 1.0))  # the pseudo-random moment of this kill
            soak.kill()
            submitter.join(60)
            soak.start()
        while soak.unanswered:
            retry, soak.unanswered = soak.unanswered, []
            soak.submit(retry)
        ids = set(soak.accepted.values())
        details, stuck = _final_details(soak, ids | {nap},
                                        time.monotonic() + 60 + SLEEP + EXECUTIONS * 2)
    finally:
        sampler.stop()
        soak.daemon.stop(timeout=30)
    hits = soak.hits()
    # From the execution's creation to the sleep's end: the whole wall time, whatever a
    # resume wrote as the attempt's start.
    nap_row = StepExecution.get(StepExecution.execution_id == nap)
    created = WorkflowExecution.get_by_id(nap).started_at
    nap_wall = (nap_row.completed_at - created).total_seconds() \
        if nap_row.completed_at else float("inf")
    rows = list(WorkflowExecution.select().where(WorkflowExecution.workflow_name == "soak-mixed"))
    failures = [d for d in details.values() if d["status"] != "completed"]
    lost = EXECUTIONS - len(ids)
    reruns = sum(count - 1 for (_, call), count in hits.items() if call != "limited"
                 and count > 1)
    retries = sum(1 for d in details.values() for s in d["steps"]
                  if s["name"] == "limited" and s["attempt"] > 1)
    with capsys.disabled():
        print(f"\nmixed crash soak [{backend}] seed={SEED} {time.monotonic() - started:.1f}s\n"
              f"  {'executions':<22}{EXECUTIONS} queued under a limit of {LIMIT}, 1 sleep\n"
              f"  {'kills':<22}{KILLS} (caught: {soak.caught['step']} steps, "
              f"{soak.caught['hook']} hooks, {soak.caught['backoff']} in a retry, "
              f"{soak.caught['queued']} queued, {soak.caught['sleep']} in the sleep)\n"
              f"  {'executions lost':<22}{lost}\n  {'stuck':<22}{len(stuck)}\n"
              f"  {'failures':<22}{len(failures)}\n"
              f"  {'most running':<22}{sampler.most_running} (limit {LIMIT}, "
              f"{len(sampler.samples)} samples)\n"
              f"  {'limited step peak':<22}{http_target.peak('/limited')} (max_parallel 1, "
              f"{retries} retried)\n"
              f"  {'steps/hooks re-run':<22}{reruns}\n"
              f"  {'completed at a kill':<22}{len(soak.completed_at_kill)} (none re-ran)\n"
              f"  {'sleep':<22}{nap_wall:.1f}s for {SLEEP:g}s "
              f"({abs(nap_wall - SLEEP) / SLEEP * 100:.1f} % off)")
    assert len(soak.accepted) == EXECUTIONS and lost == 0
    assert len(rows) == len(ids) and {r.id for r in rows} == ids  # no duplicate, none extra
    assert stuck == set(), f"{len(stuck)} executions never ended: {sorted(stuck)}"
    assert failures == [], failures
    assert sampler.over(LIMIT) == [], "more executions ran than the limit allows"
    assert len(sampler.samples) > 10 * KILLS
    assert http_target.peak("/limited") == 1  # max_parallel held across retries and kills
    for detail in (details[i] for i in ids):
        assert [(h["name"], h["status"]) for h in detail["hooks"]] == [("hook", "completed")]
    for key, count in hits.items():
        if key in soak.completed_at_kill:
            assert count == soak.completed_at_kill[key], f"completed {key} ran again"
    for execution_id in ids:
        for call in ("fetch", "hook"):  # called once, plus once per kill that caught it
            key = (execution_id, call)
            assert 1 <= hits[key] <= 1 + soak.running_at_kills[key], (key, hits[key])
    assert details[nap]["status"] == "completed"
    assert abs(nap_wall - SLEEP) <= 0.1 * SLEEP, f"the {SLEEP:g}s sleep took {nap_wall:.1f}s"
    assert soak.caught["step"] + soak.caught["hook"] + soak.caught["backoff"] >= 1  # mid-step kills
