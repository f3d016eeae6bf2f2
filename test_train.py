# train.py end to end on the CPU: every test runs the real script as a subprocess (python train.py / torchrun), on a
# tiny corpus built by prepare.py with a 512-token BPE, so a step takes milliseconds and the whole file about two minutes.
import ast
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import corpus
import data

from conftest import ROOT, TIMEOUT, TRAIN, records, run, train_losses  # the tiny corpus and runs: conftest.py


def last_train_step(out_dir):
    # the newest train step in metrics.jsonl while a run is writing it (a half-written last line is skipped)
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return -1
    steps = [-1]
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in r:
            steps.append(r["step"])
    return max(steps)


def test_base_run_logs_and_checkpoints(base_run):
    out, stdout = base_run
    recs = records(out)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(24))
    assert [r["step"] for r in evals] == [0, 8, 16, 24]
    assert all(set(r) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mem_gib"} for r in train)
    assert all({"val_loss/code", "val_loss/prose", "val_loss/math"} <= set(r) for r in evals)
    # the downstream task at every eval: a fraction of the 13 items, with lm-eval's stderr
    assert all(r["eval/sums/acc"] * 13 == pytest.approx(round(r["eval/sums/acc"] * 13)) for r in evals)
    assert all(0 <= r["eval/sums/acc_norm"] <= 1 and r["eval/sums/acc_stderr"] >= 0 for r in evals)
    assert "eval sums | acc " in stdout
    # windowed weight averaging: evaluated beside the raw weights once a 4-step window has closed
    assert "swa_val_loss" not in evals[0] and all(math.isfinite(r["swa_val_loss"]) for r in evals[1:])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, evals  # it learns
    # the stage switch: stage 1 starts 128 tokens into step 10's 256, i.e. mid-step (same shape, so allowed)
    assert "stage 1 begins at step 10" in stdout
    assert [r["stage"] for r in train] == [0] * 10 + [1] * 14
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "stage 1 begins at step 10" in log and "TRAINING SECTION BEGIN" in log  # log lines and the code itself
    assert "sample: " in stdout
    assert re.search(r"device auto -> cpu: no CUDA GPU and no Apple MPS backend in this torch; dtype auto -> \w+: ", stdout)
    # keep_checkpoints=3 of ckpt_8, 16, 24; `latest` names the last; the run's tokenizer beside them
    assert sorted(os.listdir(out)) == sorted(["ckpt_8.pt", "ckpt_16.pt", "ckpt_24.pt", "latest", "log.txt",
                                              "metrics.jsonl", "config.json", "tokenizer.json", "tokenizer_config.json",
                                              "special_tokens_map.json"])
    with open(os.path.join(out, "latest")) as f:
        assert f.read().strip() == "ckpt_24.pt"
    import torch
    ck = torch.load(os.path.join(out, "ckpt_24.pt"), map_location="cpu", weights_only=True)
    assert ck["step"] == 24 and ck["model_config"]["vocab_size"] == 512 and ck["config"]["max_steps"] == 24
    assert "tok_embeddings.weight" in ck["model"]
    from tokenizer import Tokenizer
    assert ck["tokenizer"] == Tokenizer.from_file(out).identity == Tokenizer.from_file(ck["config"]["data_dir"]).identity
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["total_batch_tokens"] == 256


def _get_lr_function(**g):
    # the get_lr of train.py itself (and the decay window it asks wsd_decay_steps for), compiled with the given globals
    tree = ast.parse(open(TRAIN).read())
    fns = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in ("get_lr", "wsd_decay_steps")]
    ns = {"math": math, "config": {"decay_frac": g.get("decay_frac"), "decay_steps": g.get("decay_steps", 0)}, **g}
    exec(compile(ast.Module(body=fns, type_ignores=[]), TRAIN, "exec"), ns)
    return ns["get_lr"]


