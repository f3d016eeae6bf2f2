"""
The post-training demo, measured: held-out exact match of the chat demo (eval.py's `chat_demo`, 100 generated
arithmetic questions never trained on, greedy, the reply must be exactly "The answer is N.") and preference accuracy
on the held-out DPO pairs (how often the model gives the right answer a higher log-probability than the wrong one),
for the real SmolLM2-135M-Instruct before post-training, after SFT and after DPO.

    python train.py configs/sft_demo.py && python train.py configs/dpo_demo.py
    python bench/posttrain.py [--limit=100] [--sft=out/sft_demo] [--dpo=out/dpo_demo]
"""
import json
import os
import sys
import time

sys.path[0] = ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import chat  # noqa: E402
import eval as ev  # noqa: E402
from checkpoint import open_model  # noqa: E402
from tasks import load_task  # noqa: E402

args = dict(limit=100, sft="out/sft_demo", dpo="out/dpo_demo", pairs="data_cache/chat_demo/dpo")
for a in sys.argv[1:]:
    k, v = a.removeprefix("--").split("=", 1)
    if k not in args:
        sys.exit(f"unknown option --{k}; valid: {sorted(args)}")
    args[k] = type(args[k])(v)


def preference_accuracy(model, loader):
    # held-out pairs: log P(right answer) > log P(wrong answer), each summed over the response tokens
    wins, n = 0, 0
    with torch.no_grad():
        for x, y, _ in loader.val_batches():
            lp = model(x, y, reduction="rows")[1].view(-1, 2)
            wins += int((lp[:, 0] > lp[:, 1]).sum())
            n += len(lp)
    return wins / n


task = load_task("chat_demo")
pairs = chat.PairLoader(args["pairs"], batch_pairs=16)
print(f"chat demo: {args['limit']} held-out questions (exact match, greedy, chat template), "
      f"{pairs.n_pairs['val']} held-out preference pairs; {torch.get_num_threads()} threads")
print("| model | exact match | stderr | preference accuracy | eval s |")
print("|---|---|---|---|---|")
results = {}
for name, src in [("SmolLM2-135M-Instruct", ""), ("+ SFT", args["sft"]), ("+ SFT + DPO", args["dpo"])]:
    if src and not os.path.exists(src):
        print(f"| {name} | {src} missing: run its config first | | | |")
        continue
    opened = open_model(src)
    model, tok = opened.model, opened.tokenizer
    t0 = time.perf_counter()
    em = ev.run_task(model, tok, task, ev.task_examples(task, args["limit"]), chat=True, progress=False)["exact_match"]
    mu, se = ev.mean_stderr(em)
    acc = preference_accuracy(model, pairs)
    results[name] = dict(exact_match=mu, stderr=se, preference_accuracy=acc)
    print(f"| {name} | {mu:.3f} | {se:.3f} | {acc:.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
for run in (args["sft"], args["dpo"]):
    path = os.path.join(run, "metrics.jsonl")
    if os.path.exists(path):
        evals = [r for r in map(json.loads, open(path)) if "val_loss" in r]
        print(f"{run}: " + "; ".join(f"step {r['step']}: val_loss {r['val_loss']:.4f}" + (
            f", val rewards/accuracies {r['val_rewards/accuracies']:.3f}, margins {r['val_rewards/margins']:.3f}"
            if "val_rewards/accuracies" in r else "") for r in evals))
