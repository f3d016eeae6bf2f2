"""
The process a training run lives in, and its records: ranks and device (torchrun or one process), the compute dtype
and why, and the run's files on rank 0 (log.txt, which begins with the command, versions and the code itself as
modded-nanogpt's logs do; metrics.jsonl; optional Weights & Biases). train.py's set-up, kept out of its loop.

    rt = Runtime.start(device="auto", dtype="auto")   # reads RANK / LOCAL_RANK / WORLD_SIZE; joins the process group
    log = RunLog(rt, "out/run"); log.print0("hello"); log.metrics({"step": 0, "loss": 3.2})
"""
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

import cpu_kernels


def pick_device(local_rank=0):
    # device "auto" of every script: a CUDA GPU, else Apple silicon's GPU (torch's MPS backend), else the CPU -> (device,
    # why)
    if torch.cuda.is_available():
        return f"cuda:{local_rank}", "a CUDA GPU"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps", "Apple silicon, through torch's MPS backend"
    return "cpu", "no CUDA GPU and no Apple MPS backend in this torch"



def peak_resident_bytes():
    # this process's own high-water mark of resident memory: getrusage's also holds its parent's, inherited at exec
    # (torchrun's, pytest's)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):  # not Linux: ru_maxrss (bytes on macOS, KiB elsewhere)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


