# Ahead-of-time compilation of every GPU configuration of nanosmol's kernels, on a machine without a GPU.
#
#   python kernels/aot.py                      # sm_90 and sm_80, bf16/fp16/fp32: a markdown table, exit 1 on a failure
#   python kernels/aot.py --targets=90 --dtypes=bf16 --jobs=8 --json=aot.json
#
# How: the launchers in attention.py, rmsnorm.py and rope.py run on CPU tensors of SmolLM2's training shapes (T=2048,
# the model's own layouts: rope on a view of the fused qkv, attention on slices of its output) with `launch` replaced by
# a recorder, so the tiles, warps and stages checked are exactly the ones a GPU run would pick. Each recorded launch
# goes through Triton's own argument binder for the target (the same dtype, divisibility and ==1 specialisation the JIT
# applies at run time), then triton.compile(target=GPUTarget("cuda", cap, 32)) produces TTGIR, PTX and a cubin, and
# the ptxas Triton bundles (`-v`, Triton's flags) reports registers and spills.
# Checks per compiled kernel: it compiles; its shared memory fits one block of the target (H100 227 KiB, A100 163 KiB
# opt-in); registers x threads fit the 64K-register file; nothing spills (fp32 included). It also counts atomic
# instructions in the PTX: the kernels are designed without them (bitwise-deterministic backward), and the test holds
# them to it. This proves compilation, fit
# and register pressure; speed and numerics need the GPU (bench/gpu.sh).
# Must run without TRITON_INTERPRET (under the interpreter @triton.jit builds no compilable kernel): test_kernels_aot.py
# starts it in a subprocess with the variable removed.
import argparse
import concurrent.futures as cf
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = ROOT  # run as a file: the repo root, not kernels/ (whose utils.py would be a top-level module)

import torch  # noqa: E402

