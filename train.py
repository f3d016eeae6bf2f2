"""
Train a SmolLM2 model: one flat script in the nanoGPT spirit (defaults below, then a config file, then --key=value).
Pretraining, SFT and preference optimisation (DPO, APO-zero, IPO) share this loop; what differs between them lives in
objectives.py, one unit each.

  python train.py configs/quickstart.py                                  # one CPU or GPU, no torchrun
  python train.py configs/smol135m.py --max_steps=1000 --compile=False   # config file, then overrides
  torchrun --standalone --nproc_per_node=8 train.py configs/smol1.7b.py  # one node, 8 GPUs (DDP)
  torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
      --rdzv_endpoint=$HEAD_NODE:29500 train.py configs/smol1.7b.py    # 64 GPUs; run on every node
  ... --init_from=resume                                                 # continue exactly where out_dir stopped

The global batch is set in tokens, so gradient accumulation follows from the world size and every world size
optimises the same objective. SIGTERM/SIGINT save a checkpoint and exit (preemption); out_dir/ holds log.txt (the
code and config of the run, then every log line), metrics.jsonl, config.json, the tokenizer and ckpt_<step> files.
Recipe: ../shared/REFERENCE.md §3-§6 (SmolLM2 nanotron configs; WSD and weight averaging from Hägele et al. 2024).
"""
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# default config values: the SmolLM2-135M recipe (REFERENCE.md §3); configs/*.py and --key=value change them
# I/O
out_dir = "out"
init_from = "scratch"         # "scratch", "resume" (newest checkpoint in out_dir), or weights to continue from: a train.py
                              # out_dir or ckpt_*, a Hugging Face dir, a .gguf (anything checkpoint.open_model opens)
decay_from = ""               # a cooldown branch: a ckpt_*.pt (or out_dir: its newest) from the stable phase of a WSD run. This run
                              # continues it exactly (weights, optimizer, data position, RNG) in its own out_dir and decays over
                              # decay_steps from there (max_steps = its step + decay_steps); the source run is only read
eval_interval = 1000          # optimizer steps between evals (val loss per source + a sample); also at step 0 and the end
eval_batches = 20             # validation batches per source: a fixed set, so every eval measures the same tokens
checkpoint_interval = 5000    # optimizer steps between checkpoints; one is always written at the end and on SIGTERM
keep_checkpoints = 3          # keep the newest K ckpt_*.pt in out_dir
log_interval = 1              # optimizer steps between log lines (every line also goes to metrics.jsonl)
eval_tasks = []               # downstream tasks at each eval (eval.py's specs: "hellaswag", "mc:file.jsonl", "gen:file.jsonl",
                              # ...), split across ranks, logged as eval/<task>/<metric>; ("hellaswag", 1000) gives one task its own limit
eval_limit = 500              # the first N examples of each eval task (0 = all)
eval_data_dir = "data_cache/eval"  # where eval.py finds the tasks' files
sample_prompt = "The"         # the text continued at each eval ("" -> no sample)
sample_tokens = 48            # new tokens per sample (sampled: temperature 0.7, top_p 0.9)
end_prompts = []              # after the last step, a sample of each of these prompts instead of sample_prompt's
end_tokens = 96               # new tokens per end sample
wandb_log = False             # log to Weights & Biases too (imported lazily, rank 0 only)
wandb_project = "nanosmol"
wandb_run_name = ""           # "" -> the basename of out_dir
# objective (objectives.py): "pretrain" (next-token loss over every token of the mixture), "sft" (chat data from
# prepare.py --chat sft: whole conversations packed into rows, the loss on assistant tokens), or a preference loss on
# pairs from prepare.py --chat dpo against the frozen initial model: "dpo", "apo_zero" (SmolLM3's) or "ipo" (TRL's)
objective = "pretrain"
epochs = 0.0                  # sft / preference: the run's length in passes over the data (0: max_steps decides)
batch_pairs = 128             # preference: pairs per optimizer step (global); micro_batch_size pairs per rank and micro step
dpo_beta = 0.5                # preference: the beta of the dpo / apo_zero / ipo loss (TRL's)
dpo_label_smoothing = 0.0     # dpo: cDPO's robust variant (0 = the plain sigmoid loss)
dpo_reference = "precompute"  # preference: the frozen reference's log-probabilities of the pairs the run reads, computed
                              # at the start and stored in out_dir ("precompute"), or by a frozen copy at every step ("online")
