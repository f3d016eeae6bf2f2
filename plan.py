"""
A run's memory and time, planned before it is launched: per rank, on any number of GPUs, on a machine without one.

    python plan.py configs/smol1.7b.py --gpus=8                      # 8 H100s (80 GiB): fits?, step time at 40% MFU
    python plan.py configs/smol1.7b.py --gpus=1,8,64 --gpu_memory=141 --micro_batch_size=4   # train.py's overrides too
    python plan.py configs/quickstart.py --device=cpu --measure       # this CPU's run, then its real peak beside it

How: train.py's config (its defaults, the file, the overrides) gives the model and each data stage's shape. The model
is built on fake tensors (no memory), sharded as train.py shards it (FSDP2 per block over a fake process group of the
world size, as torchtitan's estimate does), and two optimizer steps of train.py's micro steps (forward, backward, the
gradients held across accumulation, clipping, AdamW) are traced by PyTorch's memory tracker, with activation
checkpointing off and on. The peak is the largest sum of live tensors, split by what they are:
- parameters: the fp32 weights (a 1/N shard under FSDP) and, under FSDP, the bf16 copies gathered for the blocks
  computing; gradients: fp32 (DDP also keeps a copy in its all-reduce buckets); AdamW's two moments;
- activations: what the forward keeps for backward; head and temporaries: mostly the fused head's chunk of logits.
A GPU also holds what no tensor shows: the CUDA context, NCCL's buffers and the allocator's fragmentation, here a
stated margin (1.5 GiB + 10%), not a measurement. The step time is FLOPs over a stated MFU (--mfu, 40%), not a
measurement either. With doc_masking, SDPA's causal attention stands in for the documents' (the same memory on a GPU,
where the kernel keeps no mask). On a CPU the plan follows the CPU's own paths (fp32 attention in training, the C
head), so that --measure can check it here: the peak resident set of the same steps with real tensors (glibc's mmap
threshold held at its 128 KiB default, so that freed tensors leave the resident set; train.py instead keeps freed
memory on a CPU, for speed, which shows as up to ~1.3x more).
"""
import ast
import contextlib
import math
import os
import subprocess
import sys

import torch

import model as model_lib
from configurator import configure
from model import GPT, GPTConfig, PRESETS, peak_flops

GIB = 2 ** 30
MARGIN = (1.5 * GIB, 0.10)  # a GPU's memory beyond the tensors: context + NCCL, and the allocator's fragmentation
COLUMNS = ("parameters", "gradients", "optimizer", "activations", "head/temp")


def train_config(argv):
    # train.py's resolved config for argv (a config file, then --key=value): its defaults and the groups of keys that
    # decide the same thing, read from its source (the assignments above its configure() call, and that call)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    cfg, exclusive = {}, None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "configure":
                exclusive = next(ast.literal_eval(k.value) for k in node.value.keywords if k.arg == "exclusive")
                break
            cfg[node.targets[0].id] = ast.literal_eval(node.value)
    if exclusive is None:
        raise RuntimeError("train.py's `config_keys = configure(globals(), ..., exclusive=...)` line is gone")
    configure(cfg, argv, exclusive=exclusive)
    return cfg


def model_config(cfg):
    # the model train.py would build: the preset, the data's vocabulary where data_dir has a tokenizer, the overrides
    if cfg["model"] not in PRESETS:
        raise SystemExit(f"config error: model={cfg['model']!r} is not a preset; choose one of {list(PRESETS)}")
    vocab = {}
    try:
        from tokenizer import Tokenizer
        vocab = {"vocab_size": Tokenizer.from_file(cfg["data_dir"]).vocab_size}
    except (OSError, ValueError):
        pass  # no data here yet: the preset's vocabulary (SmolLM2's 49152)
    return GPTConfig(**{**PRESETS[cfg["model"]], "block_size": cfg["block_size"], **vocab, **cfg["model_overrides"],
                        "fused_head": cfg["fused_head"]})  # (the Triton kernels: the GPU's SDPA stands in, same memory)


