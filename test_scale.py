# Before the first GPU hour, on the CPU: torch.compile through train.py (Inductor, whole model and per block under
# FSDP2, a stage that changes the shape), the memory plan against the measured peak, a two-node launch via slurm.sh.
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import plan
from conftest import ROOT, run, train_losses
from model import GPT, GPTConfig, PRESETS

# the quickstart's model and stages on the tiny corpus, 6 steps of 2 micro steps; from half the run a stage of 64-token
# rows (the same tokens per micro step), so a compiled model meets a new shape mid-run
RESHAPE = ('[{"start": 0, "weights": {"prose": 0.45, "code": 0.45, "math": 0.10}}, {"start": 0.5, "block_size": 64, '
           '"batch_size": 8, "weights": {"prose": 0.35, "code": 0.35, "math": 0.30}}]')


def quickstart_args(tiny_data, out, *extra):
    return ["configs/quickstart.py", f"--out_dir={out}", f"--data_dir={tiny_data}", "--data_prepare=''",
            "--max_steps=6", "--warmup_steps=2", "--eval_interval=6", "--eval_batches=1", "--micro_batch_size=4",
            "--total_batch_tokens=1024", "--eval_tasks=[]", "--end_prompts=[]", "--sample_prompt=''",
            f"--stages={RESHAPE}", "--dtype=float32", *extra]