# data
data_dir = "data_cache/quickstart"  # a directory built by prepare.py (its manifest names the sources and the tokenizer)
data_prepare = "auto"         # a prepare.py preset to build into data_dir first when incomplete (rank 0); "auto": the
                              # quickstart corpus when data_dir is its directory (so `python train.py` runs offline); "": never
stages = None                 # data.MixtureLoader stages (a stage may add block_size, batch_size, rope_theta); None: one stage, every source of data_dir at its share of tokens
sources = {}                  # where prepare.py --config finds each source: name -> dict(hub=, files=, text=, filter=) (sources.py)
total_batch_tokens = 1048576  # global batch per optimizer step, in tokens (512 x 2048 for 135M)
micro_batch_size = 16         # sequences per GPU per forward/backward
block_size = 2048             # context length (a stage may change it)
doc_masking = False           # pretraining: attention within each document of a window, not across <|endoftext|> (SmolLM3,
                              # torchtitan); SmolLM2 attended across them. sft is always document-masked
doc_positions = False         # pretraining with doc_masking: positions restart at each document too (as sft's)
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
time_budget = 0.0             # > 0: seconds of training steps; max_steps then follows from this machine's measured step
                              # time (recorded in the run's config, so a resume continues the same schedule)
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
# an unknown key is an error naming the closest valid one; of keys that decide the same thing the one set last wins
from configurator import configure, require  # noqa: E402
config_keys = configure(globals(), sys.argv[1:], exclusive=[("max_steps", "epochs", "time_budget"),
                                                            ("warmup_steps", "warmup_frac"), ("decay_frac", "decay_steps")])
config = {k: globals()[k] for k in config_keys}  # the resolved config: logged, saved with the run and in checkpoints

# checks that would otherwise fail hours into a run
from objectives import OBJECTIVES, Run  # noqa: E402
require(config, dict(schedule=("wsd", "cosine"), decay_shape=("linear", "1-sqrt", "cosine"), objective=tuple(OBJECTIVES),
                     dtype=("auto", "float32", "bfloat16", "float16"), dpo_reference=("precompute", "online"),
                     **{k: (None, True, False) for k in ("triton_rmsnorm", "triton_rope", "triton_attention")}),
        positive=("max_steps", "eval_interval", "checkpoint_interval", "keep_checkpoints", "log_interval",
                  "micro_batch_size", "block_size", "total_batch_tokens", "swa_window", "max_nonfinite_steps"))
if _error := OBJECTIVES[objective].config_error(config):
    raise SystemExit(f"config error: {_error}")
if not 0 <= decay_frac <= 1:
    raise SystemExit(f"config error: decay_frac must be in [0, 1], got {decay_frac}")
if stages is not None and not (stages and all(isinstance(s, dict) and "weights" in s for s in stages)):
    raise SystemExit("config error: stages must be a non-empty list of dicts with 'start' and 'weights', e.g. [{'start': 0, 'weights': {'web': 1.0}}]")
if decay_steps < 0 or (decay_from and (schedule != "wsd" or decay_steps == 0)):
    raise SystemExit(f"config error: decay_from needs schedule='wsd' and decay_steps > 0 (the branch's decay), got "
                     f"schedule={schedule!r}, decay_steps={decay_steps}")
if decay_from and init_from not in ("scratch", "resume"):
    raise SystemExit(f"config error: decay_from={decay_from!r} says where this run starts; init_from={init_from!r} "
                     f"would too. Leave init_from unset (or 'resume', to continue the branch itself)")
if dtype == "float16":
    raise SystemExit("config error: dtype=float16 needs a loss scaler, which this script does not have: use bfloat16")
import checkpoint  # noqa: E402 (train checkpoints: written, found and restored there)
_src_dir = os.path.dirname(os.path.normpath(decay_from)) if checkpoint.is_train_checkpoint(decay_from) else decay_from
if decay_from and os.path.realpath(_src_dir) == os.path.realpath(out_dir):  # a checkpoint's run, or a run
    raise SystemExit(f"config error: decay_from={decay_from!r} is in out_dir={out_dir!r}: a branch writes to its own "
                     f"out_dir, so that the source run can go on and branch again")


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