# Per-target limits (CUDA programming guide, compute capabilities 8.0 and 9.0): shared memory one block may opt into,
# the register file of an SM, and the SM count that sizes rmsnorm's backward grid.
TARGETS = {
    90: dict(gpu="H100", sms=132, smem_block=227 * 1024, regs_sm=65536),
    80: dict(gpu="A100", sms=108, smem_block=163 * 1024, regs_sm=65536),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (name, query heads, kv heads, head_dim): the three SmolLM2 presets (head_dim 64; the 1.7B has no GQA, so GROUP == 1
# specialises differently) and a head_dim-128 model
SHAPES = [("smol135m", 9, 3, 64), ("smol360m", 15, 5, 64), ("smol1.7b", 32, 32, 64), ("d128", 16, 4, 128)]
SEQ = 2048


@dataclass
class Job:
    target: int
    module: str
    kernel: str
    dtype: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    used_by: list = field(default_factory=list)

    def config(self):
        # the tile constants (upper-case constexprs but the scale), warps and stages: what a reader tunes
        tiles = {k: v for k, v in self.named_constexprs().items()
                 if k.isupper() and "SCALE" not in k and k != "DOT_PRECISION" and v is not None}  # None: an unused pointer
        warps, stages = self.options["num_warps"], self.options["num_stages"]
        return " ".join(f"{k}={v}" for k, v in tiles.items()) + f" w{warps} s{stages}"

    def named_constexprs(self):
        names = list(self.signature)
        return {names[path[0]]: v for path, v in self.constexprs.items()}


@dataclass
class Result:
    target: str
    kernel: str
    dtype: str
    config: str
    used_by: str
    shared: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    atomics: int = 0  # atom./red. instructions in the PTX: none means no order-dependent accumulation (determinism)
    seconds: float = 0.0
    errors: list = field(default_factory=list)


def _kernels():
    # nanosmol's kernels (model.triton_kernels(): the package "nanosmol_kernels"), in this process or a spawned worker
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from model import triton_kernels
    return triton_kernels()


# ------------------------------------------------------------------------------------------------ recording launches
def record(target: int, dtype: torch.dtype, shape, causals=(True, False)) -> list:
    """Run every op forward and backward on CPU tensors with the launches recorded instead of run: (kernel, args, kw)."""
    k = _kernels()
    attention, rmsnorm, rope = k.attention, k.rmsnorm, k.rope
    calls = []
    modules = (attention, rmsnorm, rope)
    saved = [(m, m.launch, m.check_device) for m in modules]
    saved_sms = rmsnorm.num_sms
    try:
        for m in modules:
            m.launch = lambda name, kernel, grid, *args, **kw: calls.append((kernel, args, kw))
            m.check_device = lambda *a, **k: None
        rmsnorm.num_sms = lambda index: TARGETS[target]["sms"]
        _name, H, Hkv, D = shape
        C = H * D
        # rmsnorm: the weight in the activations' dtype (FSDP's bf16 parameters, or fp32 under autocast, whose residual
        # stream stays fp32) and a 16-bit x with an fp32 weight (a bf16 model with fp32 norms)
        for w_dtype in {dtype, torch.float32}:
            x = torch.zeros(1, SEQ, C, dtype=dtype, requires_grad=True)
            w = torch.ones(C, dtype=w_dtype, requires_grad=True)
            rmsnorm.rms_norm(x, w).sum().backward()
        qkv = torch.zeros(1, SEQ, (H + 2 * Hkv) * D, dtype=dtype, requires_grad=True)
        cos = sin = torch.zeros(SEQ, D // 2)  # the model's tables are fp32 whatever the activations
        # the model trains causal, over whole windows or within packed documents (docs: SFT, doc_masking);
        # kernels.flash_attention also offers causal=False
        bounds = (torch.zeros(1, SEQ, dtype=torch.int32), torch.full((1, SEQ), SEQ, dtype=torch.int32))
        for causal, docs in [(c, None) for c in causals] + [(True, bounds)] * (True in causals):
            qk = rope.apply_rope(qkv[..., :(H + Hkv) * D].view(1, SEQ, H + Hkv, D), cos, sin)
            q, k = qk.split([H, Hkv], dim=2)
            v = qkv[..., (H + Hkv) * D:].view(1, SEQ, Hkv, D)
            attention.flash_attention(q, k, v, causal=causal, docs=docs).sum().backward()
    finally:
        for m, launch, check in saved:
            m.launch, m.check_device = launch, check
        rmsnorm.num_sms = saved_sms
    return calls


def bind(target: int, kernel, args, kwargs):
    """Triton's own run-time binding for `target`: (signature, constexprs, attrs, options), as JITFunction.run does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", target, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=kernel.debug or triton.knobs.runtime.debug,
                  instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def plan(targets, dtypes, causals=(True, False)) -> list:
    """Every distinct compilation the launchers ask for, each with the model shapes that use it."""
    jobs = {}
    for target in targets:
        for dname in dtypes:
            for shape in SHAPES:
                for kernel, args, kwargs in record(target, DTYPES[dname], shape, causals):
                    signature, constexprs, attrs, options = bind(target, kernel, args, kwargs)
                    key = (target, kernel.__name__, repr(signature), repr(sorted(constexprs.items())), repr(attrs),
                           options["num_warps"], options["num_stages"])
                    if key not in jobs:
                        jobs[key] = Job(target, kernel.fn.__module__, kernel.__name__, dname, signature, constexprs,
                                        attrs, options)
                    if shape[0] not in jobs[key].used_by:
                        jobs[key].used_by.append(shape[0])
    return list(jobs.values())


# ------------------------------------------------------------------------------------------------------- compiling
def compile_job(job: Job) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    limits = TARGETS[job.target]
    res = Result(f"sm_{job.target}", job.kernel.lstrip("_").removesuffix("_kernel"), job.dtype, job.config(),
                 ",".join(job.used_by))
    t0 = time.time()
    # Triton runs `ptxas -v` itself (make_cubin); with dump_ptxas_log it prints the report, and always_compile makes
    # sure it runs (a cache hit would skip ptxas and print nothing)
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    log = io.StringIO()
    try:
        _kernels()  # a spawned worker imports the kernels' package first
        kernel = getattr(importlib.import_module(job.module), job.kernel)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", job.target, 32), options=dict(job.options))
    except Exception as e:  # a compile error is a result to report, not a crash of the whole table
        res.errors.append(f"compile failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
        res.seconds = time.time() - t0
        return res
    res.shared = compiled.metadata.shared
    res.atomics = len(re.findall(r"\b(?:atom|red)\.", compiled.asm["ptx"]))
    log = log.getvalue()
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and spills):
        res.errors.append(f"no register report from ptxas: {log.strip()[-300:]}")
    else:
        res.registers, res.spill_stores, res.spill_loads = int(regs[1]), int(spills[1]), int(spills[2])
    threads = job.options["num_warps"] * 32
    if res.shared > limits["smem_block"]:
        res.errors.append(f"shared memory {res.shared} B > {limits['smem_block']} B per block on {limits['gpu']}")
    if res.registers * threads > limits["regs_sm"]:
        res.errors.append(f"{res.registers} registers x {threads} threads > the {limits['regs_sm']}-register file")
    if res.spill_stores or res.spill_loads:  # in every dtype: a spill is a trip to local memory in the inner loop
        res.errors.append(f"spills registers ({res.spill_stores} B stored, {res.spill_loads} B loaded)")
    res.seconds = time.time() - t0
    return res


def run(targets=(90, 80), dtypes=("bf16", "fp16", "fp32"), causals=(True, False), jobs=None) -> list:
    if _kernels().utils.INTERPRET:
        raise SystemExit("kernels.aot: TRITON_INTERPRET is set, so @triton.jit built interpreter functions that cannot "
                         "be compiled; run it without the variable (env -u TRITON_INTERPRET python kernels/aot.py)")
    work = plan(targets, dtypes, causals)
    workers = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    if workers == 1:
        return [compile_job(j) for j in work]
    # spawn: fresh interpreters (no forked torch/LLVM state); each imports triton and the kernels once
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_job, work))


def table(results) -> str:
    lines = ["| target | kernel | dtype | config | used by | smem KiB | registers | spills (st/ld B) | compile s | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        check = "ok" if not r.errors else "FAIL: " + "; ".join(r.errors)
        lines.append(f"| {r.target} | {r.kernel} | {r.dtype} | {r.config} | {r.used_by} | {r.shared / 1024:.0f} | "
                     f"{r.registers} | {r.spill_stores}/{r.spill_loads} | {r.seconds:.1f} | {check} |")
    return "\n".join(lines)


def summary(results) -> str:
    """One row per kernel, dtype and tile config (causal/non-causal, documents and GROUP==1 variants folded in), both
    targets."""
    groups = {}
    for r in results:
        config = " ".join(w for w in r.config.split() if not w.startswith(("CAUSAL=", "DOC=", "GROUP=")))
        g = groups.setdefault((r.kernel, r.dtype, config), {})
        t = g.setdefault(r.target, dict(n=0, smem=0, regs=0, spills=0, errors=0))
        t["n"] += 1
        t["smem"], t["regs"] = max(t["smem"], r.shared), max(t["regs"], r.registers)
        t["spills"] += r.spill_stores + r.spill_loads
        t["errors"] += bool(r.errors)
    targets = sorted({r.target for r in results}, reverse=True)
    head = "| kernel | dtype | config | " + " | ".join(f"{t}: variants, smem KiB, regs, spill B" for t in targets)
    lines = [head + " |", "|---|---|---|" + "---|" * len(targets)]
    order = ["attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq", "rms_norm_forward", "rms_norm_backward"]
    rank = lambda key: (order.index(key[0]) if key[0] in order else len(order), list(DTYPES).index(key[1]), key[2])
    for (kernel, dtype, config), g in sorted(groups.items(), key=lambda kv: rank(kv[0])):
        cells = []
        for t in targets:
            x = g.get(t)
            cells.append("-" if x is None else f"{x['n']}, {x['smem'] / 1024:.0f}, {x['regs']}, {x['spills']}"
                         + (f" ({x['errors']} FAIL)" if x["errors"] else ""))
        lines.append(f"| {kernel} | {dtype} | {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Compile every GPU configuration of nanosmol's Triton kernels ahead of time "
                                            "(no GPU needed) and check shared memory, registers and spills.")
    p.add_argument("--targets", default="90,80", help="compute capabilities, e.g. 90 (H100) and 80 (A100)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--causal", default="both", choices=["both", "true"],
                   help="attention variants: both, or only the causal ones the model trains with (whole rows and "
                        "packed documents)")
    p.add_argument("--jobs", type=int, default=None, help="compiler processes (default: one per CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--full", action="store_true", help="one row per compiled kernel instead of per tile config")
    a = p.parse_args(argv)
    try:
        targets = [int(t) for t in a.targets.split(",")]
    except ValueError:
        raise SystemExit(f"kernels.aot: --targets takes compute capabilities like 90,80, got {a.targets!r}")
    bad = [t for t in targets if t not in TARGETS] + [d for d in a.dtypes.split(",") if d not in DTYPES]
    if bad:
        raise SystemExit(f"kernels.aot: unknown {bad}; targets: {sorted(TARGETS)}, dtypes: {sorted(DTYPES)}")
    t0 = time.time()
    results = run(targets, a.dtypes.split(","), (True,) if a.causal == "true" else (True, False), a.jobs)
    print(table(results) if a.full else summary(results))
    failed = sum(bool(r.errors) for r in results)
    print(f"\n{len(results)} kernels compiled for {','.join(f'sm_{t}' for t in targets)} in {time.time() - t0:.0f} s, "
          f"{failed} failed the checks")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
