"""
Benchmark of kernels/ against the alternatives, on SmolLM2's shapes (a script, not a test). Needs a CUDA GPU.

    python bench/kernels.py                       # everything: rmsnorm, rope, attention, end-to-end train steps
    python bench/kernels.py --only=attention      # one part: rmsnorm | rope | attention | e2e
    python bench/kernels.py --sweep=1             # also sweep the attention tile configs (prints the best per kind)
    python bench/kernels.py --e2e_compile=0       # end-to-end without torch.compile (faster to run)

Prints markdown tables (paste into BENCHMARKS.md): median ms from triton.testing.do_bench, GB/s for the memory-bound
ops (bytes that must move: read inputs + write outputs once), TFLOP/s for attention (causal: half the 4*B*H*T^2*D
matmul FLOPs forward; fwd+bwd = 3.5x the forward), and each alternative's time / ours (> 1: ours is faster).
"""
import argparse
import datetime
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, not bench/ (run from the root)

# Sizes; --dry_run=1 shrinks them and runs every code path once on CPU tensors through Triton's interpreter, to
# check the script itself without a GPU (its numbers mean nothing).
DEV, SEQ_LENS, TOKENS, E2E_T, E2E_LAYERS = "cuda", (2048, 8192), 8 * 2048, 2048, None
PEAK_HBM_GBS = {"H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="all", choices=["all", "rmsnorm", "rope", "attention", "e2e"])
    p.add_argument("--sweep", type=int, default=0, help="1: sweep attention tile configs")
    p.add_argument("--e2e_compile", type=int, default=1, help="1: also time the train step under torch.compile")
    p.add_argument("--e2e_steps", type=int, default=10)
    p.add_argument("--dry_run", type=int, default=0, help="1: tiny shapes on CPU under TRITON_INTERPRET=1 (no GPU)")
    return p.parse_args()


def peak_gbs():
    if DEV == "cpu":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_HBM_GBS.items() if k in name), None)


