"""W1 throughput against the number of `mantle serve` workers, for a machine with many cores.

Issue 12 asks for near-linear growth with cores until the database is the limit. `run.py`
drives every workload from one client process of 16 threads, which is right on the 2-core
development machine (the client must take little CPU from the daemon) but would itself be
the limit on a bigger one: a client thread pool is bound by its GIL at a few thousand
requests a second. Here the runs are sent by several client processes, each with its own
threads and keep-alive connections, and each worker count gets a fresh daemon:

    python bench/scaling.py                          # workers 1,2,4,8,12 on SQLite
    python bench/scaling.py --workers 1,2,4 --n 2000 --clients 2
    python bench/scaling.py --postgres               # PostgreSQL 15 binaries needed

For each count it prints executions/s (median of ``--reps``), the daemon's CPU per
execution (all its processes), the speed-up over the first count, and the cores the
machine has; ``--out`` writes the figures as JSON. Nothing is judged here: the goal
(near-linear growth until the database is the limit) is read off the speed-up column.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon import Client, Daemon, PostgresServer  # noqa: E402
from run import WORKFLOWS  # noqa: E402
from workloads import _completed, _unsuccessful, _wait_final  # noqa: E402

def _send(port: int, workflow: str, n: int, threads: int, start, results) -> None:
    """One client process: warm a keep-alive connection per thread, wait for the others,
    send ``n`` runs; puts {execution id: send time} on ``results``."""
    client = Client(port)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: client.request("GET", "/healthz"), range(threads * 4)))
        start.wait(timeout=60)

        def trigger(_):
            sent = time.time()
            status, body = client.request("POST", f"/api/v1/run/{workflow}")
            if status != 202:
                raise RuntimeError(f"run answered {status}: {body}")
            return body["execution_id"], sent

        results.put(dict(pool.map(trigger, range(n))))


def w1(daemon: Daemon, n: int, clients: int, threads: int) -> dict:
    """``n`` W1 executions sent by ``clients`` processes of ``threads`` threads; throughput
    and CPU per execution."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(clients + 1), context.Queue()
    shares = [n // clients + (1 if index < n % clients else 0) for index in range(clients)]
    senders = [context.Process(target=_send, args=(daemon.client.port, "w1", share, threads,
                                                   start, results))
               for share in shares]
    for sender in senders:
        sender.start()
    start.wait(timeout=120)
    cpu = daemon.cpu_seconds()
    sent: dict[str, float] = {}
    for _ in senders:
        sent.update(results.get(timeout=300))
    for sender in senders:
        sender.join(30)
    _wait_final(daemon, "w1", timeout=300)
    cpu = daemon.cpu_seconds() - cpu
    done = _completed(daemon, "w1", sent)  # the newest 1,000: the end of the run
    wall = max(done.values()) - min(sent.values())
    return {"n": n, "completed": _unsuccessful(daemon, "w1", sent) == 0,
            "exec_per_s": round(n / wall, 1), "cpu_ms_per_exec": round(cpu * 1000 / n, 3)}


def measure(counts: list[int], n: int, reps: int, clients: int, threads: int,
            database_url: str | None) -> dict[int, dict]:
    figures = {}
    for count in counts:
        with Daemon(WORKFLOWS, database_url=database_url, workers=count) as daemon:
            w1(daemon, min(n, 300 * count), clients, threads)  # warm-up: every worker serves
            runs = [w1(daemon, n, clients, threads) for _ in range(reps)]
        figures[count] = {
            "exec_per_s": statistics.median(r["exec_per_s"] for r in runs),
            "cpu_ms_per_exec": statistics.median(r["cpu_ms_per_exec"] for r in runs),
            "completed": all(r["completed"] for r in runs),
            "all": [r["exec_per_s"] for r in runs]}
        print(f"  --workers {count}: {figures[count]}", file=sys.stderr, flush=True)
        if database_url and database_url.startswith("postgresql"):
            _empty(database_url)
    return figures


def _empty(url: str) -> None:
    """A fresh daemon per count on SQLite gets a fresh file; on PostgreSQL the tables are
    emptied so that every count starts from the same database size."""
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE step_executions, audit_events, workflow_executions CASCADE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4,8,12",
                        help="worker counts, comma-separated (default 1,2,4,8,12)")
    parser.add_argument("--n", type=int, default=3000, help="executions per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=16,
                        help="threads (requests in flight) per client process")
    parser.add_argument("--postgres", action="store_true",
                        help="a throwaway PostgreSQL 15 instead of SQLite")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    print(f"scaling: W1 x {args.n}, median of {args.reps}, {args.clients} client "
          f"processes x {args.threads} threads, {os.cpu_count()} cores, "
          f"{'PostgreSQL' if args.postgres else 'SQLite'}", file=sys.stderr, flush=True)
    if args.postgres:
        with PostgresServer() as server:
            figures = measure(counts, args.n, args.reps, args.clients, args.threads,
                              server.url)
    else:
        figures = measure(counts, args.n, args.reps, args.clients, args.threads, None)
    base = figures[counts[0]]["exec_per_s"]
    print(f"{'workers':>8} {'executions/s':>13} {'CPU/exec ms':>12} {'speed-up':>9}"
          f"  (cores: {os.cpu_count()})")
    for count in counts:
        f = figures[count]
        print(f"{count:>8} {f['exec_per_s']:>13,.0f} {f['cpu_ms_per_exec']:>12.2f} "
              f"{f['exec_per_s'] / base:>8.2f}x{'' if f['completed'] else '  INCOMPLETE'}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"cores": os.cpu_count(), "n": args.n, "clients": args.clients,
                       "threads": args.threads,
                       "postgres": args.postgres, "workers": figures}, handle, indent=2)
    return 0 if all(f["completed"] for f in figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
