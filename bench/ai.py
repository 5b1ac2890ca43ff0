"""AI steps under load: 200 concurrent ``ai/completion`` steps through a real ``mantle serve``.

A fake OpenAI-compatible server (tests/helpers/fake_openai.py, in this process) answers every
chat completion after ``--delay`` seconds (1 s). Two shapes, each on a fresh daemon:

- ``executions``: ``--n`` executions of a one-step workflow, triggered over REST by 16 client
  threads; wall = last execution's ``completed_at`` minus the first run request;
- ``fan-out``: one execution whose ``--n`` steps are all ``ai/completion`` with no
  dependencies; wall = its ``completed_at`` minus the run request.

The daemon's peak RSS and peak thread count are sampled from /proc every 20 ms, and the fake
records how many requests it held at once. Goal (issue 14): wall <= 2 s with bounded threads
and memory.

    python bench/ai.py                  # n=200, delay 1 s
    python bench/ai.py --smoke          # n=5, delay 0.2 s; checks only that all completes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from daemon import Daemon, RssSampler  # noqa: E402
from workloads import _completed, _epoch, _trigger_all, _unsuccessful, _wait_final  # noqa: E402

from tests.helpers.fake_openai import FakeOpenAI, text  # noqa: E402

WALL_GOAL_S = 2.0


class ProcessSampler(RssSampler):
    """Peak RSS (process and children) and peak thread count of the daemon process."""

    def __init__(self, pid: int):
        super().__init__(pid)
        self.peak_threads = 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mib = max(self.peak_mib, self.current_mib())
            self.peak_threads = max(self.peak_threads, self.threads())

    def threads(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as handle:
                for line in handle:
                    if line.startswith("Threads:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0


class Fake(FakeOpenAI):
    """The fake server answering every completion after ``delay``, counting requests held."""

    def __init__(self, delay: float):
        super().__init__()
        self.in_flight = self.peak_in_flight = 0
        self._count_lock = threading.Lock()
        self.respond(self._answer)
        self._delay = delay

    def _answer(self, _request):
        with self._count_lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        time.sleep(self._delay)
        with self._count_lock:
            self.in_flight -= 1
        return text("ok", usage=(12, 3))


def _step(base_url: str, name: str = "ask") -> str:
    return (f"{{name: {name}, action: ai/completion, params: {{base_url: \"{base_url}\", "
            f"model: bench-model, prompt: \"Say ok\"}}}}")


def workflows(base_url: str, n: int) -> dict[str, str]:
    fan_out = ", ".join(_step(base_url, f"ask-{i}") for i in range(n))
    return {"ai-one": f"name: ai-one\nsteps: [{_step(base_url)}]\n",
            "ai-fanout": f"name: ai-fanout\nsteps: [{fan_out}]\n"}


def executions_shape(daemon: Daemon, n: int) -> dict:
    with ProcessSampler(daemon.proc.pid) as sampler:
        sent = _trigger_all(daemon, "ai-one", n)
        _wait_final(daemon, "ai-one", timeout=120)
    done = _completed(daemon, "ai-one", sent)
    failed = _unsuccessful(daemon, "ai-one", sent)
    return {"shape": "executions", "n": n, "completed": len(done), "failed": failed,
            "wall_s": round(max(done.values()) - min(sent.values()), 3),
            "peak_rss_mib": round(sampler.peak_mib, 1), "peak_threads": sampler.peak_threads}


def fan_out_shape(daemon: Daemon, n: int) -> dict:
    with ProcessSampler(daemon.proc.pid) as sampler:
        sent = _trigger_all(daemon, "ai-fanout", 1)
        _wait_final(daemon, "ai-fanout", timeout=120)
    [(execution_id, started)] = sent.items()
    _, detail = daemon.client.request("GET", f"/api/v1/executions/{execution_id}")
    completed = sum(1 for step in detail["steps"] if step["status"] == "completed")
    return {"shape": "fan-out", "n": n, "completed": completed, "failed": n - completed,
            "wall_s": round(_epoch(detail["completed_at"]) - started, 3),
            "peak_rss_mib": round(sampler.peak_mib, 1), "peak_threads": sampler.peak_threads}


def measure(shape, n: int, delay: float) -> dict:
    with Fake(delay) as fake, Daemon(workflows(fake.base_url, n)) as daemon:
        _, health = daemon.client.request("GET", "/healthz")
        time.sleep(0.5)  # let startup work (orphan scan, first commits) settle
        with ProcessSampler(daemon.proc.pid) as idle:
            time.sleep(0.1)
        result = shape(daemon, n)
        result["idle_threads"] = idle.peak_threads
        result["peak_requests_held"] = fake.peak_in_flight
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    n, delay = (5, 0.2) if args.smoke else (args.n, args.delay)
    results = [measure(shape, n, delay) for shape in (executions_shape, fan_out_shape)]
    print(f"{'shape':<12}{'n':>5}{'done':>6}{'wall s':>9}{'goal':>8}{'RSS MiB':>9}"
          f"{'threads':>9}{'idle':>6}{'held':>6}")
    ok = True
    for r in results:
        goal = WALL_GOAL_S + (delay - 1.0)
        passed = r["failed"] == 0 and r["completed"] == n and r["wall_s"] <= goal
        ok = ok and (passed or args.smoke) and r["failed"] == 0
        print(f"{r['shape']:<12}{r['n']:>5}{r['completed']:>6}{r['wall_s']:>9.3f}"
              f"{'<= %.1f' % goal:>8}{r['peak_rss_mib']:>9.1f}{r['peak_threads']:>9}"
              f"{r['idle_threads']:>6}{r['peak_requests_held']:>6}  "
              f"{'pass' if passed else 'FAIL'}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    if args.smoke and ok:
        print("smoke: every AI step completed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
