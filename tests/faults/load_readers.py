"""Reader clients for the load test, run as a process of their own (its own GIL).

    python load_readers.py PORT THREADS THINK_S SEED < ids

Reads execution ids from stdin (one per line, until EOF or "go"), then runs THREADS client
threads, each on one keep-alive connection, each alternating list and detail reads with an
exponential pause of THINK_S seconds on average, until stdin says "stop". Prints one JSON
object: {"latencies": [...seconds], "errors": [...]}.
"""

from __future__ import annotations

import http.client
import json
import random
import sys
import threading
import time

LIST = "/api/v1/executions?workflow=busy&limit=50"


def _reader(port: int, think: float, seed: int, ids: list[str], stop: threading.Event,
            latencies: list[float], errors: list[str]) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        path = f"/api/v1/executions/{rng.choice(ids)}" if ids and rng.random() < 0.5 else LIST
        began = time.perf_counter()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{path}: {exc!r}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        latencies.append(time.perf_counter() - began)
        if response.status != 200:
            errors.append(f"{path}: {response.status} {body[:200]!r}")
        if think:
            stop.wait(rng.expovariate(1 / think))
    conn.close()


def main() -> None:
    port, threads, think, seed = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                                  int(sys.argv[4]))
    ids: list[str] = []
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []
    workers = [threading.Thread(target=_reader, args=(port, think, seed * 1000 + index, ids,
                                                      stop, latencies, errors))
               for index in range(threads)]
    for worker in workers:
        worker.start()
    for line in sys.stdin:  # ids arrive while the runs are posted; "stop" ends the reading
        line = line.strip()
        if line == "stop":
            break
        if line:
            ids.append(line)
    stop.set()
    for worker in workers:
        worker.join()
    print(json.dumps({"latencies": latencies, "errors": errors}))


if __name__ == "__main__":
    main()