def stage_shapes(cfg):
    # each distinct (block_size, micro batch) of the data stages, in order
    out = []
    for s in cfg["stages"] or [{}]:
        shape = (s.get("block_size", cfg["block_size"]), s.get("batch_size", cfg["micro_batch_size"]))
        if shape not in out:
            out.append(shape)
    return out


@contextlib.contextmanager
def gpu_paths(device_type):
    # fake tensors live on the CPU; a GPU's plan must follow its paths (bf16 attention, the PyTorch head, larger chunks)
    saved = model_lib.CPU_PATHS
    model_lib.CPU_PATHS = device_type == "cpu"
    try:
        yield
    finally:
        model_lib.CPU_PATHS = saved


def train_steps(model, opt, x, n_micro, autocast, grad_clip, steps, sharded=False, after_backward=None):
    # train.py's optimizer steps, as the plan traces them (fake tensors) and measure runs them (real ones). Two micro
    # steps stand for any number: the second holds the first's gradients (FSDP: unsharded, unsynced), later ones add
    # nothing new.
    for _ in range(steps):
        micro = min(n_micro, 2)
        for m in range(micro):
            if sharded:
                model.set_requires_gradient_sync(m == micro - 1)
            with autocast:
                loss = model(x, x)[1] / n_micro
            loss.backward()
            if after_backward:
                after_backward()
        if grad_clip > 0 and not sharded:  # (FSDP's clip: a scalar all-reduce of per-shard norms, no memory)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def trace(gcfg, B, T, n_micro, world, fsdp, checkpointing, dtype, device_type, grad_clip):
    # -> {column: bytes at the peak} of one rank, traced over two optimizer steps on fake tensors
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    sharded = fsdp and world > 1
    mesh = None
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.testing._internal.distributed.fake_pg import FakeStore  # the "fake" backend: no peers, no traffic
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        mesh = init_device_mesh("cpu", (world,))  # outside the fake mode: a real (fake-backend) mesh
    ptdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    with FakeTensorMode(), gpu_paths(device_type):
        model = GPT(gcfg)
        model.activation_checkpointing = checkpointing
        model.train()
        if sharded:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
        opt = model.configure_optimizers(0.01, 1e-3)  # fused AdamW, as train.py's on a GPU and a CPU
        if sharded:
            tracker = FSDPMemTracker(mod=model, optm=opt)
        else:
            tracker = MemTracker()
            tracker.track_external(model, opt)
        x = torch.randint(0, gcfg.vocab_size, (B, T))
        autocast = torch.autocast("cpu", dtype=ptdtype, enabled=ptdtype != torch.float32)
        with tracker:  # two steps: the first creates AdamW's state, the second runs with it; after each backward
            # the per-module statistics are reset (the peak stays)
            train_steps(model, opt, x, n_micro, autocast, grad_clip, 2, sharded, after_backward=tracker.reset_mod_stats)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    if sharded:
        dist.destroy_process_group()
    by = {str(k).split(".")[-1].lower(): v for k, v in peak.items()}
    get = lambda *names: sum(by.get(n, 0) for n in names)  # noqa: E731
    out = dict(parameters=get("param", "sharded_param", "unsharded_param", "all_gather", "buffer"),
               gradients=get("grad", "sharded_grad", "unsharded_grad", "reduce_scatter"),
               optimizer=get("opt", "optstate"), activations=get("act", "inp", "inputs"),
               **{"head/temp": get("temp", "oth", "other")})
    out["peak"] = by.get("total", sum(out.values()))
    if world > 1 and not fsdp:  # DDP: the gradients again, in its all-reduce buckets, from its start to its end
        buckets = sum(4 * math.prod(p.shape) for p in model.parameters())
        out["gradients"] += buckets
        out["peak"] += buckets
    return out


