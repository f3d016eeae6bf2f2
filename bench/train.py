"""
Training throughput and MFU of the SmolLM2 presets on one GPU: tokens/s of train.py's step (bf16 autocast forward and
backward with fp32 weights, grad-norm clip, fused AdamW) at T=2048, eager or torch.compile'd, with the Triton kernels
off or on. Synthetic tokens: this measures the model and optimizer, not data loading (data.py's loader is ~free).

    python bench/train.py                                    # all presets x {eager, compile} x {kernels off, on}
    python bench/train.py --presets="['smol1.7b']" --steps=20 --activation_checkpointing=True

Prints a markdown table (paste it into BENCHMARKS.md). Without CUDA it says so and exits 0.
"""
import os
import sys
import time

import torch

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, not bench/ (run from the root)
from model import GPT, GPTConfig, PRESETS, peak_flops  # noqa: E402

# -----------------------------------------------------------------------------
presets = ["smol135m", "smol360m", "smol1.7b"]
micro_batch = {"smol135m": 16, "smol360m": 16, "smol1.7b": 8}  # sequences per step: configs/*.py's micro_batch_size
block_size = 2048
steps = 12                    # timed steps, after the warmup ones
warmup = 4                    # untimed: compilation, autotuning, allocator warmup
variants = ["eager", "eager+kernels", "compile", "compile+kernels"]
activation_checkpointing = False
seed = 0
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
configure(globals(), sys.argv[1:], allow_config_file=False)

if not torch.cuda.is_available():
    print("bench/train.py measures GPU training throughput and needs CUDA; nothing to do on this machine.")
    sys.exit(0)

torch.backends.cuda.matmul.allow_tf32 = True
name = torch.cuda.get_device_name()
peak = peak_flops(name)


def bench(preset, variant):
    torch.manual_seed(seed)
    kernels = variant.endswith("+kernels")
    cfg = GPTConfig(**{**PRESETS[preset], "block_size": block_size, "triton_rmsnorm": kernels, "triton_rope": kernels,
                       "triton_attention": kernels})
    raw = GPT(cfg).cuda()
    raw.activation_checkpointing = activation_checkpointing
    model = torch.compile(raw) if variant.startswith("compile") else raw
    opt = raw.configure_optimizers(0.01, 3e-4, (0.9, 0.95), 1e-8, "cuda", decay_all=True)
    B = micro_batch[preset]
    x = torch.randint(0, cfg.vocab_size, (B, block_size + 1), device="cuda")
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tps = B * block_size / dt
    mfu = raw.flops_per_token(block_size) * tps / peak if peak else None
    mem = torch.cuda.max_memory_allocated() / 2**30
    del model, raw, opt
    torch.cuda.empty_cache()
    return dt, tps, mfu, mem, loss.item()


print(f"{name}, torch {torch.__version__}, T={block_size}, bf16 autocast, fp32 weights + fused AdamW, "
      f"activation_checkpointing={activation_checkpointing}")
print("| preset | micro batch | variant | ms/step | tokens/s | MFU | peak mem GiB |")
print("|---|---|---|---|---|---|---|")
for preset in presets:
    for variant in variants:
        try:
            dt, tps, mfu, mem, loss = bench(preset, variant)
            print(f"| {preset} | {micro_batch[preset]} | {variant} | {dt * 1000:.1f} | {tps:,.0f} | "
                  f"{f'{100 * mfu:.1f}%' if mfu is not None else '-'} | {mem:.1f} |", flush=True)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"| {preset} | {micro_batch[preset]} | {variant} | OOM | | | |", flush=True)
        except Exception as e:  # a kernel that does not compile on this GPU should not hide the other rows
            print(f"| {preset} | {micro_batch[preset]} | {variant} | error: {type(e).__name__}: {str(e)[:80]} | | | |", flush=True)