@pytest.fixture(scope="module")
def eager_quickstart(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eager"))
    run(quickstart_args(tiny_data, out))
    return train_losses(out)


def close(a, b, rel):
    # the step losses of two runs: the same steps, each within rel
    assert sorted(a) == sorted(b)
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    print(f"largest relative loss difference: {worst:.2e} (tolerance {rel:g})")
    assert worst <= rel, (worst, a, b)
    return worst


# ----------------------------------------------------------------------------- torch.compile (Inductor, on the CPU)
# Tolerance: in fp32, Inductor fuses the pointwise ops and the norms' and softmax's reductions into its own loops, which
# sum in another order: each op differs from eager by a few ulp (~1e-7 relative), and AdamW's first steps, which divide
# by the square root of tiny second moments, can amplify that. Measured over these 6 steps: 1.7e-7 (whole model) and
# 8.6e-8 (FSDP2, per block). 1e-5 leaves ~50x for another compiler version or CPU and still fails on any real
# difference (a wrong mask, a stale rope table after the reshape, a lost gradient move the loss by > 1e-3).


@pytest.mark.slow
def test_compiled_quickstart_equals_eager_and_recompiles_at_a_new_shape(tiny_data, eager_quickstart, tmp_path):
    out = str(tmp_path / "compiled")
    env = {**os.environ, "TORCH_LOGS": "recompiles"}
    p = subprocess.run([sys.executable, "train.py", *quickstart_args(tiny_data, out, "--compile=True")], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "compiling the model" in p.stdout and "stage 1 begins at step 3" in p.stdout
    assert "8 x 64 per micro step" in p.stdout  # the reshape happened under compile ...
    assert "Recompiling function" in p.stderr  # ... as a recompile of the new shape, not a crash
    close(eager_quickstart, train_losses(out), 1e-5)


@pytest.mark.slow
def test_fsdp2_with_per_block_compile_on_two_processes_equals_eager(tiny_data, eager_quickstart, tmp_path):
    out = str(tmp_path / "fsdp_compiled")
    p = run(quickstart_args(tiny_data, out, "--compile=True", "--fsdp=True"), torchrun=2, timeout=900)
    assert "fsdp: blocks compute in float32" in p.stdout
    close(eager_quickstart, train_losses(out), 1e-5)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_no_graph_break_inside_a_block(checkpointing):
    # Dynamo's account of what torch.compile would capture: one graph, no break, for a block (what FSDP2's per-block
    # compile compiles) and for the whole model with the fused head, checkpointed blocks included
    cfg = GPTConfig(**{**PRESETS["tiny"], "vocab_size": 64, "block_size": 32})
    model = GPT(cfg).train()
    model.activation_checkpointing = checkpointing
    idx = torch.randint(0, 64, (2, 32))
    x = torch.randn(2, 32, cfg.n_embd, requires_grad=True)
    for fn, args in ((model.layers[0], (x, model.rope_cos[:32], model.rope_sin[:32])), (model, (idx, idx))):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the memory plan


def plan_config(*argv):
    return plan.train_config(list(argv))


@pytest.mark.parametrize("shape", [
    pytest.param(["configs/quickstart.py", "--data_dir=/nonexistent", '--model_overrides={"n_layer": 4, "n_embd": 192, '
                  '"n_head": 6, "n_kv_head": 2, "intermediate_size": 512, "init_std": None, "vocab_size": 8192}'],
                 id="quickstart"),  # the quickstart's model with its own tokenizer's 8192 tokens
    pytest.param(["configs/smol135m.py", "--block_size=512", "--micro_batch_size=2", "--total_batch_tokens=1024"],
                 id="135m-T512", marks=pytest.mark.slow)])
def test_the_plan_is_within_15_percent_of_the_measured_peak(shape):
    # planned on fake tensors vs the peak resident set of the same steps with real ones (plan.measure: a fresh process,
    # glibc's mmap threshold held at 128 KiB so that freed tensors leave the resident set, libraries warmed up first)
    cfg = plan_config(*shape, "--device=cpu", "--dtype=float32")
    (T, B), = plan.stage_shapes(cfg)
    planned = plan.trace(plan.model_config(cfg), B, T, cfg["total_batch_tokens"] // (B * T), 1, False, False,
                         "float32", "cpu", cfg["grad_clip"])
    measured = plan.measure(cfg, "cpu")
    print(f"planned {planned['peak'] / 2 ** 20:.1f} MiB, measured {measured / 2 ** 20:.1f} MiB: "
          f"{planned['peak'] / measured:.3f}x")
    assert abs(planned["peak"] - measured) <= 0.15 * measured, (planned, measured)
    assert planned["optimizer"] == pytest.approx(2 * planned["parameters"], rel=0.01)  # AdamW's two fp32 moments


def test_the_plan_shards_what_fsdp_shards():
    cfg = GPTConfig(**{**PRESETS["tiny"], "vocab_size": 512, "block_size": 64})
    one = plan.trace(cfg, 2, 64, 2, 1, False, False, "bfloat16", "cuda", 1.0)
    eight = plan.trace(cfg, 2, 64, 2, 8, True, False, "bfloat16", "cuda", 1.0)
    ddp = plan.trace(cfg, 2, 64, 2, 8, False, False, "bfloat16", "cuda", 1.0)
    checkpointed = plan.trace(cfg, 2, 64, 2, 1, False, True, "bfloat16", "cuda", 1.0)
    n = sum(p.numel() for p in GPT(cfg).parameters())
    assert one["optimizer"] == pytest.approx(8 * n, rel=0.01)  # AdamW's two fp32 moments
    assert eight["optimizer"] == pytest.approx(one["optimizer"] / 8, rel=0.05)  # a 1/8 shard (rows padded)
    assert ddp["gradients"] >= one["gradients"] + 4 * n  # DDP's buckets: the gradients again
    assert ddp["peak"] >= one["peak"] + 4 * n
    assert checkpointed["activations"] < one["activations"]  # each block keeps only its input


def test_plan_cli_warns_when_a_run_does_not_fit():
    p = subprocess.run([sys.executable, "plan.py", "configs/smol135m.py", "--gpus=8", "--gpu_memory=4",
                        "--model_overrides={\"n_layer\": 2}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "on 8 GPUs, DDP, bfloat16" in p.stdout and "step: " in p.stdout
    assert "more than the GPU's 4 GiB: activation_checkpointing=True needs 3.9" in p.stdout, p.stdout
    p = subprocess.run([sys.executable, "plan.py", "configs/smol135m.py", "--gpus=eight"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "--gpus=eight" in p.stderr and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- two nodes through slurm.sh

def test_launch_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        if os.environ.get("CI"):
            pytest.fail("CI installs shellcheck (apt-get install shellcheck)")
        pytest.skip("apt-get install shellcheck")
    p = subprocess.run(["shellcheck", "slurm.sh", ".ci/run", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


def fake_slurm(tmp_path):
    # srun runs its command once per node (here: twice, on this machine, at once), scontrol names the nodes
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\npids=()\n'
                                  'for i in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do SLURM_NODEID=$i "$@" & '
                                  'pids+=($!); done\nrc=0\n'
                                  'for p in "${pids[@]}"; do wait "$p" || rc=$?; done\nexit $rc\n')
    os.symlink(sys.executable, bin_dir / "python")
    for f in ("scontrol", "srun"):
        os.chmod(bin_dir / f, 0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "1", "GPUS_PER_NODE": "1",
            "MASTER_PORT": str(port)}


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_nodes_through_slurm_equal_one_process(base_run, tiny_config, tmp_path, fsdp):
    out = tmp_path / "two_nodes"
    env = {**fake_slurm(tmp_path), "OUT_DIR": str(out)}
    p = subprocess.run(["bash", "slurm.sh", tiny_config, f"--fsdp={fsdp}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 nodes x 1 GPUs, rendezvous at localhost" in p.stdout
    log = (out / "log.txt").read_text()
    assert "world_size 2" in log
    dtype = re.search(r"dtype auto -> (\w+)", log).group(1)
    # as test_train.py's two processes on one node: the same global batch, so the same losses (FSDP2 under bf16
    # computes with bf16 copies of the weights: one rounding more than autocast)
    close(train_losses(base_run[0]), train_losses(str(out)), 1e-3 if fsdp and dtype == "bfloat16" else 1e-4)
    # a second submission of the same job resumes from the checkpoint (a requeued job), and has nothing left to do
    p = subprocess.run(["bash", "slurm.sh", tiny_config, f"--fsdp={fsdp}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0 and f"resuming from {out}" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["init_from"] == "resume"