def plan(cfg, gpus, gpu_memory, mfu, device_type):
    # prints the plan of each world size and stage shape -> [(world, T, B, {checkpointing: {column: bytes}})]
    gcfg, dtype, out = model_config(cfg), cfg["dtype"], []
    with torch.device("meta"):
        full = GPT(gcfg)
    n_params = full.num_params()
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M"
    for world in gpus:
        for T, B in stage_shapes(cfg):
            tokens = cfg["total_batch_tokens"]
            where = "this CPU" if device_type == "cpu" else f"{world} GPU" + "s" * (world > 1)
            if tokens % (B * T * world):
                print(f"\n{where}: total_batch_tokens={tokens:,} is not a multiple of {B} x {T} x {world}: train.py "
                      f"refuses this world size (change micro_batch_size or total_batch_tokens)")
                continue
            n_micro = tokens // (B * T * world)
            fsdp = cfg["fsdp"] and world > 1
            rows = {ckpt: trace(gcfg, B, T, n_micro, world, fsdp, ckpt, dtype, device_type, cfg["grad_clip"])
                    for ckpt in (cfg["activation_checkpointing"], not cfg["activation_checkpointing"])}
            if fsdp and n_micro > 1:
                for r in rows.values():  # the unsharded fp32 gradients that accumulate between reduce-scatters
                    held = min(r["head/temp"], 4 * n_params)  # (the tracker counts them as temporaries)
                    r["gradients"] += held
                    r["head/temp"] -= held
            out.append((world, T, B, rows))
            unit, div = ("MiB", 2 ** 20) if max(r["peak"] for r in rows.values()) < GIB else ("GiB", GIB)
            mode = "FSDP2" if fsdp else "DDP" if world > 1 else "one process"
            name = cfg["model"] + (" (overridden)" if cfg["model_overrides"] else "")
            print(f"\n{name} ({size} parameters, vocab {gcfg.vocab_size}) on {where}, {mode}, {dtype}: "
                  f"{B} x {T} tokens per micro step, {n_micro} accumulation step{'s' * (n_micro > 1)}; "
                  f"per rank, {unit}:")
            print(f"  {'activation checkpointing':<26}" + "".join(
                f"{('on' if k else 'off') + (' (config)' if k == cfg['activation_checkpointing'] else ''):>16}"
                for k in rows))
            for col in (*COLUMNS, "peak"):
                print(f"  {col:<26}" + "".join(f"{r[col] / div:>16.2f}" for r in rows.values()))
            if device_type != "cuda":
                continue
            need = {k: r["peak"] * (1 + MARGIN[1]) + MARGIN[0] for k, r in rows.items()}
            print(f"  {'+ context, NCCL, 10%':<26}" + "".join(f"{v / GIB:>16.2f}" for v in need.values()))
            mine, other = need[cfg["activation_checkpointing"]], need[not cfg["activation_checkpointing"]]
            if mine > gpu_memory * GIB:
                hint = (f"activation_checkpointing={not cfg['activation_checkpointing']} needs {other / GIB:.1f}"
                        if other <= gpu_memory * GIB else f"lower micro_batch_size (now {B})")
                print(f"  warning: needs {mine / GIB:.1f} GiB, more than the GPU's {gpu_memory:g} GiB: {hint}"
                      + ("" if fsdp or world == 1 else ", or fsdp=True"))
            else:
                print(f"  fits in {gpu_memory:g} GiB ({mine / GIB:.1f} needed)")
            flops = full.flops_per_token(T) * tokens
            step_s = flops / (world * peak_flops("H100") * mfu)
            print(f"  step: {flops:.2e} FLOP = {step_s:.2f} s at {mfu:.0%} MFU on {world} H100 (989 TFLOP/s bf16 "
                  f"each); {cfg['max_steps']:,} steps = {step_s * cfg['max_steps'] / 86400:,.1f} days")
    return out


