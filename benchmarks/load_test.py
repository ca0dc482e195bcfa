"""Load test of the app in --tiny mode: N concurrent try-on requests through the queue.

    python -m benchmarks.load_test --n 8

Starts ``app.py --tiny`` on a free localhost port, submits N requests 0.2 s apart (each with
its own seed; all are waiting long before the first finishes), and checks that every one completes, that they finish in submission order (one
generation at a time, first come first served) and that each got its own seed back.
Prints N, the total time and the per-request latency.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="concurrent requests (default 8, below the queue size 16)")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, "app.py", "--tiny", "--port", str(port)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        from gradio_client import Client, handle_file

        client = Client(url, verbose=False)
        person = handle_file(str(ROOT / "examples/person/astronaut.png"))
        garment = handle_file(str(ROOT / "examples/garment/striped_tee.png"))
        start = time.perf_counter()
        jobs = []
        for seed in range(args.n):  # 0.2 s apart, so that they reach the queue in this order
            jobs.append(client.submit(person, garment, None, None, None, "viton_hd", "upper_body", args.steps, 2.5,
                                      seed, False, False, False, False, False, False, api_name="/tryon"))
            time.sleep(0.2)
        finished = {}
        while len(finished) < len(jobs):
            for seed, job in enumerate(jobs):
                if seed not in finished and job.done():
                    finished[seed] = time.perf_counter() - start
            time.sleep(0.05)
        total = time.perf_counter() - start
        seeds = [job.result()[1] for job in jobs]
        order = sorted(finished, key=finished.get)
        print(f"{args.n} concurrent requests, {args.steps} steps each, tiny model on CPU")
        print(f"all completed: {len(finished) == args.n}; seeds returned match: {seeds == list(range(args.n))}; "
              f"finished in submission order: {order == list(range(args.n))} {order}")
        print(f"total {total:.1f} s, {total / args.n:.2f} s per request; latency first {min(finished.values()):.1f} s, "
              f"last {max(finished.values()):.1f} s")
        if not (len(finished) == args.n and seeds == list(range(args.n))):
            sys.exit("requests were lost or mixed up")
    finally:
        app.terminate()
        app.wait(timeout=20)


if __name__ == "__main__":
    main()