def test_schedule_values():
    wsd = dict(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=100, schedule="wsd", decay_frac=0.2)
    lin = _get_lr_function(**wsd, decay_shape="linear")
    # warmup: step 0 trains at lr/warmup, step 9 at the peak; stable until the decay window (the last 20 steps)
    assert lin(0) == pytest.approx(0.1) and lin(4) == pytest.approx(0.5) and lin(9) == pytest.approx(1.0)
    assert lin(10) == 1.0 and lin(79) == 1.0
    assert lin(80) == pytest.approx(1.0) and lin(90) == pytest.approx(0.55) and lin(100) == pytest.approx(0.1)
    sq = _get_lr_function(**wsd, decay_shape="1-sqrt")
    assert sq(85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25))) and sq(100) == pytest.approx(0.1)
    cs = _get_lr_function(**wsd, decay_shape="cosine")
    assert cs(90) == pytest.approx(0.55) and cs(85) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    steps = _get_lr_function(**wsd, decay_steps=30, decay_shape="linear")  # decay_steps over decay_frac
    assert steps(69) == 1.0 and steps(85) == pytest.approx(0.55) and steps(100) == pytest.approx(0.1)
    cos = _get_lr_function(**{**wsd, "schedule": "cosine"}, decay_shape="linear")
    assert cos(10) == pytest.approx(1.0) and cos(55) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    assert cos(32.5) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)


def test_logged_lr_follows_schedule(base_run):
    out, _ = base_run
    lr = _get_lr_function(learning_rate=3e-3, min_lr=0.0, warmup_steps=3, max_steps=24, schedule="wsd",
                          decay_frac=0.5, decay_shape="1-sqrt")
    for r in records(out):
        if "loss" in r:
            assert r["lr"] == pytest.approx(lr(r["step"]), rel=1e-12), r


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_one(base_run, tiny_config, tmp_path, fsdp):
    # same global batch: 2 ranks x 1 micro step vs 1 rank x 2 micro steps; the logged loss is the global-batch mean
    out = str(tmp_path / "dp")
    run([tiny_config, f"--out_dir={out}", f"--fsdp={fsdp}"], torchrun=2)
    one, two = train_losses(base_run[0]), train_losses(out)
    assert sorted(one) == sorted(two)
    # dtype auto: bf16 autocast on a CPU with native bf16 (AVX512-BF16/AMX), else fp32. Under bf16, FSDP2 computes with
    # bf16 copies of the weights (MixedPrecisionPolicy, as torchtitan), one rounding more than autocast's fp32 weights:
    # ~1e-4 apart by step 8. In fp32, FSDP2 on 2 processes equals 1 process within 1e-5 (test_posttrain.py's
    # test_two_processes_match_one).
    log = open(os.path.join(out, "log.txt")).read()
    dtype = re.search(r"dtype auto -> (\w+)", log).group(1)
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-3 if fsdp and dtype == "bfloat16" else 1e-4), (s, one[s], two[s])
    if fsdp:
        assert f"fsdp: blocks compute in {dtype}, gradients reduced in float32" in log
    # the eval task's 13 items split 7 / 6 and summed: the same scores (one item may flip on a near tie)
    evals = lambda d: {r["step"]: r for r in records(d) if "val_loss" in r}
    e1, e2 = evals(base_run[0]), evals(out)
    assert e1[0]["eval/sums/acc"] == e2[0]["eval/sums/acc"]  # step 0: the same initial weights
    for s in e1:
        for m in ("acc", "acc_norm"):
            assert abs(e1[s][f"eval/sums/{m}"] - e2[s][f"eval/sums/{m}"]) <= 1 / 13 + 1e-9, (s, m)