@dataclass
class Runtime:
    ddp: bool            # several processes (torchrun): gradients and statistics are reduced across them
    rank: int
    local_rank: int
    world_size: int
    device: str
    device_type: str     # "cuda", "mps" or "cpu"
    dtype: str           # the compute dtype: "float32" or "bfloat16" (autocast, fp32 weights and optimizer state)
    why: str             # how device and dtype were chosen, for the log

    @classmethod
    def start(cls, device="auto", dtype="auto"):
        # torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without it this is one process
        ddp = int(os.environ.get("RANK", -1)) != -1
        rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
        if device == "auto":
            device, why = pick_device(local)
            why = f"device auto -> {device}: {why}"
        else:
            why = f"device {device} (set in the config)"
        device_type = "cuda" if device.startswith("cuda") else "mps" if device == "mps" else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(device)
        if ddp:
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        if dtype == "auto":
            native = device_type == "cpu" and cpu_kernels.native_bf16()
            dtype = "bfloat16" if device_type == "cuda" or native else "float32"
            why += f"; dtype auto -> {dtype}: " + (
                "a CUDA GPU" if device_type == "cuda" else "MPS trains in float32 here (bf16 autocast there is untested)"
                if device_type == "mps" else "this CPU has native bf16 matmuls (AVX512-BF16/AMX)" if native
                else "this CPU has no native bf16 matmuls (AVX512-BF16/AMX)")
        else:
            why += f"; dtype {dtype} (set in the config)"
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        return cls(ddp, rank, local, world, device, device_type, dtype, why)

    @property
    def master(self):
        return self.rank == 0

    @property
    def ptdtype(self):
        return getattr(torch, self.dtype)

    def autocast(self):
        # bf16 autocast runs the matmuls in bf16 while weights, gradients and AdamW state stay fp32
        return torch.autocast(self.device_type, dtype=self.ptdtype) if self.dtype != "float32" else nullcontext()

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def gather(self, obj):
        # every rank's obj, in rank order
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def steps_in(self, seconds, model, B, T, accum, clip=1.0, doc_len=0):
        # -> (how many optimizer steps of this shape fit in `seconds` here, the seconds of one): six steps of a copy of
        # the model on random tokens (forward, backward, clip, AdamW), the first two a warmup (allocations, kernel
        # set-up), the median of the others. The model, its RNG streams and the data are untouched; every rank takes
        # the slowest rank's time. doc_len > 0: attention within documents of that many tokens (doc_masking).
        import copy
        probe = copy.deepcopy(model)
        opt = probe.configure_optimizers(0.0, 1e-6, device_type=self.device_type)
        x = torch.randint(0, model.config.vocab_size, (B, T + 1), device=self.device,
                          generator=torch.Generator(device=self.device).manual_seed(0))
        docs = None
        if doc_len:
            docs = (torch.arange(T, device=self.device) // max(1, round(doc_len))).expand(B, T)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            for _ in range(accum):
                with self.autocast():
                    loss = probe(x[:, :-1], x[:, 1:], docs=docs)[1]
                loss.backward()
            torch.nn.utils.clip_grad_norm_(probe.parameters(), clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.device_type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step = torch.tensor(sorted(times[2:])[1:3], device=self.device).mean()  # the median of the four timed steps
        if self.ddp:
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
        return max(1, int(seconds / step.item())), step.item()

    def memory_gib(self):
        # peak allocated by PyTorch on the GPU; on the CPU the process's peak resident set
        if self.device_type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return peak_resident_bytes() / 2**30

    def end(self, code=0):
        # the run's last call. Every rank waits for the others first (rank 0 writes the last checkpoint), so none tears
        # down a connection another still uses. On gloo (CPU runs) the process then exits at once: gloo's teardown can
        # abort a finished process (SIGABRT in a destructor), which on several nodes left torchrun's agents waiting
        if self.ddp:
            dist.barrier()
            if dist.get_backend() == "gloo":
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            dist.destroy_process_group()


class RunLog:
    """out_dir/log.txt (every printed line, after the run's record), metrics.jsonl and wandb, written on rank 0."""

    def __init__(self, rt, out_dir, wandb_project="", wandb_name="", config=None):
        self.rt, self.path = rt, os.path.join(out_dir, "metrics.jsonl")
        self.file, self.wandb = None, None
        if rt.master:
            os.makedirs(out_dir, exist_ok=True)
            self.file = open(os.path.join(out_dir, "log.txt"), "a")
        if wandb_project and rt.master:
            try:
                import wandb
            except ImportError:
                raise SystemExit("wandb_log=True needs the wandb package: pip install wandb (or --wandb_log=False)")
            self.wandb = wandb.init(project=wandb_project, name=wandb_name or os.path.basename(os.path.abspath(out_dir)),
                                    config=config)

    def print0(self, *args, console=True):
        # print on rank 0 only, and keep every line in out_dir/log.txt
        if self.file is not None:
            s = " ".join(str(a) for a in args)
            if console:
                print(s, flush=True)
            self.file.write(s + "\n")
            self.file.flush()

    def record(self, files, config):
        # the run's record: command, versions, hardware, the code itself, the resolved config
        rt = self.rt
        self.print0(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}", console=False)
        self.print0(f"torch {torch.__version__}, cuda {torch.version.cuda}, python {sys.version.split()[0]}, world_size "
                    f"{rt.world_size}, device {rt.device}", console=False)
        if rt.device_type == "cuda" and rt.master:
            try:
                self.print0(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout, console=False)
            except Exception as e:
                self.print0(f"nvidia-smi: {e}", console=False)
        for name in files:
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)) as f:
                self.print0(f"----- {name} -----\n{f.read()}\n----- end of {name} -----", console=False)
        self.print0("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in config.items()))
        self.print0(rt.why + ("; autocast, with fp32 weights and optimizer state" if rt.dtype != "float32" else ""))
        if rt.device_type == "cpu" and rt.dtype == "bfloat16" and not cpu_kernels.native_bf16():
            self.print0("warning: this CPU has no native bf16 matmuls (AVX512-BF16/AMX), so oneDNN emulates bf16: ~30x "
                        "slower than float32 here (dtype auto picks float32)")
        if rt.device_type == "cpu":
            kept = cpu_kernels.keep_freed_memory()  # a process setting: each step's large tensors reuse the same pages
            self.print0("CPU: the output head's softmax runs in " + (
                "cpu_kernels' C kernel" if cpu_kernels.available() else
                f"PyTorch ({cpu_kernels.why_unavailable()}; cpu_kernels' C kernel is faster)") +
                ("; freed memory stays in the process (no page faults per step)" if kept else ""))

    def settled(self, config, line):
        # the run's config once its length is known (max_steps from epochs or a time budget), in config.json, and the
        # line that says its size
        if self.rt.master:
            with open(os.path.join(os.path.dirname(self.path), "config.json"), "w") as f:
                json.dump(config, f, indent=2)
        self.print0(line)

    def resume_at(self, step, eval_done):
        # a resume from an older checkpoint would log some steps twice: keep the records the checkpoint already covers
        if not (self.rt.master and step > 0 and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        keep = [r for r in recs if r["step"] < step or (r["step"] == step and eval_done and "val_loss" in r)]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def metrics(self, rec):
        if self.rt.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.wandb is not None:
                self.wandb.log(rec, step=rec["step"])

    # the lines of the log: one per step, one per eval (val loss and bits per byte per source), one per eval task;
    # each also writes its record to metrics.jsonl (eval tasks add theirs to the eval's record)

    def step_line(self, rec, max_steps, extra):
        ms, tps, mfu = rec["ms"], rec["tokens_per_s"], rec["mfu"]
        self.print0(f"step {rec['step']:6d}/{max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | norm "
                    f"{rec['grad_norm']:.3f} | " + (f"{ms:.1f} ms | " if ms else "- ms | ")
                    + (f"{tps / 1e6:.3f}M tok/s | " if tps and tps >= 1e5 else f"{tps:,.0f} tok/s | " if tps else "")
                    + "".join(f"{k.split('/')[-1]} {v:.3f} | " for k, v in extra.items())
                    + (f"mfu {100 * mfu:.1f}% | " if mfu is not None else "mfu - | ") + f"mem {rec['mem_gib']:.2f}GiB")
        self.metrics(rec)

    def val_line(self, rec, max_steps, res, extra, seconds):
        self.print0(f"step {rec['step']:6d}/{max_steps} | val_loss {rec['val_loss']:.4f} | "
                    + (f"val_bpb {rec['val_bpb']:.4f} | " if "val_bpb" in rec else "")
                    + " | ".join(f"{s} {v[0]:.4f}" for s, v in res.items())
                    + (f" | swa_val_loss {rec['swa_val_loss']:.4f}" if "swa_val_loss" in rec else "")
                    + "".join(f" | val {k} {v:.3f}" for k, v in extra.items()) + f" | {seconds:.1f} s")

    def eval_line(self, rec, max_steps, task, res, seconds):
        # res {metric: (mean, stderr)} of one task, added to the eval's record as eval/<task>/<metric>[_stderr]
        rec.update({f"eval/{task}/{m}": v for m, (v, _) in res.items() if m != "random"})
        rec.update({f"eval/{task}/{m}_stderr": se for m, (_, se) in res.items() if m != "random"})
        self.print0(f"step {rec['step']:6d}/{max_steps} | eval {task} | " + " | ".join(
            f"{m} {v:.4f}" + ("" if m == "random" else f" ± {se:.4f}") for m, (v, se) in res.items()) + f" | {seconds:.1f} s")

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