def measure(cfg, device_type, steps=3):
    # the real peak of the planned steps on this machine, in a fresh process: -> bytes
    code = f"""
import ctypes, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed: freed tensors leave the resident set
import torch
import plan
from runtime import peak_resident_bytes
from model import GPT, GPTConfig
cfg = {dict(cfg)!r}
gcfg = plan.model_config(cfg)
(T, B), dev = plan.stage_shapes(cfg)[0], {device_type!r}
n_micro = cfg["total_batch_tokens"] // (B * T)
dtype = torch.bfloat16 if {cfg['dtype']!r} == "bfloat16" else torch.float32
def run(g, B, T, steps):
    model = GPT(g).to(dev)
    model.activation_checkpointing = cfg["activation_checkpointing"]
    model.train()
    opt = model.configure_optimizers(0.01, 1e-3, device_type=dev)
    x = torch.randint(0, g.vocab_size, (B, T), device=dev)
    autocast = torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32)
    plan.train_steps(model, opt, x, n_micro, autocast, cfg["grad_clip"], steps)
run(GPTConfig(**{{**gcfg.__dict__, "n_layer": 1}}), 1, 16, 2)  # the libraries' first use, not counted
if dev == "cuda":
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    run(gcfg, B, T, {steps}); print(torch.cuda.max_memory_allocated() - base)
else:  # the resident set's high-water mark, reset first: getrusage's would include the parent's, inherited at exec
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = int(open("/proc/self/statm").read().split()[1]) * 4096
    run(gcfg, B, T, {steps})
    print(peak_resident_bytes() - base)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"--measure failed:\n{p.stderr[-3000:]}")
    return int(p.stdout.split()[-1])


def main(argv):
    own = dict(gpus="8", gpu_memory=80.0, mfu=0.4, measure=False)
    rest = []
    for a in argv:
        key = a[2:].split("=")[0] if a.startswith("--") else None
        if key in own:
            value = a.split("=", 1)[1] if "=" in a else "True"
            own[key] = type(own[key])(ast.literal_eval(value) if key != "gpus" else value) \
                if not isinstance(own[key], bool) else value == "True"
        else:
            rest.append(a)
    cfg = train_config(rest)
    if cfg["objective"] != "pretrain":
        raise SystemExit(f"plan.py traces pretraining's step; objective={cfg['objective']!r} is not planned yet")
    device_type = "cpu" if cfg["device"] == "cpu" else "cuda"
    try:
        gpus = [int(g) for g in str(own["gpus"]).split(",")] if device_type == "cuda" else [1]
    except ValueError:
        raise SystemExit(f"--gpus={own['gpus']}: a number of GPUs, or several separated by commas (1,8,64)")
    if cfg["dtype"] == "auto":
        cfg["dtype"] = "bfloat16" if device_type == "cuda" or __import__("cpu_kernels").native_bf16() else "float32"
    if own["measure"]:  # checked before the plan, which takes a while
        if device_type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--measure runs the steps here, and this machine has no GPU: pass --device=cpu")
        gpus = [1]
    plans = plan(cfg, gpus, own["gpu_memory"], own["mfu"], device_type)
    if own["measure"] and plans:
        planned = plans[0][3][cfg["activation_checkpointing"]]["peak"]
        got = measure(cfg, device_type)
        what = "max_memory_allocated" if device_type == "cuda" else "peak resident set"
        T, B = stage_shapes(cfg)[0]
        print(f"\nmeasured ({what} of 3 real steps on this machine, 1 process): {got / 2 ** 20:,.0f} MiB; planned "
              f"{planned / 2 ** 20:,.0f} MiB ({planned / got:.3f}x)")
        print("| plan vs measured | model | micro batch | dtype | planned MiB | measured MiB | planned / measured |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {device_type} | {cfg['model']} | {B} x {T} | {cfg['dtype']} | {planned / 2 ** 20:,.0f} | "
              f"{got / 2 ** 20:,.0f} | {planned / got:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
