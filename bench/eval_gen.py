"""
eval.py's generative and code tasks: the engine's batch (eval.GEN_BATCH requests decoded together, continuous batching)
against one request at a time (what eval.py did before engine.py: each example prefilled and decoded alone), on the
real SmolLM2-135M-Instruct, fp32, greedy. Same tasks, same prompts: the completions must be identical, the time is the
difference. A script, not a test.

    python bench/eval_gen.py [--limit=40] [--batches=1,8,16] [--threads=2]

Tasks: chat_demo (--chat=True: short answers) and humaneval (up to 384 tokens, stop strings).
"""
import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root
import torch  # noqa: E402

import eval as ev  # noqa: E402
from checkpoint import open_model  # noqa: E402
from tasks import load_task  # noqa: E402

args = dict(limit=40, batches="1,8,16", threads=2)
for a in sys.argv[1:]:
    k, v = a.removeprefix("--").split("=", 1)
    if k not in args:
        sys.exit(f"unknown option --{k}; valid: {sorted(args)}")
    args[k] = type(args[k])(v)
torch.set_num_threads(args["threads"])
opened = open_model("")
model, tok = opened.model, opened.tokenizer
print(f"{opened.source}; torch {torch.__version__}, {torch.get_num_threads()} threads, first {args['limit']} examples")
print("| task | requests decoded together | seconds | examples/s | speed-up | completions equal to one at a time |")
print("|---|---|---|---|---|---|")
for spec, chat in (("chat_demo", True), ("humaneval", False)):
    task = load_task(spec)
    examples = ev.task_examples(task, args["limit"])
    first = None
    for b in map(int, args["batches"].split(",")):
        ev.GEN_BATCH = b
        log = []
        t0 = time.perf_counter()
        ev.run_task(model, tok, task, examples, chat=chat, progress=False, log=log.append)
        dt = time.perf_counter() - t0
        texts = [r.get("generation", r.get("completion")) for r in log]
        first = first or (dt, texts)
        print(f"| {spec} | {b} | {dt:.1f} | {len(examples) / dt:.2f} | {first[0] / dt:.2f}x | "
              f"{sum(a == c for a, c in zip(texts, first[1]))}/{len(texts)} |", flush=True)