GATHERED = """
import dataclasses, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import checkpoint
from engine import Engine, Request
from model import GPT, GPTConfig, PRESETS
from tokenizer import Tokenizer
from tokenizers import Tokenizer as HF, models
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = GPT(GPTConfig(**{{**PRESETS["tiny"], "vocab_size": 64}}))
ref = GPT.from_state_dict(dataclasses.replace(model.config), {{k: v.clone() for k, v in model.state_dict().items()}})
for layer in model.layers:
    fully_shard(layer)
fully_shard(model)
x = torch.randint(0, 64, (2, 16))
model(x, x)[1].backward()
# rank 0 alone samples, and stops at a stop token: the third token greedy decoding picks
copy = checkpoint.gathered_model(model, "cpu", all_ranks=False)
assert (copy is None) == (rank != 0)
tok = Tokenizer(HF(models.WordLevel({{f"t{{i}}": i for i in range(64)}}, unk_token="t0")))
if rank == 0:
    with Engine(ref, tok) as engine:
        engine.stop_ids = set()
        stop = engine.generate([Request(x[0, :4].tolist(), max_new_tokens=3)])[0].out[-1]
    with Engine(copy, tok) as engine:
        engine.stop_ids = {{stop}}
        out = engine.generate([Request(x[0, :4].tolist(), max_new_tokens=40)])[0].out
    assert len(out) <= 3 and out[-1] == stop, out
model(x, x)[1].backward()  # the sharded model trains on, on both ranks
# every rank scores with its own copy, rank 0 three forwards and rank 1 one
copy = checkpoint.gathered_model(model, "cpu", all_ranks=True)
with torch.no_grad():
    for _ in range(3 if rank == 0 else 1):
        assert torch.equal(copy(x)[0], ref(x)[0])  # the whole weights, gathered exactly
model(x, x)[1].backward()
dist.barrier()
sys.stdout.write(f"rank {{rank}} done\\n")  # one write: the two ranks share the pipe
sys.stdout.flush()
os._exit(0)  # not through gloo's teardown, which can abort a finished process (as in bench/train.py)
"""


@pytest.mark.slow
def test_fsdp_generation_and_uneven_scoring_run_no_collective(tmp_path):
    # train.py samples on rank 0 and scores eval tasks per rank with a copy gathered from the FSDP shards: ranks that
    # stop at different tokens or run different numbers of forwards cannot hang the next training step
    script = tmp_path / "gathered.py"
    script.write_text(GATHERED.format(root=ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "rank 0 done" in p.stdout and "rank 1 done" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_sharded_checkpoints_resume_at_another_world_size(tiny_config, tmp_path):
    # FSDP writes ckpt_<step>.dcp (each rank its shards); a run saved by 2 ranks resumes on 1 and on 2 and continues
    # the uninterrupted run (fp32: FSDP on 2 ranks and one process sum in different orders, within 1e-5); optimizer,
    # SWA (its eval at 2 ranks), data position and RNG come back too. sample.py/export.py read the sharded checkpoint as a whole model.
    full = str(tmp_path / "full")
    args = [tiny_config, "--fsdp=True", "--dtype=float32", "--keep_checkpoints=5"]
    run(args + [f"--out_dir={full}"], torchrun=2)
    assert sorted(f for f in os.listdir(full) if f.startswith("ckpt_")) == ["ckpt_16.dcp", "ckpt_24.dcp", "ckpt_8.dcp"]
    values = lambda d: {(r["step"], k): r[k] for r in records(d) for k in ("loss", "val_loss", "swa_val_loss")
                        if r.get(k) is not None}
    want = values(full)
    for nproc in (1, 2):
        out = str(tmp_path / f"resumed{nproc}")
        os.makedirs(out)
        shutil.copytree(os.path.join(full, "ckpt_8.dcp"), os.path.join(out, "ckpt_8.dcp"))
        p = run(args + [f"--out_dir={out}", "--init_from=resume"], torchrun=nproc if nproc > 1 else 0)
        assert ("written by 2 ranks, now 1" if nproc == 1 else "resuming from") in p.stdout
        got = values(out)
        assert sorted(s for s, k in got if k == "loss") == list(range(8, 24))
        assert ("swa_val_loss" in {k for _, k in got}) and {s for s, k in got if k == "val_loss"} == {16, 24}
        for key, v in got.items():  # the validation set is eval_batches per rank: compare it at the same world size
            if key[1] == "loss" or nproc == 2:
                assert v == pytest.approx(want[key], rel=1e-5), (nproc, key, v, want[key])
    hf = str(tmp_path / "hf")
    subprocess.run([sys.executable, "export.py", f"--init_from={full}", f"--out={hf}"], cwd=ROOT, check=True,
                   capture_output=True, timeout=TIMEOUT)
    import formats
    from checkpoint import open_model
    whole, exported = open_model(full).model, formats.load_pretrained(hf)[0]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), exported.state_dict().values()))


