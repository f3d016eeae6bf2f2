"""
Pretrain a SmolLM2 model: one flat script in the nanoGPT spirit (defaults below, then a config file, then --key=value).

  python train.py configs/quickstart.py                                  # one CPU or GPU, no torchrun
  python train.py configs/smol135m.py --max_steps=1000 --compile=False   # config file, then overrides
  torchrun --standalone --nproc_per_node=8 train.py configs/smol1.7b.py  # one node, 8 GPUs (DDP)
  torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
      --rdzv_endpoint=$HEAD_NODE:29500 train.py configs/smol1.7b.py    # 64 GPUs; run on every node
  ... --init_from=resume                                                 # continue exactly where out_dir stopped

The global batch is set in tokens, so gradient accumulation follows from the world size and every world size
optimises the same objective. SIGTERM/SIGINT save a checkpoint and exit (preemption); out_dir/ holds log.txt (the
code and config of the run, then every log line), metrics.jsonl, config.json and ckpt_<step>.pt files.
Recipe: ../shared/REFERENCE.md §3-§6 (SmolLM2 nanotron configs; WSD and weight averaging from Hägele et al. 2024).
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# default config values: the SmolLM2-135M recipe (REFERENCE.md §3); configs/*.py and --key=value change them
# I/O
out_dir = "out"
init_from = "scratch"         # "scratch", "resume" (newest checkpoint in out_dir), or a ckpt_*.pt / Hugging Face dir / .gguf to continue pretraining from
decay_from = ""               # a cooldown branch: a ckpt_*.pt (or out_dir: its newest) from the stable phase of a WSD run. This run
                              # continues it exactly (weights, optimizer, data position, RNG) in its own out_dir and decays over
                              # decay_steps from there (max_steps = its step + decay_steps); the source run is only read
eval_interval = 1000          # optimizer steps between evals (val loss per source + a sample); also at step 0 and the end
eval_batches = 20             # validation batches per source: a fixed set, so every eval measures the same tokens
checkpoint_interval = 5000    # optimizer steps between checkpoints; one is always written at the end and on SIGTERM
keep_checkpoints = 3          # keep the newest K ckpt_*.pt in out_dir
log_interval = 1              # optimizer steps between log lines (every line also goes to metrics.jsonl)
eval_tasks = []               # downstream tasks at each eval (eval.py's specs: "hellaswag", "mc:file.jsonl", "bigbench:social_iqa", ...),
                              # split across ranks, logged as eval/<task>/<metric>; ("hellaswag", 1000) gives one task its own limit
eval_limit = 500              # the first N examples of each eval task (0 = all)
eval_data_dir = "data_cache/eval"  # where eval.py finds the tasks' files
sample_prompt = "The"         # the text continued at each eval ("" -> no sample)
sample_tokens = 48            # new tokens per sample (sampled: temperature 0.7, top_p 0.9)
end_prompts = []              # after the last step, a sample of each of these prompts instead of sample_prompt's
end_tokens = 96               # new tokens per end sample
wandb_log = False             # log to Weights & Biases too (imported lazily, rank 0 only)
wandb_project = "nanosmol"
wandb_run_name = ""           # "" -> the basename of out_dir
# objective: "pretrain" (next-token loss over every token of the mixture), "sft" (chat data from prepare.py --chat sft:
# whole conversations packed into rows, attention and positions per conversation, the loss on assistant tokens as the
# mean over the global batch's trained tokens) or "dpo" (preference pairs from prepare.py --chat dpo)
objective = "pretrain"
epochs = 0.0                  # sft / dpo: the run's length in passes over the data (0: max_steps decides)
batch_pairs = 128             # dpo: preference pairs per optimizer step (global); micro_batch_size pairs per rank and micro step
dpo_beta = 0.5                # dpo: the sigmoid loss -logsigmoid(beta * (chosen log-ratio - rejected log-ratio))
dpo_label_smoothing = 0.0     # dpo: cDPO's robust variant (0 = the plain sigmoid loss)
dpo_reference = "precompute"  # dpo: the frozen reference's log-probabilities of the pairs the run reads, computed at the
                              # start and stored in out_dir ("precompute"), or by a frozen copy of the initial model at
                              # every step ("online")
# data
data_dir = "data_cache/quickstart"  # a directory built by prepare.py (its manifest names the sources and the tokenizer)
data_prepare = "auto"         # a prepare.py preset to build into data_dir first when incomplete (rank 0); "auto": the
                              # quickstart corpus when data_dir is its directory (so `python train.py` runs offline); "": never
stages = None                 # data.MixtureLoader stages (a stage may add block_size, batch_size, rope_theta); None: one stage, every source of data_dir at its share of tokens
total_batch_tokens = 1048576  # global batch per optimizer step, in tokens (512 x 2048 for 135M)
micro_batch_size = 16         # sequences per GPU per forward/backward
block_size = 2048             # context length (a stage may change it)
seed = 1337                   # weights and data order; the same on every rank (each rank reads its own rows)
# model
model = "smol135m"            # a key of model.PRESETS
model_overrides = {}          # single GPTConfig fields over the preset, e.g. dict(n_layer=4, n_embd=256)
triton_rmsnorm = None         # Triton kernels (kernels/): None = PyTorch for now (opt-in until a GPU run is recorded), True = on
triton_rope = None
triton_attention = None
fused_head = True             # the output head and the loss in chunks, never the (B, T, vocab) logits (model.fused_cross_entropy)
activation_checkpointing = False  # recompute each block in backward: ~1/3 more compute for far less activation memory
compile = False               # torch.compile the model
# optimizer: AdamW as SmolLM2 (nanotron): betas (0.9, 0.95), eps 1e-8, weight decay 0.01 on every parameter
learning_rate = 3e-3          # peak LR
min_lr = 0.0                  # final LR at the end of the decay
weight_decay = 0.01
decay_all_params = True       # nanotron decayed norms too (REFERENCE.md §3); False = only matrices and embeddings
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0               # global grad-norm clip (0 = off)
# schedule (per optimizer step)
max_steps = 2000000           # optimizer steps; the schedule is derived from it
schedule = "wsd"              # "wsd" (warmup-stable-decay, nanotron / Hägele et al.) or "cosine"
warmup_steps = 2000           # linear warmup
warmup_frac = 0.0             # > 0: warmup_steps = this fraction of max_steps (post-training recipes: 0.1)
decay_frac = 0.2              # WSD: the last fraction of max_steps decays to min_lr
decay_steps = 0               # WSD: > 0 sets the decay window in steps instead (a cooldown branch's length)
decay_shape = "linear"        # WSD decay: "linear", "1-sqrt" (Hägele et al.: better than linear) or "cosine"
# weight averaging
swa = False                   # windowed weight averaging (Hägele et al. §5), evaluated beside the raw weights
swa_window = 500              # steps per window; the average of the last finished window is evaluated
# system
device = "auto"               # "auto" -> cuda:LOCAL_RANK if available, else cpu
dtype = "auto"                # "auto" -> bfloat16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), else
                              # float32; weights, gradients and AdamW state stay fp32 either way
fsdp = False                  # shard weights/grads/optimizer state with FSDP2 (fully_shard) instead of DDP replicas
max_nonfinite_steps = 5       # this many non-finite losses in a row stop the run
# -----------------------------------------------------------------------------
# config files (assignments to known keys only) and --key=value (a Python literal of the default's type), in order;
# an unknown key is an error naming the closest valid one (configurator.py)
from configurator import configure  # noqa: E402
config_keys = configure(globals(), sys.argv[1:])
config = {k: globals()[k] for k in config_keys}  # the resolved config: logged, saved with the run and in checkpoints

# checks that would otherwise fail hours into a run
for _k in ("triton_rmsnorm", "triton_rope", "triton_attention"):
    if not (config[_k] is None or isinstance(config[_k], bool)):
        raise SystemExit(f"config error: {_k} must be None (default), True or False, got {config[_k]!r}")
_choices = dict(schedule=("wsd", "cosine"), decay_shape=("linear", "1-sqrt", "cosine"), dtype=("auto", "float32", "bfloat16", "float16"))
for _k, _c in _choices.items():
    if config[_k] not in _c:
        raise SystemExit(f"config error: {_k}={config[_k]!r} is not one of {_c}")
for _k in ("max_steps", "eval_interval", "checkpoint_interval", "keep_checkpoints", "log_interval", "micro_batch_size",
           "block_size", "total_batch_tokens", "swa_window", "max_nonfinite_steps"):
    if config[_k] <= 0:
        raise SystemExit(f"config error: {_k} must be positive, got {config[_k]}")
if objective not in ("pretrain", "sft", "dpo") or dpo_reference not in ("precompute", "online"):
    raise SystemExit(f"config error: objective={objective!r} must be pretrain, sft or dpo; dpo_reference={dpo_reference!r} "
                     f"precompute or online")
if objective != "pretrain" and (stages is not None or data_prepare not in ("", "auto", "chat_demo")):
    raise SystemExit(f"config error: objective={objective!r} reads one chat directory (prepare.py --chat): stages and "
                     f"data_prepare are for pretraining")


def wsd_decay_steps(max_steps, cfg=None):
    # the decay window of a WSD schedule (of this run's config, or another run's)
    cfg = cfg or config
    return cfg.get("decay_steps", 0) or round(cfg["decay_frac"] * max_steps)


def check_warmup(warmup_steps, max_steps):
    # the warmup must reach the peak before the next phase begins (wsd: the decay window; cosine: the end), or the run
    # never trains at its learning_rate (configs/smol135m.py --max_steps=1000 would end in its 2000-step warmup)
    if decay_steps > max_steps:
        raise SystemExit(f"config error: decay_steps={decay_steps} is longer than max_steps={max_steps}")
    end = max_steps - wsd_decay_steps(max_steps) if schedule == "wsd" else max_steps
    if warmup_steps > end:
        why = f"decay_steps={decay_steps}" if decay_steps else f"decay_frac={decay_frac}"
        phase = f"its decay starts at step {end} ({why})" if schedule == "wsd" else "it ends"
        raise SystemExit(f"config error: warmup_steps={warmup_steps} does not fit max_steps={max_steps}: {phase} "
                         f"before the warmup reaches the peak; lower warmup_steps, or set warmup_frac (e.g. 0.01)")


if objective == "dpo" and init_from == "scratch":
    raise SystemExit("config error: objective='dpo' starts from a trained (SFT) model: set init_from")
if not 0 <= decay_frac <= 1:
    raise SystemExit(f"config error: decay_frac must be in [0, 1], got {decay_frac}")
if stages is not None and not (stages and all(isinstance(s, dict) and "weights" in s for s in stages)):
    raise SystemExit("config error: stages must be a non-empty list of dicts with 'start' and 'weights', e.g. [{'start': 0, 'weights': {'web': 1.0}}]")
# max_steps and warmup_steps are final now unless epochs (post-training) or warmup_frac derive them from the data below
if decay_steps < 0 or (decay_from and (schedule != "wsd" or decay_steps == 0)):
    raise SystemExit(f"config error: decay_from needs schedule='wsd' and decay_steps > 0 (the branch's decay), got "
                     f"schedule={schedule!r}, decay_steps={decay_steps}")
if decay_from and init_from not in ("scratch", "resume"):
    raise SystemExit(f"config error: decay_from={decay_from!r} says where this run starts; init_from={init_from!r} "
                     f"would too. Leave init_from unset (or 'resume', to continue the branch itself)")
import checkpoint  # noqa: E402 (train checkpoints: written, found and restored there, shared with sample.py)
import cpu_kernels  # noqa: E402 (the C kernel is compiled below, on the first CPU run on this machine)
_src_dir = decay_from and (os.path.dirname(os.path.normpath(decay_from)) if checkpoint.is_train_checkpoint(decay_from)
                           else decay_from)  # a checkpoint's run, or a run
if decay_from and os.path.realpath(_src_dir or ".") == os.path.realpath(out_dir):
    raise SystemExit(f"config error: decay_from={decay_from!r} is in out_dir={out_dir!r}: a branch writes to its own "
                     f"out_dir, so that the source run can go on and branch again")
_schedule_known = warmup_frac == 0 and not (objective != "pretrain" and epochs > 0) and not decay_from
if _schedule_known:  # fail before any output
    check_warmup(warmup_steps, max_steps)

# -----------------------------------------------------------------------------
# distributed setup: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without it this is one process
ddp = int(os.environ.get("RANK", -1)) != -1
rank, local_rank, world_size = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
if device == "auto":
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cuda":
    torch.cuda.set_device(device)
if ddp:
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
master_process = rank == 0
if fsdp and not ddp:
    print("fsdp=True with one process: nothing to shard, training as a single replica")
    fsdp = False


if dtype == "auto":
    native = device_type == "cpu" and cpu_kernels.native_bf16()
    dtype = "bfloat16" if device_type == "cuda" or native else "float32"
    dtype_why = (f"dtype auto -> {dtype}: " + ("a CUDA GPU" if device_type == "cuda" else "this CPU has native bf16 "
                 "matmuls (AVX512-BF16/AMX)" if native else "this CPU has no native bf16 matmuls (AVX512-BF16/AMX)"))
else:
    dtype_why = f"dtype {dtype} (set in the config)"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
if ptdtype == torch.float16:
    raise SystemExit("dtype=float16 needs a loss scaler, which this script does not have: use bfloat16")
# bf16 autocast runs the matmuls in bf16 while weights, gradients and AdamW state stay fp32
autocast = torch.autocast(device_type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
torch.backends.cudnn.allow_tf32 = True

os.makedirs(out_dir, exist_ok=True) if master_process else None
_log_file = open(os.path.join(out_dir, "log.txt"), "a") if master_process else None


def print0(*args, console=True):
    # print on rank 0 only, and keep every line in out_dir/log.txt
    if master_process:
        s = " ".join(str(a) for a in args)
        if console:
            print(s, flush=True)
        _log_file.write(s + "\n")
        _log_file.flush()


def barrier():
    if ddp:
        dist.barrier()


# the run's record: command, versions, hardware, resolved config, then the code itself (modded-nanogpt)
print0(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}", console=False)
print0(f"torch {torch.__version__}, cuda {torch.version.cuda}, python {sys.version.split()[0]}, world_size {world_size}, device {device}", console=False)
if device_type == "cuda" and master_process:
    try:
        print0(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout, console=False)
    except Exception as e:
        print0(f"nvidia-smi: {e}", console=False)
for _name in ("train.py", "model.py"):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), _name)) as _f:
        print0(f"----- {_name} -----\n{_f.read()}\n----- end of {_name} -----", console=False)
print0("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in config.items()))
print0(dtype_why + ("; autocast, with fp32 weights and optimizer state" if dtype != "float32" else ""))
if device_type == "cpu" and dtype == "bfloat16" and not cpu_kernels.native_bf16():
    print0("warning: this CPU has no native bf16 matmuls (AVX512-BF16/AMX), so oneDNN emulates bf16: ~30x slower than "
           "float32 here (dtype auto picks float32)")
if device_type == "cpu":
    kept = cpu_kernels.keep_freed_memory()  # a process setting: each step's large tensors reuse the same pages
    print0("CPU: the output head's softmax runs in " + ("cpu_kernels' C kernel" if cpu_kernels.available() else
           f"PyTorch ({cpu_kernels.why_unavailable()}; cpu_kernels' C kernel is faster)") +
           ("; freed memory stays in the process (no page faults per step)" if kept else ""))
if master_process:
    with open(os.path.join(out_dir, "config.json"), "w") as _f:
        json.dump(config, _f, indent=2)

import data  # noqa: E402 (after the config, so that `python train.py --bad_key` fails fast)
from model import GPT, GPTConfig, PRESETS, document_mask, peak_flops  # noqa: E402

# -----------------------------------------------------------------------------
# checkpoints: find the one to resume from before anything else, since it carries the model shape and the step

ckpt = None
if init_from == "resume":
    ckpt_path = checkpoint.latest_checkpoint(out_dir)
    if ckpt_path is None and not decay_from:
        raise SystemExit(f"--init_from=resume but {out_dir} has no checkpoint (ckpt_*.pt / ckpt_*.dcp): train from "
                         f"scratch first, or point --out_dir at the run to continue")
    if ckpt_path is not None:
        ckpt = checkpoint.read_train_checkpoint(ckpt_path)
        print0(f"resuming from {ckpt_path} (step {ckpt['step']})")
        if decay_from:  # a cooldown branch's own checkpoint: its length was fixed when it branched
            max_steps = config["max_steps"] = ckpt["config"]["max_steps"]
if decay_from and ckpt is None:
    # a cooldown branch (Hägele et al. 2024): everything of the source run's checkpoint, as a resume would take it,
    # then a decay of decay_steps. Writes only to out_dir.
    ckpt_path = checkpoint.latest_checkpoint(decay_from) if os.path.isdir(decay_from) else decay_from
    if not (ckpt_path and os.path.exists(ckpt_path) and checkpoint.is_train_checkpoint(ckpt_path)):
        raise SystemExit(f"decay_from={decay_from!r}: not a train.py checkpoint (ckpt_*.pt / ckpt_*.dcp) or an out_dir "
                         f"holding one")
    ckpt = checkpoint.read_train_checkpoint(ckpt_path)
    k, src_cfg = ckpt["step"], ckpt["config"]
    src_decay = src_cfg["max_steps"] - wsd_decay_steps(src_cfg["max_steps"], src_cfg)
    if src_cfg["schedule"] != "wsd" or not src_cfg["warmup_steps"] <= k <= src_decay:
        raise SystemExit(f"decay_from: {ckpt_path} is step {k}, not in the stable phase of its run (schedule "
                         f"{src_cfg['schedule']!r}, warmup to step {src_cfg['warmup_steps']}, decay from step "
                         f"{src_decay}): branch from a checkpoint between them")
    max_steps = config["max_steps"] = k + decay_steps
    ckpt["eval_done"] = False  # the branch's own log begins with an eval at step k
    print0(f"cooldown branch of {ckpt_path} at step {k}: decays over {decay_steps} steps to max_steps={max_steps}")
if ckpt is not None:
    changed = {k: (ckpt["config"].get(k), v) for k, v in config.items()
               if k not in ("init_from", "out_dir", "decay_from") and ckpt["config"].get(k) != v}
    for k, (old, new) in changed.items():
        print0(f"  note: {k} was {old!r} in the checkpoint's run, now {new!r}")
    if ckpt["world_size"] != world_size:
        print0(f"  note: the checkpoint was written by {ckpt['world_size']} ranks, now {world_size}: the data order "
               f"continues from the global position, RNG streams restart from rank 0's")

# -----------------------------------------------------------------------------
# data: the staged mixture (data.py), which resolves each stage's block_size and batch size. A stage's rope_theta is
# the model's business (apply_stage below), not the loader's.
if data_prepare == "auto" and objective == "pretrain":
    import corpus
    data_prepare = "quickstart" if os.path.normpath(data_dir) == os.path.normpath(corpus.QUICKSTART_DIR) else ""
if data_prepare and data_prepare != "auto" and master_process:
    import prepare
    try:
        # returns at once when data_dir already holds the complete corpus; the chat demo's sft/ and dpo/ share a parent
        prepare.prepare_preset(data_prepare, os.path.dirname(os.path.normpath(data_dir)) if data_prepare == "chat_demo" else data_dir)
    except data.DataError as e:
        raise SystemExit(f"data error: {e}")
barrier()
try:
    if objective == "pretrain":
        loader = data.MixtureLoader(data_dir, block_size=block_size, batch_size=micro_batch_size, rank=rank,
                                    world_size=world_size, seed=seed,
                                    stages=stages and [{k: v for k, v in s.items() if k != "rope_theta"} for s in stages])
    else:  # chat.py's loaders: one stage, one "source" (the chat data), the same interface here
        import chat
        loader = (chat.SFTLoader(data_dir, block_size, micro_batch_size, rank, world_size, seed) if objective == "sft"
                  else chat.PairLoader(data_dir, micro_batch_size, rank, world_size, seed))
    if ckpt is not None:
        loader.load_state_dict(ckpt["loader"][rank if ckpt["world_size"] == world_size else 0])
except data.DataError as e:
    raise SystemExit(f"data error: {e}")


def stage_shape(i):
    # (block_size, micro batch, rope_theta or None) of stage i, the shape as the loader resolved it
    return loader.stages[i]["block_size"], loader.stages[i]["batch_size"], (stages or loader.stages)[i].get("rope_theta")


for _i in range(1, len(loader.stages)):
    # the loader starts a stage mid-batch when the shape stays; a new shape or rope theta must begin on a step boundary
    start = loader.stages[_i]["start"]
    if (stage_shape(_i)[:2] != stage_shape(_i - 1)[:2] or stage_shape(_i)[2] is not None) and start % total_batch_tokens:
        raise SystemExit(f"config error: stage {_i} changes the context/batch shape or rope_theta, so its start "
                         f"({start:,} tokens) must be a multiple of total_batch_tokens={total_batch_tokens:,}")


def accum_steps(T, B):
    # gradient accumulation so that every optimizer step sees total_batch_tokens at any world size (llm.c); dpo:
    # batch_pairs
    if objective == "dpo":
        if batch_pairs % (B * world_size):
            raise SystemExit(f"batch_pairs={batch_pairs} is not a multiple of micro_batch_size*world_size = {B}*{world_size}")
        return batch_pairs // (B * world_size)
    per_micro = B * T * world_size
    if total_batch_tokens % per_micro:
        raise SystemExit(f"total_batch_tokens={total_batch_tokens} is not a multiple of micro_batch_size*block_size*world_size "
                         f"= {B}*{T}*{world_size} = {per_micro}: change micro_batch_size or total_batch_tokens")
    return total_batch_tokens // per_micro


for _i in range(len(loader.stages)):
    accum_steps(*stage_shape(_i)[:2])  # fail now, not when stage 3 begins
grad_accum_steps = accum_steps(*stage_shape(loader.stage)[:2])
if objective != "pretrain" and epochs > 0:  # the length in passes over the data (an epoch's remainder is dropped)
    per_step = grad_accum_steps * world_size * micro_batch_size  # rows (sft) or pairs (dpo) per optimizer step
    max_steps = config["max_steps"] = max(1, int(epochs * loader.items_per_epoch) // per_step)
    print0(f"epochs={epochs}: {loader.items_per_epoch:,} {'rows' if objective == 'sft' else 'pairs'} per epoch, "
           f"{per_step} per step -> max_steps={max_steps}")
if warmup_frac > 0:
    warmup_steps = config["warmup_steps"] = max(1, round(warmup_frac * max_steps))
if not _schedule_known:
    check_warmup(warmup_steps, max_steps)
if objective == "dpo":
    print0(f"pairs per step: {batch_pairs} = {micro_batch_size} x {world_size} ranks x {grad_accum_steps} accumulation "
           f"steps; {max_steps:,} steps")
else:
    print0(f"tokens per step: {total_batch_tokens:,} = {stage_shape(loader.stage)[1]} seqs x {stage_shape(loader.stage)[0]} "
           f"tokens x {world_size} ranks x {grad_accum_steps} accumulation steps; {max_steps:,} steps = "
           f"{total_batch_tokens * max_steps / 1e9:.3g}B tokens")
val_data = {s: loader.val_batches(s, eval_batches) for s in loader.sources}  # fixed: each rank its own, every eval the same
from tokenizer import Tokenizer  # noqa: E402
try:
    tokenizer = Tokenizer.from_file(data_dir)  # prepare.py keeps the tokenizer the data was encoded with
except (OSError, ValueError) as e:
    raise SystemExit(f"data error: {data_dir} has no usable tokenizer ({e}); prepare.py writes it beside the data")
token_bytes = torch.tensor(tokenizer.token_byte_lengths(), device=device)  # (vocab,): bits per byte in evaluate()
import eval as downstream  # noqa: E402
eval_task_list = []  # (task, limit); a missing file fails now, not at step 1000
for _t in eval_tasks:
    _spec, _limit = (_t, eval_limit) if isinstance(_t, str) else tuple(_t) if len(_t) == 2 else (None, None)
    if not (isinstance(_spec, str) and isinstance(_limit, int)):
        raise SystemExit(f"config error: eval_tasks entries are a task name or (name, limit), got {_t!r}")
    try:
        eval_task_list.append((downstream.load_task(_spec, eval_data_dir), _limit))
    except (downstream.EvalError, OSError) as e:
        raise SystemExit(f"config error: eval_tasks: {e}")

# -----------------------------------------------------------------------------
# model: from the preset, a checkpoint of this script, or a Hugging Face / GGUF checkpoint (continued pretraining)
torch.manual_seed(seed)  # the same initial weights on every rank
runtime_cfg = dict(triton_rmsnorm=triton_rmsnorm, triton_rope=triton_rope, triton_attention=triton_attention,
                   fused_head=fused_head)  # runtime switches, not weights: this run's, also over a checkpoint's
model_name = model  # the config key; `model` becomes the module below
init_tokenizer = None  # (tokenizer, where from) of init_from's weights, checked against the data's tokenizer
if ckpt is None and os.path.isdir(init_from) and not checkpoint.is_train_checkpoint(init_from) \
        and checkpoint.latest_checkpoint(init_from):
    init_from = checkpoint.latest_checkpoint(init_from)  # a train.py out_dir: its newest checkpoint (sft -> dpo)
if ckpt is not None or (init_from != "scratch" and checkpoint.is_train_checkpoint(init_from)):
    src = ckpt if ckpt is not None else checkpoint.read_train_checkpoint(init_from)
    # a .dcp checkpoint (FSDP) of any world size: every rank reads the whole weights, sharded again below
    weights = src["model"] if "dcp" not in src else checkpoint.read_dcp_tensors(src["dcp"], "model")
    raw_model = GPT.from_state_dict(GPTConfig(**{**src["model_config"], **runtime_cfg}), weights, device)
    del weights
    if ckpt is None:
        print0(f"initialised from {init_from} (step {src.get('step')}): weights only, a fresh optimizer at step 0")
        _src_data = src.get("config", {}).get("data_dir")  # that run's tokenizer, where its data directory still is
        if _src_data and os.path.isfile(os.path.join(_src_data, "tokenizer.json")):
            init_tokenizer = (Tokenizer.from_file(_src_data), f"{init_from} (trained on {_src_data})")
    del src
elif init_from != "scratch":
    if not (os.path.exists(init_from) or checkpoint.is_hub_id(init_from)):
        raise SystemExit(f"init_from={init_from!r}: not 'scratch', 'resume', or an existing .pt / .gguf / Hugging Face "
                         f"directory / train.py out_dir / hub id")
    raw_model = GPT.from_pretrained(init_from, **runtime_cfg).train()
    print0(f"initialised from {init_from}: weights only, a fresh optimizer at step 0")
    if raw_model.tokenizer is not None:
        init_tokenizer = (raw_model.tokenizer, init_from)
else:
    if model_name not in PRESETS:
        raise SystemExit(f"model={model_name!r} is not a preset; choose one of {list(PRESETS)}")
    with torch.device(device):  # initialise on the GPU directly: seconds instead of a minute of CPU init for 1.7B
        raw_model = GPT(GPTConfig(**{**PRESETS[model_name], "block_size": block_size, **model_overrides, **runtime_cfg}))
if init_tokenizer is not None and init_tokenizer[0].identity != tokenizer.identity:
    # same ids for the same text, or the weights' embeddings mean other tokens: a vocabulary size that fits is not enough
    raise SystemExit(f"init_from: the weights of {init_tokenizer[1]} come with tokenizer {init_tokenizer[0].identity}, "
                     f"but data_dir={data_dir} was tokenized with {tokenizer.identity}; prepare the data with the model's "
                     f"tokenizer (prepare.py --tokenizer=<the model>) or start from weights trained with this one")
if raw_model.config.vocab_size < tokenizer.vocab_size:
    raise SystemExit(f"the model's vocab_size={raw_model.config.vocab_size} is smaller than the data's tokenizer "
                     f"({tokenizer.vocab_size}): set model_overrides=dict(vocab_size=...) or rebuild the data")
raw_model.to(device)
raw_model.activation_checkpointing = activation_checkpointing
print0(f"model: {raw_model.num_params():,} parameters ({raw_model.num_params(non_embedding=True):,} without the "
       f"embedding), {asdict(raw_model.config)}")


def apply_stage(i):
    # context length / rope theta of stage i (SmolLM2's 2k -> 8k extension raises both at once)
    T, _, theta = stage_shape(i)
    theta = theta if theta is not None else raw_model.config.rope_theta
    if (T, theta) != (raw_model.config.block_size, raw_model.config.rope_theta):
        raw_model.setup_rope(max(T, raw_model.config.block_size), theta)


current_stage = loader.stage
apply_stage(current_stage)

# dpo: the frozen reference is the initial model (the SFT model: init_from, also when this run resumes; checkpoints
# carry where the weights first came from)
init_origin = (ckpt.get("init_origin") or ckpt["config"]["init_from"]) if ckpt is not None else init_from
ref_logps, ref_model = None, None


def load_reference():
    # a frozen copy of the reference model: every step's ("online"), or the stored pass's when a resume reads further
    try:
        return GPT.load(init_origin)[0].to(device).eval().requires_grad_(False)
    except (ValueError, OSError) as e:
        raise SystemExit(f"dpo: the reference model {init_origin} cannot be loaded: {e}")


if objective == "dpo":
    ref_path = os.path.join(out_dir, "dpo_reference.pt")
    if dpo_reference == "online":
        ref_model = load_reference()
    else:
        # the reference log-probabilities of the pairs this run reads, before its first step; NaN for the others (a
        # demo's 40 steps read a third of its train pairs). A resumed run that reads further (a raised max_steps, a
        # branch into a new out_dir) computes what the stored file lacks with the reference model, init_origin.
        if ckpt is not None and os.path.exists(ref_path):
            ref_logps = torch.load(ref_path, map_location="cpu", weights_only=True)
            if ref_logps["tokenizer"] != loader.meta["tokenizer"] or ref_logps["train"].shape[0] != loader.n_pairs["train"]:
                raise SystemExit(f"{ref_path} does not belong to {data_dir}'s pairs: resume with the data it was made for")
        else:
            ref_logps = {"tokenizer": loader.meta["tokenizer"],
                         **{s: torch.full((loader.n_pairs[s], 2), math.nan, dtype=torch.float64) for s in ("train", "val")}}
        steps_left = max_steps - (ckpt["step"] if ckpt is not None else 0)
        wanted = {"train": loader.pairs_ahead(steps_left * grad_accum_steps), "val": loader.val_pairs(eval_batches)}
        missing = {s: [p for p, gone in zip(w, ref_logps[s][w, 0].isnan().tolist()) if gone] for s, w in wanted.items()}
        if missing["train"] or missing["val"]:
            t0 = time.time()
            ref_net = raw_model.eval() if ckpt is None else load_reference()
            for split, pairs in missing.items():
                out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
                mine = list(range(rank, len(pairs), world_size))  # each rank its share, summed across ranks (before
                with torch.no_grad():                             # any wrapping: ranks may run unequal forwards)
                    for i in range(0, len(mine), micro_batch_size):
                        rows = mine[i:i + micro_batch_size]
                        x, y, _ = loader.batch(split, [pairs[j] for j in rows])
                        with autocast:
                            _, lp = ref_net(x.to(device), y.to(device), reduction="rows")
                        out[rows] = lp.view(-1, 2).double()
                if ddp:
                    dist.all_reduce(out)
                ref_logps[split][pairs] = out.cpu()
            raw_model.train()
            del ref_net
            if master_process:
                torch.save(ref_logps, ref_path)
            print0(f"dpo: reference log-probabilities of {len(missing['train']):,} train pairs (of "
                   f"{loader.n_pairs['train']:,}: the ones this run reads) and {len(missing['val']):,} val pairs computed"
                   f"{'' if ckpt is None else ' with ' + init_origin} and stored in {ref_path} ({time.time() - t0:.1f} s)")


def dpo_loss(x, y, idx, split):
    # the sigmoid DPO loss of a micro-batch of pairs (rows 2i / 2i+1 chosen / rejected), the mean over its pairs, and
    # the sums TRL logs: rewards are beta * (policy - reference) log-probability of the response
    _, lp = model(x, y, reduction="rows")
    lp = lp.view(-1, 2)  # (pairs, chosen / rejected)
    if ref_model is not None:
        with torch.no_grad():
            ref = ref_model(x, y, reduction="rows")[1].view(-1, 2)
    else:
        ref = ref_logps[split][idx.cpu().clamp(min=0)]
        if ref.isnan().any():  # pairs_ahead / val_pairs missed one: a bug, not a user's mistake
            raise RuntimeError(f"dpo: no stored reference log-probability for {split} pairs {idx.tolist()}")
        ref = ref.to(device=lp.device, dtype=lp.dtype)
    rewards = dpo_beta * (lp - ref)  # (pairs, 2)
    logits = rewards[:, 0] - rewards[:, 1]
    losses = (-F.logsigmoid(logits) * (1 - dpo_label_smoothing) - F.logsigmoid(-logits) * dpo_label_smoothing)
    r, w = rewards.detach().double(), (idx >= 0).to(device=lp.device, dtype=torch.float64)  # w: 0 for padding pairs
    stats = torch.stack([(losses.detach().double() * w).sum(), (r[:, 0] * w).sum(), (r[:, 1] * w).sum(),
                         ((r[:, 0] - r[:, 1]) * w).sum(), ((r[:, 0] > r[:, 1]).double() * w).sum(), w.sum()])
    return losses.mean(), stats


DPO_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")

# wrap: torch.compile, then DDP (replicas, gradients all-reduced in backward) or FSDP2 (sharded per block)
model = raw_model
if compile:
    print0("compiling the model (the first steps are slow)")
if fsdp:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # as torchtitan: the blocks compute with copies of the weights in the run's dtype (a bf16 all-gather moves half
    # the bytes of fp32) and gradients are reduce-scattered in fp32 into the fp32 shards AdamW updates
    mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32)
    for layer in raw_model.layers:
        if compile:
            layer.compile()  # per block, in place (same parameter names): FSDP's gathers stay between the graphs
        fully_shard(layer, mp_policy=mp)  # each block's weights are gathered just in time for its forward and backward
    fully_shard(raw_model, mp_policy=mp)  # the root holds the embedding (tied to the output head) and the final norm
    print0(f"fsdp: blocks compute in {dtype}, gradients reduced in float32")
elif compile:
    model = torch.compile(model)
if ddp and not fsdp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    # rope tables are deterministic buffers: no per-forward broadcast (which would also hang on uneven eval splits)
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False)

# -----------------------------------------------------------------------------
# optimizer and schedule
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), adam_eps, device_type,
                                           decay_all=decay_all_params)


def get_lr(step):
    # per optimizer step; warmup counts step 0 as the first step (nanoGPT), so no step trains at LR 0
    # 1) linear warmup
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if schedule == "cosine":
        s = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr + (learning_rate - min_lr) * 0.5 * (1 + math.cos(math.pi * s))
    # 2) stable at the peak until the decay window (the last decay_frac of the steps, or decay_steps)
    window = wsd_decay_steps(max_steps)
    decay_start = max_steps - window
    if step < decay_start:
        return learning_rate
    # 3) decay, with s the fraction of the window done (nanotron's formulas, REFERENCE.md §3)
    s = min(1.0, (step - decay_start) / max(1, window))
    f = {"linear": 1 - s, "1-sqrt": 1 - math.sqrt(s), "cosine": 0.5 * (1 + math.cos(math.pi * s))}[decay_shape]
    return min_lr + (learning_rate - min_lr) * f


# state that a resume restores exactly
start_step, eval_done, nonfinite_total, nonfinite_run = 0, False, 0, 0
swa_sum, swa_count, swa_avg = None, 0, None  # fp32 copies of the parameters (sharded like them under FSDP)
named_params = list(raw_model.named_parameters())  # a tied tensor appears once

if ckpt is not None and "dcp" in ckpt:
    # a .dcp checkpoint: optimizer state and SWA tensors read straight into this run's layout (any world size)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = {"optimizer": get_optimizer_state_dict(raw_model, optimizer)}
    sw = ckpt.get("swa")
    for key in ("sum", "avg"):
        if sw is not None and sw[key]:
            state[f"swa_{key}"] = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named_params}
    checkpoint.load_dcp_into(ckpt["dcp"], state)
    set_optimizer_state_dict(raw_model, optimizer, state["optimizer"])
    if sw is not None:
        swa_count = sw["count"]
        swa_sum, swa_avg = ([state[k][n] for n, _ in named_params] if k in state else None for k in ("swa_sum", "swa_avg"))
elif ckpt is not None:
    checkpoint.load_optimizer_state(raw_model, optimizer, ckpt["optimizer"])
    if ckpt.get("swa") is not None:
        sw = ckpt["swa"]
        swa_count = sw["count"]
        swa_sum = [checkpoint.like_param(sw["sum"][n], p) for n, p in named_params] if sw["sum"] is not None else None
        swa_avg = [checkpoint.like_param(sw["avg"][n], p) for n, p in named_params] if sw["avg"] is not None else None
if ckpt is not None:
    start_step, eval_done = ckpt["step"], ckpt["eval_done"]
    nonfinite_total, nonfinite_run = ckpt["nonfinite"]
    checkpoint.set_rng_state(ckpt["rng"][rank if ckpt["world_size"] == world_size else 0], device_type == "cuda")
    del ckpt


def gather(obj):
    # every rank's obj, in rank order
    if not ddp:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(step, eval_done):
    # FSDP: every rank writes its shards of ckpt_<step>.dcp in parallel (torch.distributed.checkpoint). Else rank 0
    # writes ckpt_<step>.pt: DDP replicas are equal, so only rank 0 copies the weights and optimizer state.
    loader_states, rng_states = gather(loader.state_dict()), gather(checkpoint.rng_state(device_type == "cuda"))
    meta = {"model_config": asdict(raw_model.config), "step": step, "config": config, "loader": loader_states,
            "rng": rng_states, "world_size": world_size, "nonfinite": [nonfinite_total, nonfinite_run],
            "eval_done": eval_done, "init_origin": init_origin}
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        t0 = time.time()
        state = {"model": get_model_state_dict(raw_model), "optimizer": get_optimizer_state_dict(raw_model, optimizer)}
        for key, ts in (("swa_sum", swa_sum), ("swa_avg", swa_avg)):
            if swa and ts is not None:
                state[key] = {n: t for (n, _), t in zip(named_params, ts)}
        meta["swa"] = {"count": swa_count, "sum": swa_sum is not None, "avg": swa_avg is not None} if swa else None
        path = checkpoint.write_dcp_checkpoint(out_dir, step, state, meta, keep_checkpoints, master_process)
        print0(f"saved {path} ({time.time() - t0:.1f} s)")
        barrier()
        return
    if master_process:
        t0 = time.time()
        model_sd, optim_sd = checkpoint.full_train_state(raw_model, optimizer)
        full = lambda ts: {n: t.cpu() for (n, _), t in zip(named_params, ts)} if ts is not None else None
        swa_state = {"count": swa_count, "sum": full(swa_sum), "avg": full(swa_avg)} if swa else None
        path = checkpoint.write_train_checkpoint(out_dir, step, {"model": model_sd, "optimizer": optim_sd,
                                                                 "swa": swa_state, **meta}, keep_checkpoints)
        print0(f"saved {path} ({time.time() - t0:.1f} s)")
    barrier()


# -----------------------------------------------------------------------------
# logging helpers: metrics.jsonl (rank 0), optional wandb, MFU against the GPU's peak, memory

metrics_path = os.path.join(out_dir, "metrics.jsonl")
if master_process and start_step > 0 and os.path.exists(metrics_path):
    # a resume from an older checkpoint would log some steps twice: keep the records the checkpoint already covers
    with open(metrics_path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in recs if r["step"] < start_step or (r["step"] == start_step and eval_done and "val_loss" in r)]
    with open(metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
wandb_run = None
if wandb_log and master_process:
    try:
        import wandb
    except ImportError:
        raise SystemExit("wandb_log=True needs the wandb package: pip install wandb (or --wandb_log=False)")
    wandb_run = wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)), config=config)


def log_metrics(rec):
    if master_process:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if wandb_run is not None:
            wandb_run.log(rec, step=rec["step"])


def memory_gib():
    # peak allocated by PyTorch on the GPU; on the CPU the process's peak resident set
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


PEAK = peak_flops(torch.cuda.get_device_name()) if device_type == "cuda" else None  # for MFU


@torch.no_grad()
def evaluate():
    # per source, over its fixed validation batches (each rank holds its own, disjoint share): {source: (mean loss in
    # nats per token, bits per byte)}. Bits per byte = the summed loss / ln 2 / the UTF-8 bytes the targets stand for:
    # it does not depend on the tokenizer, so runs with different tokenizers compare.
    # sft: the mean over the trained tokens of all batches (and their bytes). dpo: {"pairs": (DPO loss, nan)} and the
    # reward statistics in dpo_val
    model.eval()
    out = {}
    for src, batches in val_data.items():
        tot = torch.zeros(5, dtype=torch.float64, device=device)  # (sum of batch means, batches, nats, targets, bytes)
        stats = torch.zeros(6, dtype=torch.float64, device=device)
        for batch in batches:
            batch = [t.to(device) for t in batch]
            with autocast:
                if objective == "dpo":
                    stats += dpo_loss(*batch, "val")[1]
                    continue
                x, y = batch[0], batch[1]
                pos, mask = (batch[2], document_mask(batch[3])) if objective == "sft" else (None, None)
                _, nats = model(x, y, pos, mask, reduction="sum")
            nats, n = nats.double(), (y != -100).sum().double()
            tot += torch.stack([nats / n.clamp(min=1), torch.ones_like(n), nats, n,
                                token_bytes[y.clamp(min=0)][y != -100].sum().double()])
        if ddp:
            dist.all_reduce(tot)
            dist.all_reduce(stats)
        if objective == "dpo":
            global dpo_val
            dpo_val = {k: (stats[i] / stats[5]).item() for i, k in enumerate(DPO_STATS)}
            out[src] = (dpo_val["loss"], float("nan"))
            continue
        loss = tot[0] / tot[1] if objective == "pretrain" else tot[2] / tot[3]  # equal-sized batches / a token mean
        out[src] = (loss.item(), (tot[2] / (math.log(2) * tot[4])).item())  # CPU-GPU sync
    model.train()
    return out


dpo_val = {}


@torch.no_grad()
def evaluate_tasks():
    # eval.py's scoring of eval_tasks, each rank its share of the examples; the per-example scores of all ranks make
    # the mean and stderr: {task: {metric: (mean, stderr)}}. Under FSDP each rank scores with a whole copy gathered from
    # the shards (checkpoint.gathered_model), so ranks need not run the same number of forwards.
    scorer = checkpoint.gathered_model(raw_model, device, all_ranks=True) if fsdp else raw_model
    scorer.eval()
    out = {}
    for task, limit in eval_task_list:
        examples = downstream.task_examples(task, limit, rank, world_size)
        scores = gather(downstream.run_task(scorer, tokenizer, task, examples, device=device, autocast=autocast,
                                            progress=False))  # every rank's {metric: [per-example value]}
        out[task.name] = {m: downstream.mean_stderr([v for s in scores for v in s[m]]) for m in scores[0]}
    raw_model.train()
    return out


def sampler():
    # the model rank 0 samples with (None on other ranks). Under FSDP a whole copy gathered to rank 0 (every rank joins
    # the gather), so generation runs no collective and cannot hang when it stops early at a stop token.
    if fsdp:
        return checkpoint.gathered_model(raw_model, device, all_ranks=False)
    return raw_model.eval() if master_process else None


def sample_text(gen_model, step, prompt, n_tokens):
    # a sampled continuation of prompt with its own generator, so the training RNG streams are untouched
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed + step)
    with autocast:
        out = gen_model.generate(idx, n_tokens, temperature=0.7, top_p=0.9, stop_tokens=(tokenizer.eos_id,), generator=gen)
    # a model may have more rows than the tokenizer has tokens (a padded vocab): ids past it are shown, not decoded
    return "".join(tokenizer.decode([i]) if i < tokenizer.vocab_size else f"<{i}?>" for i in out[0].tolist()) \
        if out.max() >= tokenizer.vocab_size else tokenizer.decode(out[0].tolist())


def swap_swa():
    # exchange the parameters and the window average in place (twice restores them)
    with torch.no_grad():
        for (_, p), a in zip(named_params, swa_avg):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)


stop_signal = None


def on_signal(signum, frame):
    # preemption (SIGTERM) or Ctrl-C: finish the current step, save, exit 0. A second signal kills as usual.
    global stop_signal
    stop_signal = signum
    signal.signal(signum, signal.SIG_DFL)


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)

# -----------------------------------------------------------------------------
# the loop. Eval and checkpoint sit at the top, so they also run at step 0 and after the last step.
model.train()
flops_per_token = raw_model.flops_per_token(stage_shape(current_stage)[0])
t_last, tokens_seen = None, start_step * total_batch_tokens
for step in range(start_step, max_steps + 1):
    last_step = step == max_steps

    # all ranks agree on a stop, so that they all join the collective save
    stop = torch.tensor([stop_signal is not None], dtype=torch.int32, device=device)
    if ddp:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    if stop.item() and not last_step:  # CPU-GPU sync
        save_checkpoint(step, eval_done=False)
        print0(f"stopped by a signal at step {step}: resume with --init_from=resume (same config)")
        break

    if (step % eval_interval == 0 or last_step) and not (step == start_step and eval_done):
        t0 = time.time()
        res = evaluate()  # {source: (val loss, val bpb)}
        mean = lambda i, r: sum(v[i] for v in r.values()) / len(r)  # over sources, each weighted equally
        rec = {"step": step, "val_loss": mean(0, res), "val_bpb": mean(1, res), **{f"val_loss/{s}": v[0] for s, v in res.items()},
               **{f"val_bpb/{s}": v[1] for s, v in res.items()}, **{f"val_{k}": v for k, v in dpo_val.items() if k != "loss"}}
        if swa and swa_avg is not None:
            swap_swa()
            swa_res = evaluate()
            rec["swa_val_loss"], rec["swa_val_bpb"] = mean(0, swa_res), mean(1, swa_res)
            swap_swa()
        if objective == "dpo":  # no bits per byte: the loss is not a likelihood
            rec = {k: v for k, v in rec.items() if "bpb" not in k}
        print0(f"step {step:6d}/{max_steps} | val_loss {rec['val_loss']:.4f} | "
               + (f"val_bpb {rec['val_bpb']:.4f} | " if "val_bpb" in rec else "") + " | ".join(
            f"{s} {v[0]:.4f}" for s, v in res.items()) + (f" | swa_val_loss {rec['swa_val_loss']:.4f}" if "swa_val_loss" in rec else "")
            + "".join(f" | val {k} {v:.3f}" for k, v in dpo_val.items() if k != "loss") + f" | {time.time() - t0:.1f} s")
        if eval_task_list:
            t1 = time.time()
            for task, res in evaluate_tasks().items():
                rec.update({f"eval/{task}/{m}": v for m, (v, _) in res.items() if m != "random"})
                rec.update({f"eval/{task}/{m}_stderr": se for m, (_, se) in res.items() if m != "random"})
                print0(f"step {step:6d}/{max_steps} | eval {task} | " + " | ".join(
                    f"{m} {v:.4f}" + ("" if m == "random" else f" ± {se:.4f}") for m, (v, se) in res.items())
                    + f" | {time.time() - t1:.1f} s")
        log_metrics(rec)
        # a sample at each eval (rank 0); after the last step one per end prompt
        prompts, n_tokens = (end_prompts, end_tokens) if last_step and end_prompts else ([sample_prompt], sample_tokens)
        if any(prompts):
            gen_model = sampler()
            for i, p in enumerate(p for p in prompts if p and gen_model is not None):
                print0(f"sample: {sample_text(gen_model, step + i, p, n_tokens)!r}")
            del gen_model
            raw_model.train()
        t_last = None  # the eval's time is not a training step's
    eval_done = False

    if (step > start_step and step % checkpoint_interval == 0) or last_step:
        save_checkpoint(step, eval_done=True)
        t_last = None
    if last_step:
        break

    # --------------- TRAINING SECTION BEGIN ---------------
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_accum = torch.zeros((), device=device)
    dpo_stats = torch.zeros(6, dtype=torch.float64, device=device)
    micro_step = 0
    if objective == "sft":
        # the loss is the mean over the trained tokens of the whole global batch, so each micro-batch's summed loss is
        # divided by that count (all ranks, all micro-batches: known before the first backward). DDP and FSDP average
        # gradients over ranks, hence the world_size factor. A micro-batch without a trained token adds 0, not NaN.
        sft_batches = [loader.next_batch() for _ in range(grad_accum_steps)]
        n_trained = torch.tensor(float(sum(int((b[1] != -100).sum()) for b in sft_batches)), device=device)
        if ddp:
            dist.all_reduce(n_trained)
        n_trained = n_trained.clamp(min=1)
    while micro_step < grad_accum_steps:
        batch = sft_batches[micro_step] if objective == "sft" else loader.next_batch()
        x, y = batch[0], batch[1]
        if objective == "pretrain" and loader.stage != current_stage:
            # a new data stage (the loader switches the weights, possibly mid-batch); a new context length, micro
            # batch or rope theta is ours, with the accumulation that keeps total_batch_tokens per step
            T_new, B_new, theta_new = stage_shape(loader.stage)
            reshape = (T_new, B_new) != stage_shape(current_stage)[:2] or theta_new not in (None, raw_model.config.rope_theta)
            if reshape and micro_step != 0:  # excluded by the start check above; kept as a guard
                raise SystemExit(f"stage {loader.stage} changed the batch shape inside optimizer step {step}")
            current_stage = loader.stage
            print0(f"stage {current_stage} begins at step {step}: {stages[current_stage]}")
            if reshape:
                apply_stage(current_stage)
                grad_accum_steps = accum_steps(T_new, B_new)
                flops_per_token = raw_model.flops_per_token(T_new)
                val_data = {s: loader.val_batches(s, eval_batches) for s in loader.sources}  # now at the new length
                print0(f"  context {raw_model.config.block_size}, rope_theta {raw_model.config.rope_theta}, "
                       f"{B_new} x {T_new} per micro step, {grad_accum_steps} accumulation steps")
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last_micro = micro_step == grad_accum_steps - 1
        if ddp and not fsdp:
            model.require_backward_grad_sync = last_micro  # all-reduce gradients only on the last micro step
        if fsdp:
            raw_model.set_requires_gradient_sync(last_micro)  # reduce-scatter only on the last micro step
        with autocast:
            if objective == "pretrain":
                _, loss = model(x, y)
                loss = loss / grad_accum_steps  # the gradient of the mean over the whole global batch
            elif objective == "sft":
                _, loss = model(x, y, batch[2].to(device), document_mask(batch[3].to(device)), reduction="sum")
                loss = loss * world_size / n_trained
            else:
                loss, st = dpo_loss(x, y, batch[2], "train")
                loss = loss / grad_accum_steps  # the mean over the global batch's pairs
                dpo_stats += st
        loss_accum += loss.detach()
        loss.backward()
        micro_step += 1
    if ddp:
        dist.all_reduce(loss_accum)  # gloo has no AVG: sum, then divide
        loss_accum /= world_size
        if objective == "dpo":
            dist.all_reduce(dpo_stats)
    if grad_clip > 0:
        norm = checkpoint.to_full(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip))
    else:
        norm = torch.zeros(())
    loss_f, norm_f = loss_accum.item(), float(norm)  # CPU-GPU sync
    finite = math.isfinite(loss_f) and math.isfinite(norm_f)
    if finite:
        optimizer.step()
        nonfinite_run = 0
    else:
        nonfinite_total += 1
        nonfinite_run += 1
    optimizer.zero_grad(set_to_none=True)
    # --------------- TRAINING SECTION END ---------------
    tokens_seen += total_batch_tokens if objective != "dpo" else 0

    if swa and finite:
        # windowed average (Hägele et al. §5): the mean of the weights after each step of a swa_window-step window
        with torch.no_grad():
            if swa_sum is None:
                swa_sum = [torch.zeros_like(p, dtype=torch.float32) for _, p in named_params]
            for (_, p), acc in zip(named_params, swa_sum):
                acc.add_(p.detach().float())
            swa_count += 1
            if (step + 1) % swa_window == 0:
                swa_avg = [acc / swa_count for acc in swa_sum]
                swa_sum, swa_count = None, 0

    # diagnostics
    t_now = time.time()
    dt = (t_now - t_last) if t_last is not None else None  # None: the first step after start/eval/save (compile, warmup)
    t_last = t_now
    if not finite:
        print0(f"step {step:6d}/{max_steps} | non-finite loss {loss_f} (grad norm {norm_f}): step skipped "
               f"({nonfinite_run} in a row, {nonfinite_total} in total)")
        log_metrics({"step": step, "loss": None, "skipped": True, "lr": lr, "nonfinite_total": nonfinite_total})
        if nonfinite_run >= max_nonfinite_steps:
            print0(f"stopping: {nonfinite_run} non-finite losses in a row (steps {step - nonfinite_run + 1}-{step}). "
                   f"The weights are probably broken: resume from an earlier checkpoint (--init_from=resume with only "
                   f"the good ckpt_*.pt left in out_dir) with a lower learning_rate, or check the data.")
            if ddp:
                dist.destroy_process_group()
            sys.exit(1)
        continue
    if step % log_interval == 0 or step == max_steps - 1:
        tps = total_batch_tokens / dt if dt and objective != "dpo" else None
        mfu = flops_per_token * tps / (PEAK * world_size) if (tps and PEAK) else None
        rec = {"step": step, "loss": loss_f, "lr": lr, "grad_norm": norm_f, "ms": dt * 1000 if dt else None,
               "tokens_per_s": tps, "mfu": mfu, "mem_gib": memory_gib(), "tokens": tokens_seen, "stage": current_stage}
        if objective == "dpo":
            rec.update({k: (dpo_stats[i] / dpo_stats[5]).item() for i, k in enumerate(DPO_STATS) if i})
            rec.update(tokens_per_s=None, mfu=None)
        print0(f"step {step:6d}/{max_steps} | loss {loss_f:.4f} | lr {lr:.2e} | norm {norm_f:.3f} | "
               + (f"{dt * 1000:.1f} ms | {tps / 1e6:.3f}M tok/s | " if tps and tps >= 1e5 else f"{dt * 1000:.1f} ms | {tps:,.0f} tok/s | " if tps
                  else f"{dt * 1000:.1f} ms | " if dt else "- ms | ")
               + ("".join(f"{k.split('/')[1]} {rec[k]:.3f} | " for k in DPO_STATS[1:] if k in rec))
               + (f"mfu {100 * mfu:.1f}% | " if mfu is not None else "mfu - | ") + f"mem {rec['mem_gib']:.2f}GiB")
        log_metrics(rec)

if wandb_run is not None:
    wandb_run.finish()
if ddp:
    dist.destroy_process_group()