_schedule_known = warmup_frac == 0 and epochs == 0 and time_budget == 0 and not decay_from
if _schedule_known:  # fail before any output
    check_warmup(warmup_steps, max_steps)

# -----------------------------------------------------------------------------
# the process (runtime.py): ranks and device from torchrun (or one process), the compute dtype, the run's log files
from runtime import Runtime, RunLog  # noqa: E402
rt = Runtime.start(device, dtype)
rank, world_size, ddp, device, device_type, dtype = rt.rank, rt.world_size, rt.ddp, rt.device, rt.device_type, rt.dtype
master_process, ptdtype, autocast = rt.master, rt.ptdtype, rt.autocast()
if fsdp and not ddp:
    print("fsdp=True with one process: nothing to shard, training as a single replica")
    fsdp = False
log = RunLog(rt, out_dir, wandb_project if wandb_log else "", wandb_run_name, config)
print0 = log.print0
log.record(("train.py", "model.py", "objectives.py"), config)

import data  # noqa: E402 (after the config, so that `python train.py --bad_key` fails fast)
import eval as downstream  # noqa: E402
from engine import Engine, Request  # noqa: E402
from model import GPT, GPTConfig, PRESETS, peak_flops  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
# checkpoints: find the one to resume from before anything else, since it carries the model shape and the step
runtime_cfg = dict(triton_rmsnorm=triton_rmsnorm, triton_rope=triton_rope, triton_attention=triton_attention,
                   fused_head=fused_head)  # runtime switches, not weights: this run's, also over a checkpoint's
opened = None  # checkpoint.Opened of the run this one continues (resume, decay_from), or of init_from's weights


def open_weights(path, what):
    try:
        return checkpoint.open_model(path, device, need_tokenizer=False, **runtime_cfg)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{what}={path!r}: {e}")


if init_from == "resume":
    ckpt_path = checkpoint.latest_checkpoint(out_dir)
    if ckpt_path is None and not decay_from:
        raise SystemExit(f"--init_from=resume but {out_dir} has no checkpoint (ckpt_*.pt / ckpt_*.dcp): train from "
                         f"scratch first, or point --out_dir at the run to continue")
    if ckpt_path is not None:
        opened = open_weights(ckpt_path, "resume")
        print0(f"resuming from {opened.source}")
        if decay_from or time_budget:  # a branch's or a timed run's length was fixed when it began
            max_steps = config["max_steps"] = opened.ckpt["config"]["max_steps"]
if decay_from and opened is None:
    # a cooldown branch (Hägele et al. 2024): everything of the source run's checkpoint, as a resume would take it,
    # then a decay of decay_steps. Writes only to out_dir.
    ckpt_path = checkpoint.latest_checkpoint(decay_from) if os.path.isdir(decay_from) else decay_from
    if not (ckpt_path and os.path.exists(ckpt_path) and checkpoint.is_train_checkpoint(ckpt_path)):
        raise SystemExit(f"decay_from={decay_from!r}: not a train.py checkpoint (ckpt_*.pt / ckpt_*.dcp) or an out_dir "
                         f"holding one")
    opened = open_weights(ckpt_path, "decay_from")
    k, src_cfg = opened.ckpt["step"], opened.ckpt["config"]
    src_decay = src_cfg["max_steps"] - wsd_decay_steps(src_cfg["max_steps"], src_cfg)
    if src_cfg["schedule"] != "wsd" or not src_cfg["warmup_steps"] <= k <= src_decay:
        raise SystemExit(f"decay_from: {ckpt_path} is step {k}, not in the stable phase of its run (schedule "
                         f"{src_cfg['schedule']!r}, warmup to step {src_cfg['warmup_steps']}, decay from step "
                         f"{src_decay}): branch from a checkpoint between them")
    max_steps = config["max_steps"] = k + decay_steps
    opened.ckpt["eval_done"] = False  # the branch's own log begins with an eval at step k
    print0(f"cooldown branch of {ckpt_path} at step {k}: decays over {decay_steps} steps to max_steps={max_steps}")
