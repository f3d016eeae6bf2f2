# pytest configuration shared by every test_*.py, and the tiny corpus and training runs that test_train.py and
# test_scale.py share (train.py end to end on a 512-token BPE, so a step takes milliseconds).
import json
import os
import random
import subprocess
import sys

# The Triton kernels are tested on CPU tensors through Triton's interpreter when there is no GPU. The flag is read
# when a @triton.jit function is defined, so it must be set before anything imports kernels/.
try:
    import torch
    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def set_seed():
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)
    yield


def pytest_configure(config):
    # `python -m pytest -q -m "not slow"`: quick feedback (~3 minutes); the README's command runs everything
    config.addinivalue_line("markers", "slow: a long end-to-end test (a real model trained, a server, a compile)")


# ----------------------------------------------------------------------------- train.py on a tiny corpus

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(ROOT, "train.py")
TIMEOUT = 300

# 4 seqs x 32 tokens = 128 tokens per micro step; 256-token global batch = 2 accumulation steps on 1 process, 1 on 2
TINY = """
model = "tiny"
model_overrides = dict(vocab_size=512)
block_size = 32
micro_batch_size = 4
total_batch_tokens = 256
max_steps = 24
learning_rate = 3e-3
warmup_steps = 3
decay_frac = 0.5
decay_shape = "1-sqrt"
stages = [{{"start": 0, "weights": {{"code": 0.5, "prose": 0.5}}}},
          {{"start": 10 * 256 + 128, "weights": {{"code": 0.2, "prose": 0.3, "math": 0.5}}}}]
eval_interval = 8
eval_batches = 2
checkpoint_interval = 8
sample_tokens = 8
swa = True
swa_window = 4
data_dir = {data_dir!r}
eval_tasks = [("mc:" + {eval_file!r}, 0)]  # all 13 items (a task's own limit over eval_limit)
eval_limit = 5
"""


def run(args, cwd=ROOT, torchrun=0, check=True, timeout=TIMEOUT):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    p = subprocess.run(launcher + [TRAIN] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["step"]: r["loss"] for r in records(out_dir) if "loss" in r}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    # three sources named as the quickstart's (code / prose / math), ~100 kB each, from corpus.py's generators
    import corpus  # here, not at the top: the flag above must be set before the project's modules load
    import prepare
    d = tmp_path_factory.mktemp("tiny_data")
    raw = d / "raw"
    raw.mkdir()
    gens = {"code": corpus.quickstart_code(max_bytes=120_000), "prose": corpus.quickstart_prose(max_bytes=60_000),
            "math": corpus.quickstart_math(n_docs=300)}
    for name, gen in gens.items():
        with open(raw / f"{name}.jsonl", "w") as f:
            for text, _ in gen:
                f.write(json.dumps({"text": text}) + "\n")
    out = str(d / "data")
    prepare.prepare(out, {n: str(raw / f"{n}.jsonl") for n in gens}, train_vocab=512, workers=1, val_frac=0.1,
                 val_tokens=20_000)
    return out


@pytest.fixture(scope="session")
def tiny_config(tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    path, items = d / "tiny.py", d / "sums.jsonl"
    # 13 items: split 7 / 6 across two ranks
    items.write_text("".join(json.dumps(dict(query=f"{a} + {a + 1} =", choices=[str(2 * a + 1), str(2 * a + 3), str(a)],
                                             gold=0)) + "\n" for a in range(13)))
    path.write_text(TINY.format(data_dir=tiny_data, eval_file=str(items)))
    return str(path)


@pytest.fixture(scope="session")
def base_run(tiny_config, tmp_path_factory):
    # the uninterrupted single-process reference run that the other runs must reproduce
    out = str(tmp_path_factory.mktemp("base"))
    p = run([tiny_config, f"--out_dir={out}"])
    return out, p.stdout
