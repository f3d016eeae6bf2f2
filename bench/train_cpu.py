"""
CPU training step: nanosmol against Hugging Face transformers' LlamaForCausalLM on the same shape, and the memory the
fused output head saves. transformers is not a nanosmol dependency: run from a scratch venv that has it, e.g.
    python -m venv --system-site-packages /tmp/hfvenv && /tmp/hfvenv/bin/pip install transformers
    /tmp/hfvenv/bin/python bench/train_cpu.py [--steps=8] [--threads=2] [--bf16=auto|true|false]

1) speed: one optimizer step (forward, backward, fused AdamW) at the quickstart's shape (6 x 192, GQA 6/2, vocab
   49152, 8 x 256 tokens), median ms over --steps after warmup, all variants interleaved in each round; fp32 and bf16
   autocast (fp32 weights; --bf16=auto: only where the CPU has native bf16, as train.py's dtype auto), nanosmol's plain
   head (full logits + F.cross_entropy) and fused head (model.fused_cross_entropy).
   --malloc=kept (the default) makes glibc keep freed memory, as train.py does on a CPU
   (cpu_kernels.keep_freed_memory), for every variant alike, transformers too; --malloc=default leaves glibc as it is.
2) memory: peak resident memory of one fp32 step of the 135M model at T=2048, micro-batch 4, plain vs fused head,
   each in a fresh process (ru_maxrss; the model, gradients and AdamW state are in both).
"""
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, not bench/ (run from the root)
import cpu_kernels  # noqa: E402
from model import GPT, GPTConfig, PRESETS  # noqa: E402

QUICKSTART = dict(PRESETS["smol135m"], n_layer=6, n_embd=192, n_head=6, n_kv_head=2, intermediate_size=512,
                  init_std=None, block_size=256)


def step_fn(model, opt, x, y, bf16, hf):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step():
        with ctx:
            loss = model(input_ids=x, labels=y).loss if hf else model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def build(kind, cfg):
    torch.manual_seed(0)
    if kind == "transformers":
        from transformers import LlamaConfig, LlamaForCausalLM
        hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                             num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                             num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.block_size,
                             tie_word_embeddings=True, rms_norm_eps=cfg.norm_eps)
        hf_cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(hf_cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
        return model, opt
    model = GPT(GPTConfig(**{**cfg.__dict__, "fused_head": kind == "fused"})).train()
    return model, model.configure_optimizers(0.01, 1e-4, (0.9, 0.95), 1e-8, "cpu")


def speed(steps, bf16):
    cfg = GPTConfig(**QUICKSTART)
    B, T = 8, 256
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    kinds = ["transformers", "plain", "fused"]
    try:
        import transformers
        print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    except ImportError:
        kinds.remove("transformers")
        print("transformers is not installed here: nanosmol's own variants only (see the docstring)")
    times = {}
    dtypes = (False, True) if bf16 else (False,)
    runs = {(k, b): step_fn(*build(k, cfg), x, y, b, k == "transformers") for b in dtypes for k in kinds}
    for fn in runs.values():  # warmup: allocator, oneDNN primitive caches
        fn(), fn()
    for _ in range(steps):  # all variants interleaved, so this VM's drifting speed hits every one alike
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times.setdefault(key, []).append(time.perf_counter() - t0)
    print(f"quickstart shape: {cfg.n_layer} x {cfg.n_embd}, vocab {cfg.vocab_size}, {B} x {T} tokens; median of {steps}")
    print("| variant | fp32 ms |" + (" bf16 autocast ms |" if bf16 else ""))
    print("|---|---|" + ("---|" if bf16 else ""))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k in kinds:
        print(f"| {k} | " + " | ".join(f"{med[(k, b)]:.0f}" for b in dtypes) + " |")
    if "transformers" in kinds:
        # each ratio two ways: of the medians, and the median of the rounds' own ratios (steps timed seconds apart, so
        # the VM's drift cancels)
        def ratio(a, b):
            per_round = statistics.median(x / y for x, y in zip(times[a], times[b]))
            return f"{med[a] / med[b]:.2f}x (per round {per_round:.2f}x)"
        if bf16:
            print(f"fused bf16 vs transformers fp32: {ratio(('transformers', False), ('fused', True))}; "
                  f"fused bf16 vs transformers bf16: {ratio(('transformers', True), ('fused', True))}; ", end="")
        print(f"fused fp32 vs transformers fp32: {ratio(('transformers', False), ('fused', False))}")


def memory_one(kind):
    # runs in a fresh process: peak RSS of building the 135M model + one fp32 step at T=2048, micro-batch 4
    cfg = GPTConfig(**PRESETS["smol135m"])
    model, opt = build(kind, cfg)
    x = torch.randint(0, cfg.vocab_size, (4, 2049))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = step_fn(model, opt, x[:, :-1].contiguous(), x[:, 1:].contiguous(), False, False)
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{peak / 2**20:.2f} {(peak - base) / 2**20:.2f}")


def memory(malloc):
    print(f"135M, T=2048, micro-batch 4, fp32, one step, fresh process each, malloc {malloc}: (B, T, vocab) fp32 logits = "
          f"{4 * 2048 * 49152 * 4 / 2**30:.2f} GiB")
    print("| head | peak RSS GiB | growth during the step GiB |")
    print("|---|---|---|")
    for kind in ("plain", "fused"):
        out = subprocess.run([sys.executable, __file__, f"--_mem={kind}", f"--malloc={malloc}"], capture_output=True,
                             text=True, check=True)
        peak, grow = out.stdout.split()
        print(f"| {kind} | {peak} | {grow} |")


if __name__ == "__main__":
    args = dict(steps=8, threads=2, malloc="kept", bf16="auto", _mem="")
    for a in sys.argv[1:]:
        k, _, v = a.removeprefix("--").partition("=")
        if k not in args:
            sys.exit(f"unknown option --{k}; valid: {sorted(k for k in args if not k.startswith('_'))}")
        args[k] = type(args[k])(v)
    torch.set_num_threads(args["threads"])
    if args["malloc"] not in ("kept", "default"):
        sys.exit(f"--malloc={args['malloc']}: kept or default")
    if args["bf16"] not in ("auto", "true", "false"):
        sys.exit(f"--bf16={args['bf16']}: auto, true or false")
    if args["malloc"] == "kept":
        kept = cpu_kernels.keep_freed_memory()
        if not args["_mem"]:
            print(f"glibc keeps freed memory (train.py's CPU setting): {kept}")
    if args["_mem"]:
        memory_one(args["_mem"])
    else:
        bf16 = args["bf16"] == "true" or (args["bf16"] == "auto" and cpu_kernels.native_bf16())
        if not bf16:
            print("bf16 autocast not timed: " + ("--bf16=false" if args["bf16"] == "false" else
                  "this CPU has no native bf16 matmuls, so train.py's dtype auto picks fp32 (--bf16=true times it: "
                  "~30x slower, BENCHMARKS.md)"))
        speed(args["steps"], bf16)
        memory(args["malloc"])