ckpt = opened.ckpt if opened is not None else None  # the whole state this run continues from
if ckpt is not None:
    for k, v in config.items():
        if k not in ("init_from", "out_dir", "decay_from") and ckpt["config"].get(k) != v:
            print0(f"  note: {k} was {ckpt['config'].get(k)!r} in the checkpoint's run, now {v!r}")
    if ckpt["world_size"] != world_size:
        print0(f"  note: the checkpoint was written by {ckpt['world_size']} ranks, now {world_size}: the data order "
               f"continues from the global position, RNG streams restart from rank 0's")

# -----------------------------------------------------------------------------
# data: the tokenizer of data_dir (built first from an embedded corpus where data_prepare says so)
obj = OBJECTIVES[objective](Run(config, rank, world_size, ddp, device, autocast, print0))
preset = obj.data_preset()
if preset and master_process:
    import prepare
    try:
        prepare.prepare_preset(*preset)  # returns at once when the directory already holds the complete corpus
    except data.DataError as e:
        raise SystemExit(f"data error: {e}")
rt.barrier()
try:
    tokenizer = Tokenizer.from_file(data_dir)  # prepare.py keeps the tokenizer the data was encoded with
except (OSError, ValueError) as e:
    raise SystemExit(f"data error: {data_dir} has no usable tokenizer ({e})\n---> HINT: python prepare.py --out {data_dir} ...")
if master_process:
    tokenizer.save(out_dir)  # beside the checkpoints, so that checkpoint.open_model decodes them wherever data_dir goes
try:
    eval_task_list = downstream.task_list(eval_tasks, eval_limit, eval_data_dir)
except (downstream.EvalError, OSError) as e:
    raise SystemExit(f"config error: eval_tasks: {e}")

# -----------------------------------------------------------------------------
# model: from the preset, a checkpoint this run continues, or init_from's weights (continued pretraining, post-training)
torch.manual_seed(seed)  # the same initial weights on every rank
model_name = model  # the config key; `model` becomes the module below
init_origin = init_from  # where the initial weights came from (the preference reference)
if opened is not None:
    raw_model = opened.model
    init_origin = ckpt.get("init_origin") or ckpt["config"]["init_from"]
elif init_from != "scratch":
    if os.path.isdir(init_from) and not checkpoint.is_train_checkpoint(init_from) and checkpoint.latest_checkpoint(init_from):
        init_from = init_origin = checkpoint.latest_checkpoint(init_from)  # a train.py out_dir: its newest checkpoint
    opened = open_weights(init_from, "init_from")
    raw_model = opened.model
    print0(f"initialised from {opened.source}: weights only, a fresh optimizer at step 0")
    if opened.tokenizer_identity not in (None, tokenizer.identity):
        # the same ids for the same text, or the weights' embeddings mean other tokens: a vocab size that fits is not enough
        raise SystemExit(f"init_from: the weights of {init_from} come with tokenizer {opened.tokenizer_identity}, but "
                         f"data_dir={data_dir} was tokenized with {tokenizer.identity}; prepare the data with the model's "
                         f"tokenizer (prepare.py --tokenizer=<the model>) or start from weights trained with this one")
    opened = None  # its checkpoint state (if it was one) is not continued
else:
    if model_name not in PRESETS:
        raise SystemExit(f"model={model_name!r} is not a preset; choose one of {list(PRESETS)}")
    with torch.device(device):  # initialise on the GPU directly: seconds instead of a minute of CPU init for 1.7B
        raw_model = GPT(GPTConfig(**{**PRESETS[model_name], "block_size": block_size, "vocab_size": tokenizer.vocab_size,
                                     **model_overrides, **runtime_cfg}))  # the data's vocabulary unless overridden
if raw_model.config.vocab_size < tokenizer.vocab_size:
    raise SystemExit(f"the model's vocab_size={raw_model.config.vocab_size} is smaller than the data's tokenizer "
                     f"({tokenizer.vocab_size}): set model_overrides=dict(vocab_size=...) or rebuild the data")
