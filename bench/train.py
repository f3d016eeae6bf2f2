"""
Training throughput and MFU of the SmolLM2 presets on GPUs: tokens/s of train.py's step (bf16 autocast forward and
backward with fp32 weights, grad-norm clip, fused AdamW) at T=2048, eager or torch.compile'd, with the Triton kernels
off or on. Synthetic tokens: this measures the model and optimizer, not data loading (data.py's loader is ~free).

    python bench/train.py                                    # all presets x {eager, compile} x {kernels off, on}
    python bench/train.py --presets="['smol1.7b']" --steps=20 --activation_checkpointing=True
    torchrun --nproc_per_node=8 bench/train.py --parallel=fsdp --variants="['eager']"   # DDP or FSDP2 over NCCL

Under torchrun, `parallel` wraps the model as train.py does: DDP replicas, or FSDP2 (fully_shard per block, then the
root) with bf16 parameters and fp32 gradient reduction; tokens/s counts all ranks, MFU is per GPU.
Prints a markdown table (paste it into BENCHMARKS.md). Without CUDA it says so and exits 0; --device=cpu runs the same
code on the CPU (gloo under torchrun) for a dry run of the script, with meaningless numbers.
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
parallel = "none"             # under torchrun: "ddp" or "fsdp"
device = "cuda"               # "cpu": a dry run of the script (tiny preset; gloo)
seed = 0
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
configure(globals(), sys.argv[1:], allow_config_file=False)

if parallel not in ("none", "ddp", "fsdp"):
    sys.exit(f"bench/train.py: parallel must be none, ddp or fsdp, got {parallel!r}")
if device == "cuda" and not torch.cuda.is_available():
    print("bench/train.py measures GPU training throughput and needs CUDA; nothing to do on this machine.")
    sys.exit(0)
world, rank = 1, 0
if parallel != "none":
    import torch.distributed as dist
    if "RANK" not in os.environ:
        sys.exit(f"bench/train.py: parallel={parallel} needs torchrun (torchrun --nproc_per_node=N bench/train.py ...)")
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

torch.backends.cuda.matmul.allow_tf32 = True
name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run: numbers are meaningless)"
peak = peak_flops(name)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def wrap(raw, compiled):
    # train.py's order: compile, then DDP; FSDP2 shards each block, then the root (embedding, tied head, final norm)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in raw.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
    model = torch.compile(raw) if compiled else raw
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None,
                    broadcast_buffers=False)
    return model


def bench(preset, variant):
    torch.manual_seed(seed)
    kernels = variant.endswith("+kernels")
    cfg = GPTConfig(**{**PRESETS[preset], "block_size": block_size, "triton_rmsnorm": kernels, "triton_rope": kernels,
                       "triton_attention": kernels})
    raw = GPT(cfg).to(device)
    raw.activation_checkpointing = activation_checkpointing
    model = wrap(raw, variant.startswith("compile"))
    opt = raw.configure_optimizers(0.01, 3e-4, (0.9, 0.95), 1e-8, device, decay_all=True)
    B = micro_batch.get(preset, 2)
    x = torch.randint(0, cfg.vocab_size, (B, block_size + 1), device=device)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    dt = (time.perf_counter() - t0) / steps
    tps = world * B * block_size / dt
    mfu = raw.flops_per_token(block_size) * tps / (peak * world) if peak else None
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del model, raw, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return dt, tps, mfu, mem, loss.item()


def print0(*a, **k):
    if rank == 0:
        print(*a, **k, flush=True)


print0(f"{name} x {world} ({parallel if parallel != 'none' else 'one process'}), torch {torch.__version__}, "
       f"T={block_size}, bf16 autocast, fp32 weights + fused AdamW, activation_checkpointing={activation_checkpointing}")
print0("| preset | GPUs | parallel | micro batch | variant | ms/step | tokens/s | MFU | peak mem GiB |")
print0("|---|---|---|---|---|---|---|---|---|")
for preset in presets:
    for variant in variants:
        head = f"| {preset} | {world} | {parallel} | {micro_batch.get(preset, 2)} | {variant} |"
        try:
            dt, tps, mfu, mem, loss = bench(preset, variant)
            print0(f"{head} {dt * 1000:.1f} | {tps:,.0f} | {f'{100 * mfu:.1f}%' if mfu is not None else '-'} | "
                   f"{mem:.1f} |")
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print0(f"{head} OOM | | | |")
        except Exception as e:  # a kernel that does not compile on this GPU should not hide the other rows
            print0(f"{head} error: {type(e).__name__}: {str(e)[:80]} | | | |")
if parallel != "none":
    if device == "cpu":
        # as runtime.Runtime.end (this script keeps no Runtime): gloo's teardown can abort a finished process
        # (SIGABRT, seen in CI), which would fail the dry run that checks this script, so a CPU run leaves without it
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)
    dist.destroy_process_group()
