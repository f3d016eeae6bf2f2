"""
Packed documents: attention within each document of a row, the dense (B, T, T) mask the SFT path used before (a
boolean mask into SDPA) against documents.Documents: its PyTorch path (documents.doc_attention) and, on a GPU, the
Triton kernel's document variant. Each variant runs in a fresh process, so its peak memory is its own.

    python bench/packed.py                      # both parts on this machine's CPU (fp32), ~15 minutes on 2 cores
    python bench/packed.py --part=attention --block_sizes=2048,8192

1) step: one forward and backward of a packed SFT micro-batch of the 135M model (T=2048, micro-batch 8, the fused head
   and activation checkpointing, as train.py runs a long context), rows packed with documents of SFT-like lengths: peak
   memory above the model, gradients and inputs, time, and the loss of both (equal within fp32 reordering).
2) attention: the attention of one 135M layer (9 query heads, 3 kv heads, head_dim 64), forward and backward, at each
   block size: the dense mask's cost grows with T^2 per row, the documents' with T.
Peak memory: on a CPU the process's peak resident set above what it held before the step (ru_maxrss), on a GPU
torch.cuda.max_memory_allocated above the allocation before it.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, not bench/
from documents import Documents, doc_attention  # noqa: E402
from model import GPT, GPTConfig, PRESETS, triton_kernels  # noqa: E402


def packed_ids(B, T, mean_len, seed=0):
    # rows filled with documents of log-normal lengths (median mean_len, 16..T tokens) in order; a row's tail that the
    # next document does not fit is padding (its own run, as SFTLoader pads)
    rng = np.random.default_rng(seed)
    ids = np.zeros((B, T), np.int64)
    for b in range(B):
        t, d = 0, 0
        while t < T:
            n = int(np.clip(rng.lognormal(np.log(mean_len), 0.8), 16, T))
            if t + n > T:
                n = T - t  # padding
            ids[b, t:t + n] = d
            t, d = t + n, d + 1
    return torch.from_numpy(ids)


def dense_mask(ids):
    # the (B, T, T) mask the SFT path built before documents.Documents: causal, and the same document
    T = ids.shape[1]
    return torch.ones(T, T, dtype=torch.bool, device=ids.device).tril() & (ids[:, :, None] == ids[:, None, :])


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(fn, device):
    # -> (peak MiB above the memory held before fn, seconds)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mib()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return peak - base, time.perf_counter() - t0, out


def child(a):
    torch.manual_seed(0)
    device = a.device
    T, B = a.block_size, a.micro_batch_size
    ids = packed_ids(B, T, a.mean_len).to(device)
    if a.part == "step":
        cfg = dict(PRESETS["smol135m"], block_size=T, fused_head=True, triton_attention=a.variant == "kernel")
        model = GPT(GPTConfig(**cfg)).to(device)  # as train.py runs it
        model.activation_checkpointing = True
        x = torch.randint(0, 49152, (B, T), device=device)
        y = torch.where(torch.rand(B, T, device=device) < 0.5, x.roll(-1, 1), -100)  # half the tokens trained
        pos = Documents(ids).positions()
        for p in model.parameters():  # gradients exist before the step, as in training after the first one
            p.grad = torch.zeros_like(p)

        def step():  # the mask is built inside, as the SFT step built it
            kw = dict(mask=dense_mask(ids)) if a.variant == "dense" else dict(docs=ids)
            loss = model(x, y, pos, reduction="sum", **kw)[1]
            loss.backward()
            return loss.item()
    else:
        H, Hkv, D = 9, 3, 64
        q = torch.randn(B, H, T, D, device=device, requires_grad=True)
        k = torch.randn(B, Hkv, T, D, device=device, requires_grad=True)
        v = torch.randn(B, Hkv, T, D, device=device, requires_grad=True)

        def step():
            if a.variant == "dense":
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(ids)[:, None], enable_gqa=True)
            elif a.variant == "kernel":  # the Triton kernel takes (B, T, heads, D)
                d = Documents(ids)
                o = triton_kernels().flash_attention(*(t.transpose(1, 2) for t in (q, k, v)), docs=(d.start, d.end))
                o = o.transpose(1, 2)
            else:
                o = doc_attention(q, k, v, Documents(ids))
            o.square().sum().backward()
            return o.detach().double().square().sum().item()
    if device == "cuda":
        step()  # a warm-up: Triton's compile and the allocator's first growth are not the step
    mem, sec, value = measure(step, device)
    print(json.dumps(dict(mem_mib=mem, seconds=sec, value=value, docs=int((ids[:, 1:] != ids[:, :-1]).sum()) + B)))


VARIANTS = {"dense": "(B, T, T) mask", "docs": "Documents (doc_attention)", "kernel": "Documents (Triton kernel)"}


def run(a, part, T, variant):
    args = [sys.executable, os.path.abspath(__file__), "--child", f"--part={part}", f"--variant={variant}",
            f"--block_size={T}", f"--micro_batch_size={a.micro_batch_size}", f"--mean_len={a.mean_len}",
            f"--device={a.device}", f"--threads={a.threads}"]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench/packed.py: the {variant} {part} at T={T} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="both", choices=["both", "step", "attention"])
    p.add_argument("--block_size", type=int, default=2048, help="the step's T")
    p.add_argument("--block_sizes", default="2048,8192", help="the attention part's T values")
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--mean_len", type=int, default=400, help="median document length in tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="on cuda the Triton kernel's document variant runs too")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="docs", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        return child(a)
    print(f"device {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, micro-batch "
          f"{a.micro_batch_size}, documents of median length {a.mean_len}")
    print("| part | T | variant | documents | peak memory MiB | seconds | value |\n|---|---|---|---|---|---|---|")
    parts = [("step", a.block_size)] * (a.part in ("both", "step"))
    parts += [("attention", int(t)) for t in a.block_sizes.split(",")] * (a.part in ("both", "attention"))
    for part, T in parts:
        res = {v: run(a, part, T, v) for v in VARIANTS if v != "kernel" or a.device == "cuda"}
        for v, r in res.items():
            print(f"| {part} | {T} | {VARIANTS[v]} | {r['docs']} | "
                  f"{r['mem_mib']:.0f} | {r['seconds']:.2f} | {r['value']:.6g} |", flush=True)
        d = res["dense"]
        for v in [v for v in res if v != "dense"]:
            o = res[v]
            print(f"| {part} | {T} | ratio mask / {VARIANTS[v]} | | {d['mem_mib'] / max(o['mem_mib'], 1e-9):.2f}x | "
                  f"{d['seconds'] / o['seconds']:.2f}x | rel. diff {abs(d['value'] - o['value']) / abs(d['value']):.1e} |",
                  flush=True)

if __name__ == "__main__":
    main()