raw_model.to(device).train()
raw_model.activation_checkpointing = activation_checkpointing
print0(f"model: {raw_model.num_params():,} parameters ({raw_model.num_params(non_embedding=True):,} without the "
       f"embedding), {asdict(raw_model.config)}")
T0, B0 = ((stages or [{}])[0].get(k, v) for k, v in (("block_size", block_size), ("batch_size", micro_batch_size)))
if time_budget > 0 and ckpt is None:  # the run's length from this machine's speed: the same time on every machine
    max_steps, step_s = rt.steps_in(time_budget, raw_model, B0, T0, obj.accum_steps(T0, B0), grad_clip,
                                    obj.probe_doc_len())
    config["max_steps"] = max_steps
    print0(f"time_budget={time_budget:g} s: a step takes {1000 * step_s:.0f} ms here -> max_steps={max_steps}")

# -----------------------------------------------------------------------------
# the objective's loader (a staged mixture for pretraining: a stage's start is tokens, or a fraction of the run's),
# which resolves each stage's block_size and batch
try:
    loader = obj.loader(max_steps)
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
for _i in range(len(loader.stages)):
    obj.accum_steps(*stage_shape(_i)[:2])  # fail now, not when stage 3 begins
grad_accum_steps = obj.accum_steps(*stage_shape(loader.stage)[:2])
if epochs > 0:  # the length in passes over the data (an epoch's remainder is dropped)
    per_step = grad_accum_steps * world_size * micro_batch_size  # rows (sft) or pairs (preference) per optimizer step
    max_steps = config["max_steps"] = max(1, int(epochs * loader.items_per_epoch) // per_step)
    print0(f"epochs={epochs}: {loader.items_per_epoch:,} items per epoch, {per_step} per step -> max_steps={max_steps}")
if warmup_frac > 0:
    warmup_steps = config["warmup_steps"] = max(1, round(warmup_frac * max_steps))
if not _schedule_known:
    check_warmup(warmup_steps, max_steps)
log.settled(config, obj.describe(grad_accum_steps, max_steps))  # config.json with the final max_steps


def apply_stage(i):
    # context length / rope theta of stage i (SmolLM2's 2k -> 8k extension raises both at once)
    T, _, theta = stage_shape(i)
    theta = theta if theta is not None else raw_model.config.rope_theta
    if (T, theta) != (raw_model.config.block_size, raw_model.config.rope_theta):
        raw_model.setup_rope(max(T, raw_model.config.block_size), theta)


current_stage = loader.stage
apply_stage(current_stage)
obj.setup(raw_model, tokenizer, ckpt, max_steps, grad_accum_steps, init_origin)  # validation data; the reference pass

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
    model = DDP(model, device_ids=[rt.local_rank] if device_type == "cuda" else None, broadcast_buffers=False)

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
named_params = list(raw_model.named_parameters())  # a tied tensor appears once
swa_state = {"count": 0, "sum": None, "avg": None} if swa else None  # fp32 copies, laid out (sharded) like the parameters
if ckpt is not None:
    restored = checkpoint.restore_run(ckpt, raw_model, optimizer)
    if swa and restored is not None:
        swa_state = restored
    start_step, eval_done = ckpt["step"], ckpt["eval_done"]
    nonfinite_total, nonfinite_run = ckpt["nonfinite"]
    checkpoint.set_rng_state(ckpt["rng"][rank if ckpt["world_size"] == world_size else 0], device_type == "cuda")
    del ckpt, opened


def save_checkpoint(step, eval_done):
    t0 = time.time()
    meta = {"model_config": asdict(raw_model.config), "step": step, "config": config,
            "loader": rt.gather(loader.state_dict()), "rng": rt.gather(checkpoint.rng_state(device_type == "cuda")),
            "world_size": world_size, "nonfinite": [nonfinite_total, nonfinite_run], "eval_done": eval_done,
            "tokenizer": tokenizer.identity, "init_origin": init_origin, **obj.state_dict()}
    path = checkpoint.save_run(out_dir, step, raw_model, optimizer, swa_state, meta, fsdp, keep_checkpoints,
                               master_process)
    print0(f"saved {path} ({time.time() - t0:.1f} s)")
    rt.barrier()


log.resume_at(start_step, eval_done)
PEAK = peak_flops(torch.cuda.get_device_name()) if device_type == "cuda" else None  # for MFU


def plain_model(all_ranks):
    # the model to score or sample with (sampling: rank 0 only). Under FSDP a whole copy gathered from the shards (every
    # rank joins), so ranks may stop at different tokens or run different numbers of forwards without a collective.
    if fsdp:
        return checkpoint.gathered_model(raw_model, device, all_ranks=all_ranks)
    return raw_model.eval() if all_ranks or master_process else None


def swap_swa():
    # exchange the parameters and the window average in place (twice restores them)
    with torch.no_grad():
        for (_, p), a in zip(named_params, swa_state["avg"]):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)


