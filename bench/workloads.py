"""The benchmark workloads (definitions in ../shared/bench/README.md), driven over REST."""

from __future__ import annotations

import datetime as dt
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from daemon import Daemon, RssSampler

__all__ = ["throughput_workload", "sleepers_workload", "cancel_workload", "percentile",
           "client_pool"]

CLIENT_THREADS = 16


def percentile(values: list[float], p: float) -> float:
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def client_pool(daemon: Daemon) -> ThreadPoolExecutor:
    """The daemon's client thread pool, each thread holding an open keep-alive connection.

    Like any REST client under load, the pool and its connections outlive one batch of
    requests: connecting is not part of what a workload measures.
    """
    pool = getattr(daemon, "pool", None)
    if pool is None:
        pool = daemon.pool = ThreadPoolExecutor(CLIENT_THREADS)
        everyone = threading.Barrier(CLIENT_THREADS)  # one warm-up request on every thread

        def connect(_):
            everyone.wait(timeout=30)
            return daemon.client.request("GET", "/healthz")[0]

        assert set(pool.map(connect, range(CLIENT_THREADS))) == {200}
    return pool


def _trigger_all(daemon: Daemon, workflow: str, n: int) -> dict[str, float]:
    """POST n runs from the client pool; {execution id: send time}."""
    def trigger(_):
        sent = time.time()
        status, body = daemon.client.request("POST", f"/api/v1/run/{workflow}")
        if status != 202:
            raise RuntimeError(f"run answered {status}: {body}")
        return body["execution_id"], sent

    return dict(client_pool(daemon).map(trigger, range(n)))


def _wait_final(daemon: Daemon, workflow: str, timeout: float) -> None:
    """Poll the list endpoint until no execution of ``workflow`` is pending or running.

    Every 50 ms: figures come from the server's own ``completed_at``, so a slower poll costs
    no accuracy, while a 10 ms one took a tenth of the daemon's time away from what it
    measures.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(daemon.client.request(
                "GET", f"/api/v1/executions?workflow={workflow}&status={status}&limit=1")[1][
                "executions"] for status in ("running", "pending")):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{workflow}: executions still running after {timeout}s")


def _step_settled(daemon: Daemon, execution_id: str, deadline: float) -> dict:
    """The execution's detail once its step is final. A cancel commits the execution's
    status at once; the owner records the step when it has interrupted it, within 50 ms
    (SPEC 4.6, 13.7), and that moment is what W4 measures."""
    while True:
        _, detail = daemon.client.request("GET", f"/api/v1/executions/{execution_id}")
        steps = detail["steps"]
        if (steps and steps[0]["status"] not in ("pending", "running")) \
                or time.monotonic() > deadline:
            return detail
        time.sleep(0.05)


def _completed(daemon: Daemon, workflow: str, ids) -> dict[str, float]:
    """{id: completed_at epoch} of the newest 1000 completed executions among ``ids``."""
    _, body = daemon.client.request(
        "GET", f"/api/v1/executions?workflow={workflow}&status=completed&limit=1000")
    return {e["id"]: _epoch(e["completed_at"]) for e in body["executions"] if e["id"] in ids}


def _unsuccessful(daemon: Daemon, workflow: str, ids) -> int:
    """How many of ``ids`` ended failed or cancelled (call once none is pending/running)."""
    count = 0
    for status in ("failed", "cancelled"):
        _, body = daemon.client.request(
            "GET", f"/api/v1/executions?workflow={workflow}&status={status}&limit=1000")
        count += sum(1 for e in body["executions"] if e["id"] in ids)
    return count


def throughput_workload(daemon: Daemon, workflow: str, n: int, steps: int) -> dict:
    cpu = daemon.cpu_seconds()
    sent = _trigger_all(daemon, workflow, n)
    _wait_final(daemon, workflow, timeout=120)
    cpu = daemon.cpu_seconds() - cpu
    done = _completed(daemon, workflow, sent)
    wall = max(done.values()) - min(sent.values())
    latencies = [done[i] - sent[i] for i in done]  # the newest 1000 when n > 1000
    return {"n": n, "completed": _unsuccessful(daemon, workflow, sent) == 0,
            "wall_s": round(wall, 3), "cpu_ms_per_exec": round(cpu * 1000 / n, 3),
            "exec_per_s": round(n / wall, 1), "steps_per_s": round(n * steps / wall, 1),
            "lat_p50_ms": round(percentile(latencies, 50) * 1000, 2),
            "lat_p99_ms": round(percentile(latencies, 99) * 1000, 2)}


def sleepers_workload(daemon: Daemon, workflow: str, n: int) -> dict:
    with RssSampler(daemon.proc.pid) as rss:
        sent = _trigger_all(daemon, workflow, n)
        _wait_final(daemon, workflow, timeout=120)
    done = _completed(daemon, workflow, sent)
    finished = n - _unsuccessful(daemon, workflow, sent)
    return {"n": n, "finished": finished, "all_finished": finished == n,
            "wall_s": round(max(done.values()) - min(sent.values()), 3),
            "peak_rss_mb": round(rss.peak_mib, 1)}


def cancel_workload(daemon: Daemon, workflow: str, n: int) -> dict:
    ids = list(_trigger_all(daemon, workflow, n))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # all running, their sleep step started
        _, body = daemon.client.request(
            "GET", f"/api/v1/executions?workflow={workflow}&status=running&limit=1000")
        if len({e["id"] for e in body["executions"]} & set(ids)) == n:
            break
        time.sleep(0.02)
    time.sleep(0.2)  # as the floor does: let the last steps begin their sleep

    owners = daemon.owners(ids) if daemon.workers > 1 else {}

    def cancel(execution_id):
        sent = time.time()
        status, _, node = daemon.client.exchange("POST", f"/api/v1/cancel/{execution_id}")
        return execution_id, sent, status, node

    cancels = {i: (sent, node) for i, sent, status, node
               in client_pool(daemon).map(cancel, ids) if status == 200}
    _wait_final(daemon, workflow, timeout=30)
    # The step's completed_at is written when its interrupted attempt is checkpointed
    # (server clock, same machine): no client polling sits in the measured path.
    latencies, elsewhere = [], []
    for execution_id, (sent, node) in cancels.items():
        detail = _step_settled(daemon, execution_id, deadline=time.monotonic() + 5)
        step = detail["steps"][0]
        if detail["status"] == "cancelled" and step["status"] == "cancelled":
            latency = _epoch(step["completed_at"]) - sent
            latencies.append(latency)
            if owners and node != owners.get(execution_id):
                elsewhere.append(latency)  # sent to a worker that did not own it
    result = {"n": n, "all_cancelled": len(latencies) == n,
              "cancel_p50_ms": round(percentile(latencies, 50) * 1000, 2),
              "cancel_p99_ms": round(percentile(latencies, 99) * 1000, 2)}
    if elsewhere:
        result.update(non_owner=len(elsewhere),
                      non_owner_p99_ms=round(percentile(elsewhere, 99) * 1000, 2))
    return result
