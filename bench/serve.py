"""
serve.py's throughput with 1 and with 8 concurrent streaming clients (the real SmolLM2-135M-Instruct, greedy, fixed
length): aggregate generated tokens/s, per-client tokens/s and the time to the first token. A script, not a test.

    python bench/serve.py [--tokens=128] [--clients=1,8]

It starts serve.py on a free port, measures, and stops it.
"""
import argparse
import concurrent.futures as cf
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stream_one(url, tokens, i):
    body = {"prompt": f"Story {i}: once upon a time", "max_tokens": tokens, "temperature": 0, "stream": True,
            "stop": None}
    t0, first, n = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter()
                n += 1
    return n, first - t0, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--clients", default="1,8")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "serve.py", f"--port={port}"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.25)
        health = lambda: httpx.get(url + "/health").json()["generated_tokens"]
        stream_one(url, 8, 0)  # warm up
        print("| clients | generated tokens | wall s | aggregate tok/s | per-client tok/s | first token s (median) |")
        print("|---|---|---|---|---|---|")
        for c in map(int, a.clients.split(",")):
            g0, t0 = health(), time.perf_counter()
            with cf.ThreadPoolExecutor(c) as pool:
                res = list(pool.map(lambda i: stream_one(url, a.tokens, i), range(c)))
            wall, gen = time.perf_counter() - t0, health() - g0
            per = statistics.mean(n / t for n, _, t in res)
            print(f"| {c} | {gen} | {wall:.1f} | {gen / wall:.1f} | {per:.1f} | "
                  f"{statistics.median(f for _, f, _ in res):.2f} |", flush=True)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