stop_signal = []  # preemption (SIGTERM) or Ctrl-C: finish the current step, save, exit 0. A second signal kills as usual


def on_signal(signum, frame):
    stop_signal.append(signum)
    signal.signal(signum, signal.SIG_DFL)


for _sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_sig, on_signal)

# -----------------------------------------------------------------------------
# the loop. Eval and checkpoint sit at the top, so they also run at step 0 and after the last step.
model.train()
flops_per_token = raw_model.flops_per_token(stage_shape(current_stage)[0])
t_last, tokens_seen = None, start_step * total_batch_tokens
for step in range(start_step, max_steps + 1):
    last_step = step == max_steps

    stop = torch.tensor([bool(stop_signal)], dtype=torch.int32, device=device)
    if ddp:  # all ranks agree on a stop, so that they all join the collective save
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    if stop.item() and not last_step:  # CPU-GPU sync
        save_checkpoint(step, eval_done=False)
        print0(f"stopped by a signal at step {step}: resume with --init_from=resume (same config)")
        break

    if (step % eval_interval == 0 or last_step) and not (step == start_step and eval_done):
        t0 = time.time()
        res, extra = obj.validate(model)  # {source: (val loss, val bpb)}, e.g. the preference rewards
        mean = lambda i, r: sum(v[i] for v in r.values()) / len(r)  # over sources, each weighted equally
        rec = {"step": step, "val_loss": mean(0, res), "val_bpb": mean(1, res), **{f"val_loss/{s}": v[0] for s, v in res.items()},
               **{f"val_bpb/{s}": v[1] for s, v in res.items()}, **{f"val_{k}": v for k, v in extra.items()}}
        if swa and swa_state["avg"] is not None:
            swap_swa()
            swa_res = obj.validate(model)[0]
            rec["swa_val_loss"], rec["swa_val_bpb"] = mean(0, swa_res), mean(1, swa_res)
            swap_swa()
        rec = {k: v for k, v in rec.items() if not ("bpb" in k and math.isnan(v))}  # no bpb where there is no likelihood
        log.val_line(rec, max_steps, res, extra, time.time() - t0)
        if eval_task_list:
            t1, scorer = time.time(), plain_model(all_ranks=True)
            for task, res in downstream.score_tasks(scorer, tokenizer, eval_task_list, rank, world_size, rt.gather,
                                                    device, autocast).items():
                log.eval_line(rec, max_steps, task, res, time.time() - t1)
            del scorer
        log.metrics(rec)
        # a sample at each eval (rank 0); after the last step one per end prompt
        prompts, n_tokens = (end_prompts, end_tokens) if last_step and end_prompts else ([sample_prompt], sample_tokens)
        if any(prompts):  # temperature 0.7, top_p 0.9, each its own generator: the training RNGs are untouched
            gen_model = plain_model(all_ranks=False)
            if gen_model is not None:
                with Engine(gen_model, tokenizer, max_batch=1, autocast=autocast) as engine:  # one by one, as alone
                    engine.generate(reqs := [Request(tokenizer.encode(p), n_tokens, 0.7, 0, 0.9, seed + step + i)
                                             for i, p in enumerate(p for p in prompts if p)])
                for p, r in zip((p for p in prompts if p), reqs):
                    print0(f"sample: {p + r.text!r}")
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
    batches = []  # this step's micro-batches; the first may begin a data stage with a new shape (and accumulation)
    while len(batches) < grad_accum_steps:
        batches.append(loader.next_batch())
        if loader.stage != current_stage:
            # a new data stage (the loader switches the weights, possibly mid-batch); a new context length, micro
            # batch or rope theta is ours, with the accumulation that keeps total_batch_tokens per step
            T_new, B_new, theta_new = stage_shape(loader.stage)
            reshape = (T_new, B_new) != stage_shape(current_stage)[:2] or theta_new not in (None, raw_model.config.rope_theta)
            if reshape and len(batches) > 1:  # excluded by the start check above; kept as a guard
                raise SystemExit(f"stage {loader.stage} changed the batch shape inside optimizer step {step}")
            current_stage = loader.stage
            print0(f"stage {current_stage} begins at step {step}: {stages[current_stage]}")
            if reshape:
                apply_stage(current_stage)
                grad_accum_steps = obj.accum_steps(T_new, B_new)
                flops_per_token = raw_model.flops_per_token(T_new)
                obj.refresh_val()  # validation at the new length
                print0(f"  context {raw_model.config.block_size}, rope_theta {raw_model.config.rope_theta}, "
                       f"{B_new} x {T_new} per micro step, {grad_accum_steps} accumulation steps")
    obj.begin_step(batches)
    loss_accum, stats = torch.zeros((), device=device), None
    for micro_step, batch in enumerate(batches):
        last_micro = micro_step == len(batches) - 1
        if ddp and not fsdp:
            model.require_backward_grad_sync = last_micro  # all-reduce gradients only on the last micro step
        if fsdp:
            raw_model.set_requires_gradient_sync(last_micro)  # reduce-scatter only on the last micro step
        with autocast:
            loss, st = obj.loss(model, batch)
        stats = st if stats is None else stats + st
        loss_accum += loss.detach()
        loss.backward()
    if ddp:
        dist.all_reduce(loss_accum)  # gloo has no AVG: sum, then divide
        loss_accum /= world_size
    extra = obj.step_log(stats)  # e.g. the preference rewards over the step's pairs (all ranks)
    norm = checkpoint.to_full(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)) if grad_clip > 0 \
        else torch.zeros(())
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
    tokens_seen += total_batch_tokens if obj.tokens_per_step else 0

    if swa and finite:  # windowed average (Hägele et al. §5): the mean of the weights after each step of a window
        with torch.no_grad():
            swa_state["sum"] = swa_state["sum"] or [torch.zeros_like(p, dtype=torch.float32) for _, p in named_params]
            for (_, p), acc in zip(named_params, swa_state["sum"]):
                acc.add_(p.detach().float())
            swa_state["count"] += 1
            if (step + 1) % swa_window == 0:
                swa_state.update(avg=[acc / swa_state["count"] for acc in swa_state["sum"]], sum=None, count=0)

    # diagnostics
    t_now = time.time()
    dt = (t_now - t_last) if t_last is not None else None  # None: the first step after start/eval/save (compile, warmup)
    t_last = t_now
    if not finite:
        print0(f"step {step:6d}/{max_steps} | non-finite loss {loss_f} (grad norm {norm_f}): step skipped "
               f"({nonfinite_run} in a row, {nonfinite_total} in total)")
        log.metrics({"step": step, "loss": None, "skipped": True, "lr": lr, "nonfinite_total": nonfinite_total})
        if nonfinite_run >= max_nonfinite_steps:
            print0(f"stopping: {nonfinite_run} non-finite losses in a row (steps {step - nonfinite_run + 1}-{step}). "
                   f"The weights are probably broken: resume from an earlier checkpoint (--init_from=resume with only "
                   f"the good ckpt_*.pt left in out_dir) with a lower learning_rate, or check the data.")
            rt.end(1)
            sys.exit(1)
        continue
    if step % log_interval == 0 or step == max_steps - 1:
        tps = total_batch_tokens / dt if dt and obj.tokens_per_step else None
        mfu = flops_per_token * tps / (PEAK * world_size) if (tps and PEAK) else None
        log.step_line({"step": step, "loss": loss_f, "lr": lr, "grad_norm": norm_f, "ms": dt * 1000 if dt else None,
                       "tokens_per_s": tps, "mfu": mfu, "mem_gib": rt.memory_gib(), "tokens": tokens_seen,
                       "stage": current_stage, **extra}, max_steps, extra)

log.close()
rt.end()