def bench(fn, grad_to_none=None, ours=False):
    # ours=True: nanosmol's own kernel, whose failure must stop the benchmark (not become a quiet "n/a")
    from triton.testing import do_bench

    def measure():
        if DEV == "cpu":  # dry run: one call, wall clock
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    if ours:
        return measure()
    try:
        return measure()
    except Exception as e:  # an alternative that does not support this shape (e.g. a backend without GQA)
        print(f"    (skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return float("nan")


def compile_(f):
    return f if DEV == "cpu" else torch.compile(f, dynamic=False)  # no Inductor in the dry run (slow on CPU)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def row(cells):
    print("| " + " | ".join(str(c) for c in cells) + " |")


def fmt(x, nd=3):
    return "n/a" if x != x else f"{x:.{nd}f}"


def ratio_cells(ms_ours, others):
    return ["n/a" if ms != ms else f"{fmt(ms)} ({fmt(ms / ms_ours, 2)}x)" for ms in others]


def fwd_bwd(f, inputs, dy):
    def run():
        f(*inputs).backward(dy)
    return run


def try_liger(name):
    try:
        if name == "rmsnorm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        return liger_rotary_pos_emb
    except Exception:
        return None


# ------------------------------------------------------------------------------------------------------- RMSNorm
def bench_rmsnorm():
    from model import triton_kernels
    kernels = triton_kernels()
    from model import RMSNorm
    liger = try_liger("rmsnorm")
    peak = peak_gbs()
    print("\n### RMSNorm (bf16 x, fp32 weight, eps 1e-5)\n")
    row(["hidden", "B x T", "pass", "ours ms", "ours GB/s", "% HBM peak", "eager ms (x)", "compile ms (x)",
         "F.rms_norm ms (x)", "Liger ms (x)"])
    row(["---"] * 10)
    for C in (576, 960, 2048):
        for T in SEQ_LENS:
            B = max(1, TOKENS // T)
            x = torch.randn(B, T, C, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            w = (1 + 0.1 * torch.randn(C, device=DEV)).requires_grad_()
            dy = torch.randn_like(x)
            eager = RMSNorm(C, 1e-5, use_triton=False).to(DEV)  # model.py's PyTorch path (the kernels-off reference)
            compiled = compile_(eager)
            impls = [lambda x: kernels.rms_norm(x, w, 1e-5), eager, compiled, lambda x: F.rms_norm(x, (C,), w, 1e-5),
                     (lambda x: liger(x, w, 1e-5)) if liger else None]
            params = [x, w, eager.weight]
            for mode in ("fwd", "fwd+bwd"):
                times = []
                for i, f in enumerate(impls):
                    if f is None:
                        times.append(float("nan"))
                    elif mode == "fwd":
                        times.append(bench(lambda: f(x), ours=i == 0))
                    else:
                        times.append(bench(fwd_bwd(f, (x,), dy), grad_to_none=params, ours=i == 0))
                # bytes: fwd reads x, writes y; bwd reads x, dy, writes dx (weight and rstd are negligible)
                nbytes = x.numel() * 2 * (2 if mode == "fwd" else 5)
                gbs = nbytes / times[0] / 1e6
                row([C, f"{B} x {T}", mode, fmt(times[0]), f"{gbs:.0f}", fmt(100 * gbs / peak, 0) if peak else "n/a",
                     *ratio_cells(times[0], times[1:])])


# ---------------------------------------------------------------------------------------------------------- RoPE
def bench_rope():
    from model import triton_kernels
    kernels = triton_kernels()
    from model import apply_rope, rope_tables
    compiled = compile_(apply_rope)
    liger = try_liger("rope")
    peak = peak_gbs()
    print("\n### RoPE (q and k of one layer, bf16, head_dim 64)\n")
    row(["heads q/kv", "B x T", "pass", "ours ms", "ours GB/s", "% HBM peak", "eager ms (x)", "compile ms (x)",
         "Liger ms (x)"])
    row(["---"] * 9)
    for H, Hkv in ((9, 3), (15, 5), (32, 32)):
        for T in SEQ_LENS:
            B = max(1, TOKENS // T)
            cos, sin = rope_tables(T, 64, 10000.0, DEV)
            q = torch.randn(B, T, H, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(B, T, Hkv, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            dq, dk = torch.randn_like(q), torch.randn_like(k)

            def both(f):
                def run(q, k):
                    return f(q, cos, sin), f(k, cos, sin)
                return run
            impls = [both(kernels.apply_rope), both(apply_rope), both(compiled)]
            if liger is not None:  # Liger's layout: (B, H, T, D) with full-width cos/sin (1, T, D)
                ql = q.detach().transpose(1, 2).contiguous().requires_grad_()
                kl = k.detach().transpose(1, 2).contiguous().requires_grad_()
                cl, sl = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
            for mode in ("fwd", "fwd+bwd"):
                times = []
                for i, f in enumerate(impls):
                    if mode == "fwd":
                        times.append(bench(lambda: f(q, k), ours=i == 0))
                    else:
                        def run(f=f):
                            a, b = f(q, k)
                            torch.autograd.backward((a, b), (dq, dk))
                        times.append(bench(run, grad_to_none=[q, k], ours=i == 0))
                if liger is None:
                    times.append(float("nan"))
                elif mode == "fwd":
                    times.append(bench(lambda: liger(ql, kl, cl, sl)))
                else:
                    dql, dkl = dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous()

                    def run_l():
                        a, b = liger(ql, kl, cl, sl)
                        torch.autograd.backward((a, b), (dql, dkl))
                    times.append(bench(run_l, grad_to_none=[ql, kl]))
                nbytes = (q.numel() + k.numel()) * 2 * 2 * (1 if mode == "fwd" else 2)  # read + write, fwd then bwd
                gbs = nbytes / times[0] / 1e6
                row([f"{H}/{Hkv}", f"{B} x {T}", mode, fmt(times[0]), f"{gbs:.0f}",
                     fmt(100 * gbs / peak, 0) if peak else "n/a", *ratio_cells(times[0], times[1:])])


# ----------------------------------------------------------------------------------------------------- attention
def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b = getattr(SDPBackend, backend)

    def run(q, k, v):  # (B, H, T, D) layout, SDPA's own
        with sdpa_kernel([b]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return run


def attention_inputs(H, Hkv, T):
    # bf16 q, k, v (B, T, heads, 64) leaves and an output gradient, B rows of T tokens (TOKENS in all)
    B = max(1, TOKENS // T)
    q, k, v = (torch.randn(B, T, h, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True) for h in (H, Hkv, Hkv))
    return B, q, k, v, torch.randn_like(q)


def timed(f, args, g, mode, ours=False):
    # ms of f(*args) ("fwd") or of it and its backward from g ("fwd+bwd")
    if mode == "fwd":
        return bench(lambda: f(*args), ours=ours)
    return bench(fwd_bwd(f, args, g), grad_to_none=list(args), ours=ours)


def attention_flops(B, H, T, D, mode):
    fwd = 4 * B * H * T * T * D / 2  # two matmuls of 2*T*T*D FLOPs each, half of them under the causal mask
    return fwd if mode == "fwd" else 3.5 * fwd  # backward = 2.5x forward (5 matmuls vs 2)


def bench_attention():
    from model import triton_kernels
    kernels = triton_kernels()
    print("\n### Attention (causal, bf16, head_dim 64)\n")
    row(["heads q/kv", "B x T", "pass", "ours ms", "ours TFLOP/s", "SDPA flash ms (x)", "SDPA cuDNN ms (x)",
         "SDPA math ms (x)"])
    row(["---"] * 8)
    expanded = set()
    for H, Hkv in ((9, 3), (15, 5), (32, 32)):
        for T in SEQ_LENS:
            B, q, k, v, do = attention_inputs(H, Hkv, T)
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            dot = do.transpose(1, 2).contiguous()
            impls = [(kernels.flash_attention, (q, k, v), do), (sdpa("FLASH_ATTENTION"), (qt, kt, vt), dot),
                     (sdpa("CUDNN_ATTENTION"), (qt, kt, vt), dot)]
            if T <= SEQ_LENS[0]:
                impls.append((sdpa("MATH"), (qt, kt, vt), dot))  # T^2 scores in memory: too big at 8192
            for mode in ("fwd", "fwd+bwd"):
                times = []
                for i, (f, args, g) in enumerate(impls):
                    ms = timed(f, args, g, mode, ours=i == 0)
                    if ms != ms and i > 0 and H != Hkv:
                        # a backend without native GQA: give it kv heads expanded beforehand (outside the timing;
                        # its backward then skips the group reduction, a small advantage to it)
                        ex = [t.detach().repeat_interleave(H // Hkv, 1).requires_grad_() for t in args[1:]]
                        ms = timed(f, (args[0], *ex), g, mode)
                        expanded.add(i)
                    times.append(ms)
                times += [float("nan")] * (4 - len(times))
                tflops = attention_flops(B, H, T, 64, mode) / times[0] / 1e9
                row([f"{H}/{Hkv}", f"{B} x {T}", mode, fmt(times[0]), f"{tflops:.0f}", *ratio_cells(times[0], times[1:])])
    names = {1: "flash", 2: "cuDNN", 3: "math"}
    if expanded:
        print("\n(" + ", ".join(names[i] for i in sorted(expanded)) + ": no native GQA here; timed with kv heads "
              "expanded beforehand, for the GQA shapes)")


def bench_attention_docs():
    # packed documents: the docs variant against the plain causal kernel on the same tokens (one document per row: the
    # variant's overhead, to stay >= 0.9x; SFT-like documents: the tiles it skips), and FlashAttention-2's varlen
    # function where flash-attn is installed (the anchor; kv heads expanded if it lacks GQA: it has it)
    from bench.packed import packed_ids
    from documents import Documents
    from model import triton_kernels
    kernels = triton_kernels()
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        flash_attn_varlen_func = None
    print("\n### Attention within packed documents (bf16, head_dim 64)\n")
    row(["heads q/kv", "B x T", "documents", "pass", "docs ms", "plain causal ms", "plain / docs",
         "flash-attn varlen ms (x)"])
    row(["---"] * 8)
    for H, Hkv in ((9, 3), (32, 32)):
        for T in SEQ_LENS:
            B, q, k, v, do = attention_inputs(H, Hkv, T)
            for label, ids in (("1 per row", torch.zeros(B, T, dtype=torch.long)),
                               ("median T/8", packed_ids(B, T, max(2, T // 8)))):
                docs = Documents(ids.to(DEV))
                bounds = (docs.start, docs.end)
                lens = torch.cat([torch.unique_consecutive(r, return_counts=True)[1] for r in ids])  # row by row
                cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()]).to(DEV)
                flat = [t.detach().reshape(B * T, *t.shape[2:]).requires_grad_() for t in (q, k, v)]
                for mode in ("fwd", "fwd+bwd"):
                    ms_docs = timed(lambda a, b, c: kernels.flash_attention(a, b, c, docs=bounds), (q, k, v), do, mode,
                                    ours=True)
                    ms_plain = timed(kernels.flash_attention, (q, k, v), do, mode, ours=True)
                    ms_fa = float("nan")
                    if flash_attn_varlen_func is not None:
                        ms_fa = timed(lambda a, b, c: flash_attn_varlen_func(a, b, c, cu, cu, T, T, causal=True), flat,
                                      do.reshape(B * T, H, 64), mode)
                    row([f"{H}/{Hkv}", f"{B} x {T}", f"{label} ({len(lens)})", mode, fmt(ms_docs), fmt(ms_plain),
                         f"{ms_plain / ms_docs:.2f}x", "not installed" if flash_attn_varlen_func is None
                         else f"{fmt(ms_fa)} ({ms_fa / ms_docs:.2f}x)"])


def sweep_attention():
    # Try tile configs for each attention kernel at the 135M shape (bf16, T 2048) and print the fastest: the numbers
    # to write into FWD_CONFIGS / DKDV_CONFIGS / DQ_CONFIGS in kernels/attention.py.
    import itertools

    from model import triton_kernels
    kernels = triton_kernels()
    A = kernels.attention  # the module: its tile tables
    B, T, H, Hkv, D = max(1, TOKENS // SEQ_LENS[0]), SEQ_LENS[0], 9, 3, 64
    q = torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    o, lse = torch.ops.nanosmol.attention_fwd(q, k, v, True, None, None)
    print(f"\n### Attention tile sweep (bf16, B {B}, T {T}, heads {H}/{Hkv}, head_dim {D})\n")
    for kind, table in (("fwd", A.FWD_CONFIGS), ("dkdv", A.DKDV_CONFIGS), ("dq", A.DQ_CONFIGS)):
        original = table[(2, 64)]
        results = []
        configs = [c for c in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4, 5))
                   if (c[1] >= c[0] if kind == "dkdv" else c[0] >= c[1])]  # the long side on the loop-invariant tile
        for bm, bn, w, s in configs[:2] if DEV == "cpu" else configs:  # dry run: the plumbing only
            table[(2, 64)] = (bm, bn, w, s)
            if kind == "fwd":
                ms = bench(lambda: torch.ops.nanosmol.attention_fwd(q, k, v, True, None, None))
            else:  # the backward runs all three kernels; only this kind's config changes
                ms = bench(lambda: torch.ops.nanosmol.attention_bwd(do, q, k, v, o, lse, True, None, None))
            results.append((ms, (bm, bn, w, s)))
        table[(2, 64)] = original
        results = sorted(r for r in results if r[0] == r[0])
        print(f"{kind}: current {original}; best " + ", ".join(f"{c} {ms:.3f} ms" for ms, c in results[:5]))


# ----------------------------------------------------------------------------------------------------- end to end
def bench_e2e(steps, with_compile):
    from model import GPT, PRESETS, GPTConfig
    print(f"\n### End to end: one training step (bf16 autocast, T {E2E_T}, fused AdamW)\n")
    row(["preset", "micro-batch", "compile", "kernels off ms", "kernels on ms", "speedup", "tok/s on"])
    row(["---"] * 7)
    for preset, B in (("smol135m", 8), ("smol360m", 4)):
        B = B if DEV == "cuda" else 1
        for comp in ((False, True) if with_compile else (False,)):
            ms = {}
            for flag in (False, True):
                torch.manual_seed(0)
                over = {} if E2E_LAYERS is None else dict(n_layer=E2E_LAYERS, block_size=E2E_T)
                cfg = GPTConfig(**{**PRESETS[preset], **over}, triton_rmsnorm=flag, triton_rope=flag,
                                triton_attention=flag)
                model = GPT(cfg).to(DEV)
                opt = model.configure_optimizers(0.01, 3e-3, (0.9, 0.95), 1e-8, DEV)
                step_model = compile_(model) if comp else model
                x = torch.randint(0, cfg.vocab_size, (B, E2E_T + 1), device=DEV)

                def step():
                    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
                        _, loss = step_model(x[:, :-1], x[:, 1:])
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                try:
                    for _ in range(3):  # warmup (compile, allocator, autotune)
                        step()
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        step()
                    sync()
                    ms[flag] = (time.perf_counter() - t0) / steps * 1e3
                except torch.cuda.OutOfMemoryError:
                    ms[flag] = float("nan")
                del model, opt, step_model
                if DEV == "cuda":
                    torch.cuda.empty_cache()
            row([preset, B, comp, fmt(ms[False], 1), fmt(ms[True], 1), fmt(ms[False] / ms[True], 3),
                 f"{B * E2E_T / ms[True] * 1e3:.0f}" if ms[True] == ms[True] else "n/a"])


def main():
    global DEV, SEQ_LENS, TOKENS, E2E_T, E2E_LAYERS
    args = parse_args()
    if args.dry_run:
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/ is imported (it is imported lazily below)
        DEV, SEQ_LENS, TOKENS, E2E_T, E2E_LAYERS = "cpu", (16, 32), 32, 16, 1
        args.e2e_steps = 1
    elif not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (none found): nothing to measure. The kernels' correctness runs on "
              "CPU under the interpreter: python -m pytest -q test_kernels.py")
        return 0
    import triton
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.cuda.get_device_name() if DEV == "cuda" else "DRY RUN on CPU (interpreter; times are meaningless)"
    print(f"## Kernels benchmark\n\n{device}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}\n"
          f"command: python {' '.join(sys.argv)}")
    if args.only in ("all", "rmsnorm"):
        bench_rmsnorm()
    if args.only in ("all", "rope"):
        bench_rope()
    if args.only in ("all", "attention"):
        bench_attention()
        bench_attention_docs()
        if args.sweep:
            sweep_attention()
    if args.only in ("all", "e2e"):
        bench_e2e(args.e2e_steps, bool(args.e2e_compile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