@pytest.mark.slow
def test_sigterm_then_resume_is_bitwise(base_run, tiny_config, tmp_path):
    out = str(tmp_path / "pre")
    os.makedirs(out)
    p = subprocess.Popen([sys.executable, TRAIN, tiny_config, f"--out_dir={out}", "--checkpoint_interval=1000"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while time.time() - t0 < TIMEOUT:  # wait for train step 5 (an arbitrary step between checkpoints)
        if last_train_step(out) >= 5:
            break
        assert p.poll() is None, p.communicate()[0]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, stdout
    assert "stopped by a signal at step" in stdout
    ckpts = [f for f in os.listdir(out) if f.startswith("ckpt_")]
    assert len(ckpts) == 1, ckpts
    stopped = int(ckpts[0][5:-3])
    assert 6 <= stopped < 24, stopped  # not the end: the resume below has work to do
    run([tiny_config, f"--out_dir={out}", "--checkpoint_interval=1000", "--init_from=resume"])
    ref, got = records(base_run[0]), records(out)
    assert [(r["step"], r["loss"]) for r in ref if "loss" in r] == [(r["step"], r["loss"]) for r in got if "loss" in r]
    assert [(r["step"], r["val_loss"], r.get("swa_val_loss")) for r in ref if "val_loss" in r] == \
        [(r["step"], r["val_loss"], r.get("swa_val_loss")) for r in got if "val_loss" in r]


def test_a_time_budget_fixes_max_steps_once_and_stages_follow_it(tiny_config, tmp_path):
    # time_budget: a probe of this machine's step fixes max_steps before the first step (written in config.json and the
    # checkpoints), a stage starting at 0.5 begins at half of it, and a resume continues that schedule without probing
    out, stages = str(tmp_path / "timed"), "[{'start': 0, 'weights': {'code': 1.0}}, {'start': 0.5, 'weights': {'math': 1.0}}]"
    args = [tiny_config, f"--out_dir={out}", "--time_budget=3.0", "--eval_interval=1000", "--swa=False",
            f"--stages={stages}", "--sample_prompt=", "--checkpoint_interval=6", "--keep_checkpoints=1000"]
    p = run(args)
    m = re.search(r"time_budget=3 s: a step takes (\d+) ms here -> max_steps=(\d+)", p.stdout)
    assert m and "note: time_budget=3.0 (the command line) decides, not max_steps=24" in p.stderr, p.stdout + p.stderr
    n = int(m[2])
    assert abs(n - 3.0 / (int(m[1]) / 1000)) <= 0.1 * n + 1  # the log rounds the step to a millisecond
    assert n >= 12, n  # a step of the tiny model takes a few ms (3 s: room for a loaded machine); room for the resume
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["max_steps"] == n
    train = [r for r in records(out) if "loss" in r]
    assert train[-1]["step"] == n - 1 and [r["stage"] for r in train] == [0] * round(n / 2) + [1] * (n - round(n / 2))
    again = str(tmp_path / "again")
    os.makedirs(again)
    shutil.copy(os.path.join(out, "ckpt_6.pt"), again)
    p = run(args[:1] + [f"--out_dir={again}", "--init_from=resume"] + args[2:])
    assert "time_budget=3 s: a step takes" not in p.stdout
    assert [(r["step"], r["loss"]) for r in records(again) if "loss" in r] == [(r["step"], r["loss"]) for r in train][6:]


def test_doc_masking_trains_within_documents_and_resumes_bitwise(base_run, tiny_config, tiny_data, tmp_path):
    # doc_masking: attention (and with doc_positions, positions) per document of each window, from the token files'
    # index; a resume from a checkpoint continues it bit for bit, validation included
    out = str(tmp_path / "docs")
    args = [tiny_config, "--doc_masking=True", "--doc_positions=True", "--max_steps=16", "--keep_checkpoints=10",
            "--sample_prompt=", "--eval_tasks=[]"]
    run(args + [f"--out_dir={out}"])
    losses = train_losses(out)
    # step 0: the base run's weights and batch, whose windows hold several documents, so attention differs
    loader = data.MixtureLoader(tiny_data, 32, 4, stages=[{"start": 0, "weights": {"code": 0.5, "prose": 0.5}}],
                                doc_ids=True)
    assert any(int(loader.next_batch()[2].max()) > 0 for _ in range(2))
    assert losses[0] != train_losses(base_run[0])[0]
    again = str(tmp_path / "again")
    os.makedirs(again)
    shutil.copy(os.path.join(out, "ckpt_8.pt"), again)
    run(args + [f"--out_dir={again}", "--init_from=resume"])
    assert [(k, v) for k, v in train_losses(again).items()] == [(k, v) for k, v in losses.items() if k >= 8]
    vals = lambda d: [(r["step"], r["val_loss"], r.get("swa_val_loss")) for r in records(d) if "val_loss" in r]
    assert vals(again) == [v for v in vals(out) if v[0] > 8]  # the eval at step 8 was done before the checkpoint


@pytest.mark.slow
def test_cooldown_branch_equals_the_shorter_run(base_run, tiny_config, tmp_path):
    # the base run's step-8 checkpoint lies in its stable phase (warmup to 3, decay from 12). A branch from it that
    # decays over 4 steps is, step for step and bit for bit, the run configured with max_steps=12 and that decay
    src = os.path.join(base_run[0], "ckpt_8.pt")
    before = {f: os.path.getmtime(os.path.join(base_run[0], f)) for f in os.listdir(base_run[0])}
    short, branch = str(tmp_path / "short"), str(tmp_path / "branch")
    run([tiny_config, f"--out_dir={short}", "--max_steps=12", "--decay_steps=4"])
    p = run([tiny_config, f"--out_dir={branch}", f"--decay_from={src}", "--decay_steps=4"])
    assert "cooldown branch of" in p.stdout and "max_steps=12" in p.stdout
    steps = lambda d, a: [(r["step"], r[a], r.get("lr")) for r in records(d) if a in r and r["step"] >= 8]
    assert steps(branch, "loss") == steps(short, "loss") and [s for s, *_ in steps(branch, "loss")] == [8, 9, 10, 11]
    assert steps(branch, "val_loss") == steps(short, "val_loss")  # at 8 (the branch's first eval) and 12
    assert {f: os.path.getmtime(os.path.join(base_run[0], f)) for f in os.listdir(base_run[0])} == before
    # a branch from a checkpoint past the stable phase, or into its own source directory, is refused
    p = run([tiny_config, f"--out_dir={tmp_path / 'late'}", f"--decay_from={base_run[0]}", "--decay_steps=4"], check=False)
    assert p.returncode == 1 and "step 24, not in the stable phase" in p.stderr and "Traceback" not in p.stderr
    p = run([tiny_config, f"--out_dir={base_run[0]}", f"--decay_from={src}", "--decay_steps=4"], check=False)
    assert p.returncode == 1 and "writes to its own out_dir" in p.stderr
    assert {f: os.path.getmtime(os.path.join(base_run[0], f)) for f in os.listdir(base_run[0])} == before


def test_init_from_checkpoint_file(base_run, tiny_config, tmp_path):
    # continued pretraining from a ckpt_*.pt: its weights (the step-0 eval equals the source run's final one), a fresh
    # optimizer and schedule from step 0
    out = str(tmp_path / "cont")
    p = run([tiny_config, f"--out_dir={out}", f"--init_from={os.path.join(base_run[0], 'ckpt_24.pt')}",
             "--max_steps=2", "--warmup_steps=1", "--swa=False"])
    assert "weights only, a fresh optimizer at step 0" in p.stdout
    final = [r for r in records(base_run[0]) if "val_loss" in r][-1]
    first = [r for r in records(out) if "val_loss" in r][0]
    assert first["step"] == 0 and first["val_loss"] == final["val_loss"]
    assert [r["step"] for r in records(out) if "loss" in r] == [0, 1]


@pytest.mark.slow
def test_init_from_weights_of_another_tokenizer_is_an_error(base_run, tiny_config, tiny_data, tmp_path):
    # the same vocabulary size, two token ids swapped: the weights' embeddings would mean other tokens
    import formats
    from checkpoint import open_model
    spec = json.loads(open(os.path.join(tiny_data, "tokenizer.json")).read())
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps(spec))
    from tokenizer import Tokenizer
    formats.save_pretrained(open_model(base_run[0]).model, str(tmp_path / "hf"), Tokenizer.from_file(str(other)))
    ck = torch.load(os.path.join(base_run[0], "ckpt_24.pt"), map_location="cpu", weights_only=True)
    ck["tokenizer"] = Tokenizer.from_file(str(other)).identity  # a run that trained on data of the other tokenizer
    torch.save(ck, tmp_path / "ckpt_24.pt")
    for src in (tmp_path / "hf", tmp_path / "ckpt_24.pt"):
        out = tmp_path / f"out_{src.name}"
        p = run([tiny_config, f"--out_dir={out}", f"--init_from={src}", "--max_steps=2", "--warmup_steps=1"],
                check=False)
        assert p.returncode == 1 and "was tokenized with" in p.stderr and str(src) in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr and not os.path.exists(out / "ckpt_2.pt")


@pytest.mark.slow
def test_quickstart_shortened(tiny_data, tmp_path):
    # the README's job, shortened: configs/quickstart.py (its model, stages, schedule) for 4 steps of a quarter of its
    # batch, on the tiny corpus instead of the embedded one (which takes a minute to build)
    out = str(tmp_path / "qs")
    p = run(["configs/quickstart.py", f"--out_dir={out}", f"--data_dir={tiny_data}", "--data_prepare=''",
             "--max_steps=4", "--warmup_steps=2", "--eval_interval=2", "--eval_batches=1", "--micro_batch_size=2",
             "--total_batch_tokens=512"])
    evals = [r for r in records(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert "sample: " in p.stdout.splitlines()[-2]  # the run ends with a sample, then the final checkpoint
    assert os.path.exists(os.path.join(out, "ckpt_4.pt"))

    # report.py on it: the plots (a real PNG, read back) and the numbers page agree with metrics.jsonl
    pytest.importorskip("matplotlib")
    rep = subprocess.run([sys.executable, "report.py", out], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    import matplotlib.image
    img = matplotlib.image.imread(os.path.join(out, "report.png"))
    assert img.shape[0] > 500 and img.shape[1] > 500 and img[..., :3].std() > 0.05  # drawn, not blank
    md = open(os.path.join(out, "report.md")).read()
    final = evals[-1]
    assert f"| val_bpb | {final['val_bpb']:.4f} |" in md and "| steps | 4 |" in md
    assert "| 1 | " in md and "## Samples at the end" in md  # the quickstart's second data stage; its end samples
    # two runs overlaid (the same run under two names), and the errors a user can make
    other = str(tmp_path / "qs_copy")
    shutil.copytree(out, other)
    rep = subprocess.run([sys.executable, "report.py", out, other, f"--out={tmp_path / 'cmp'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and os.path.getsize(tmp_path / "cmp" / "compare.png") > 10_000, rep.stderr
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| qs |" in table and "| qs_copy |" in table
    for args, msg in [([str(tmp_path / "nope")], "no such directory"), ([str(tmp_path)], "no metrics.jsonl"),
                      ([], "usage"), ([out, "--colour=red"], "unknown option")]:
        rep = subprocess.run([sys.executable, "report.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert rep.returncode == 1 and msg in rep.stderr and "Traceback" not in rep.stderr, (args, rep.stderr)


@pytest.mark.slow
def test_no_config_defaults_are_consistent(tiny_data, tmp_path):
    # `python train.py` with no config file: the default data_dir is the quickstart corpus's own directory, which the
    # default data_prepare ("auto") builds when incomplete (a complete copy of the tiny corpus stands in for it here),
    # and the default stages (None) read every source in it. Only the model and batch are shrunk.
    dst = tmp_path / "data_cache" / "quickstart"
    shutil.copytree(tiny_data, dst)
    (dst / "quickstart.json").write_text(json.dumps({"version": corpus.QUICKSTART_VERSION, "python": sys.version.split()[0]}))
    p = run(["--model=tiny", "--block_size=32", "--micro_batch_size=4", "--total_batch_tokens=128", "--max_steps=2",
             "--warmup_steps=1", "--eval_batches=1", "--sample_tokens=4"], cwd=str(tmp_path))
    assert "quickstart corpus already complete" in p.stdout
    evals = [r for r in records(str(tmp_path / "out")) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert {k for k in evals[0] if k.startswith("val_loss/")} == {"val_loss/code", "val_loss/math", "val_loss/prose"}
    # bits per byte: the summed loss / ln 2 over the UTF-8 bytes of the targets, here counted by decoding them
    from tokenizer import Tokenizer
    tok, loader = Tokenizer.from_file(str(dst)), data.MixtureLoader(str(dst), block_size=32, batch_size=4)
    for src in ("code", "math", "prose"):
        (_, y), = loader.val_batches(src, 1)  # the one eval batch train.py used (eval_batches=1)
        n_bytes = sum(len(tok.decode(row.tolist(), skip_special_tokens=True).encode()) for row in y)
        want = evals[-1][f"val_loss/{src}"] * y.numel() / math.log(2) / n_bytes
        assert abs(evals[-1][f"val_bpb/{src}"] - want) < 0.02 * want, (src, evals[-1][f"val_bpb/{src}"], want)
    assert evals[-1]["val_bpb"] == pytest.approx(sum(evals[-1][f"val_bpb/{s}"] for s in ("code", "math", "prose")) / 3)
    # a data_dir of the user's own is never built into by "auto": a missing one is an error with the command to fix it
    p = run(["--model=tiny", "--data_dir=data_cache/mine", "--max_steps=1", "--warmup_steps=1"], cwd=str(tmp_path),
            check=False)
    assert p.returncode != 0 and "HINT: python prepare.py --out data_cache/mine" in p.stderr + p.stdout
    assert not (tmp_path / "data_cache" / "mine").exists() and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--learnig_rate=1e-3"], "did you mean 'learning_rate'"),
    (["--max_steps=1.5"], "max_steps must be int"),
    (["--compile=1"], "compile must be bool"),
    (["--triton_rope='yes'"], "triton_rope='yes' is not one of (None, True, False)"),
    (["--schedule=linear"], "schedule='linear' is not one of"),
    (["--max_steps"], "--key=value"),
    (["--max_steps=1000"], "warmup_steps=2000 does not fit max_steps=1000: its decay starts at step 800"),
    (["--max_steps=100", "--schedule=cosine", "--warmup_steps=101"], "warmup_steps=101 does not fit max_steps=100: it ends"),
    (["--doc_positions=True"], "doc_positions=True restarts positions at each document, which needs attention"),
    (["--objective=sft", "--doc_masking=True"], "objective='sft' always attends within each conversation"),
])
def test_bad_keys_and_types(args, message, tmp_path):
    p = run(args + [f"--out_dir={tmp_path / 'out'}"], check=False)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_key_inside_config_file(tmp_path):
    cfg = tmp_path / "bad.py"
    cfg.write_text("max_steps = 10\nwarmup_step = 5\n")
    p = run([str(cfg), f"--out_dir={tmp_path}"], check=False)
    assert p.returncode != 0 and "warmup_step" in p.stderr and "did you mean 'warmup_steps'" in p.stderr, p.stderr


def test_options_that_decide_the_same_thing_never_override_silently(tmp_path, capsys):
    # a config's epochs beside --max_steps: the command line is the later word and wins, and says so; two of them in
    # one place are an error that says which to drop
    from configurator import configure
    cfg = tmp_path / "c.py"
    cfg.write_text("epochs = 2.0\nwarmup_frac = 0.1\n")
    g = dict(max_steps=100, epochs=0.0, warmup_steps=10, warmup_frac=0.0)
    configure(g, [str(cfg), "--max_steps=40"], exclusive=[("max_steps", "epochs"), ("warmup_steps", "warmup_frac")])
    assert g == dict(max_steps=40, epochs=0.0, warmup_steps=10, warmup_frac=0.1)
    assert "note: max_steps=40 (the command line) decides, not epochs=2.0" in capsys.readouterr().err
    for argv, both in (([str(cfg), "--max_steps=40", "--epochs=1.0"], "max_steps and epochs"),
                       ([str(cfg), "--warmup_steps=5", "--warmup_frac=0.2"], "warmup_steps and warmup_frac")):
        g = dict(max_steps=100, epochs=0.0, warmup_steps=10, warmup_frac=0.0)
        with pytest.raises(SystemExit, match=f"config error: {both} are both set in the command line"):
            configure(g, argv, exclusive=[("max_steps", "epochs"), ("warmup_steps", "warmup_frac")])
    cfg.write_text("max_steps = 10\nepochs = 1.0\n")
    with pytest.raises(SystemExit, match=f"max_steps and epochs are both set in {cfg}"):
        configure(dict(max_steps=100, epochs=0.0), [str(cfg)], exclusive=[("max_steps", "epochs")])
    p = run(["--epochs=1.0", f"--out_dir={tmp_path / 'out'}"], check=False)  # pretraining's length is max_steps
    assert p.returncode != 0 and "epochs=1.0: a run's length in passes over sft or preference data" in p.stderr


def test_a_checkpoint_opens_only_with_its_own_tokenizer(base_run, tiny_data, tmp_path):
    # a train.py checkpoint records its tokenizer's identity; its run directory keeps the tokenizer. An older run
    # without it whose data_dir was rebuilt with another tokenizer is refused with both named, not decoded wrongly
    import checkpoint
    from tokenizer import Tokenizer
    opened = checkpoint.open_model(base_run[0])
    assert opened.tokenizer.identity == Tokenizer.from_file(tiny_data).identity == opened.ckpt["tokenizer"]
    old = tmp_path / "old_run"
    old.mkdir()
    shutil.copy(os.path.join(base_run[0], "ckpt_24.pt"), old)  # no tokenizer beside it
    spec = json.loads(open(os.path.join(tiny_data, "tokenizer.json")).read())
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    (rebuilt / "tokenizer.json").write_text(json.dumps(spec))
    ck = torch.load(old / "ckpt_24.pt", weights_only=True)
    ck["config"]["data_dir"] = str(rebuilt)
    torch.save(ck, old / "ckpt_24.pt")
    want, other = ck["tokenizer"], Tokenizer.from_file(str(rebuilt)).identity
    with pytest.raises(ValueError, match=f"trained with tokenizer {want}, but .*rebuilt/tokenizer.json is {other}"):
        checkpoint.open_model(str(old))
    r = subprocess.run([sys.executable, "sample.py", f"--init_from={old}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 1 and want in r.stderr and other in r.stderr and "Traceback" not in r.stderr, r.stderr
    shutil.copy(os.path.join(tiny_data, "tokenizer.json"), old)  # its own tokenizer back beside it: it opens
    assert checkpoint.open_model(str(old)).tokenizer.identity == want


@pytest.mark.slow
def test_nonfinite_losses_stop_the_run(tiny_config, tmp_path):
    # an absurd LR blows the weights up to inf within two steps; the steps are skipped, counted, then the run stops
    out = str(tmp_path / "nan")
    p = run([tiny_config, f"--out_dir={out}", "--learning_rate=1e30", "--warmup_steps=1", "--max_nonfinite_steps=3",
             "--eval_interval=1000"], check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "non-finite losses in a row" in p.stdout
    skipped = [r for r in records(out) if r.get("skipped")]
    assert len(skipped) == 3 and all(r["loss"] is None for r in skipped)
