# prepare.py at scale: rows filtered on their columns, preparation split into N independent tasks (a Slurm job array)
# and one merge that checks the whole, the same documents as one process makes
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
import prepare
import tokenfiles
from rows import DataError

ROOT = os.path.dirname(os.path.abspath(__file__))
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
WORDS = "the of and to in is was for on that with as by at from this code math def return print value".split()


def rows(n, seed):
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS, int(rng.integers(3, 60)))) + f" row{seed}-{j}",
             "int_score": j % 5, "score": (j % 7) / 2, "lang": "en" if j % 3 else "fr", "id": f"{seed}-{j}"}
            for j in range(n)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    # two parquet files of 6 and 4 row groups, a jsonl.gz file; a tokenizer trained on them
    d = tmp_path_factory.mktemp("scale")
    os.makedirs(d / "src")
    pq.write_table(pa.Table.from_pylist(rows(600, 0)), str(d / "src" / "a.parquet"), row_group_size=100)
    pq.write_table(pa.Table.from_pylist(rows(400, 1)), str(d / "src" / "b.parquet"), row_group_size=100)
    with gzip.open(d / "src" / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows(300, 2))
    prepare.prepare(str(d / "tok"), {"x": str(d / "src")}, train_vocab=300, workers=1)
    return d


def docs(d, name):  # every document of a source (training and validation) as a tuple of ids, sorted
    out = []
    for split in ("train", "val"):
        for toks, ends in tokenfiles.source_shards(d, name, split):
            e = np.asarray(ends, dtype=np.int64)
            out += [tuple(toks[a:b].tolist()) for a, b in zip(np.concatenate([[0], e[:-1]]), e)]
    return sorted(out)


def test_filters_keep_the_rows_that_pass(corpus_dir, tmp_path):
    # parquet (filtered as it is read) and jsonl.gz (filtered in the worker processes), ints, floats and text
    from tokenizer import load_tokenizer
    tok = str(corpus_dir / "tok" / "tokenizer.json")
    filters = [prepare.parse_filter("int_score>=3"), prepare.parse_filter("lang == 'en'"), prepare.parse_filter("score<3")]
    meta = prepare.prepare(str(tmp_path / "f"), {"x": str(corpus_dir / "src")}, tokenizer=tok, workers=2,
                           filters=filters)["x"]
    keep = sorted(r["text"] for s, n in ((0, 600), (1, 400), (2, 300)) for r in rows(n, s)
                  if r["int_score"] >= 3 and r["lang"] == "en" and r["score"] < 3)
    decode = load_tokenizer(tok).decode
    assert sorted(decode(list(d[:-1])) for d in docs(str(tmp_path / "f"), "x")) == keep and len(keep) > 100
    assert meta["filters"] == ["int_score>=3", "lang=='en'", "score<3"]


@pytest.mark.parametrize("spec,why", [("int_score=>3", "expected COLUMN OP VALUE"), ("stars>=3", "no column 'stars'"),
                                      ("lang>=3", "compares str values with a int")])
def test_a_bad_filter_is_a_one_line_error(corpus_dir, tmp_path, spec, why):
    r = subprocess.run([sys.executable, "prepare.py", "--out", str(tmp_path / "o"), "--tokenizer",
                        str(corpus_dir / "tok"), "--source", f"x={corpus_dir / 'src' / 'a.parquet'}", f"--filter={spec}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]  # (after the progress bar, where reading had begun)
    assert r.returncode == 1 and last.startswith("error: ") and why in last and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "o" / "x" / "meta.json")


def run(*args, env=None):
    r = subprocess.run([sys.executable, "prepare.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    return r.returncode, r.stderr.strip()


def test_tasks_then_merge_equal_one_process(corpus_dir, tmp_path):
    # 4 tasks over 11 units (10 row groups, 1 jsonl file), one of them through Slurm's variables, then the merge
    tok, src = str(corpus_dir / "tok"), str(corpus_dir / "src")
    out, one = str(tmp_path / "tasks"), str(tmp_path / "one")
    common = ["--out", out, "--tokenizer", tok, "--source", f"x={src}", "--filter=int_score!=1", "--workers=1"]
    for i in (0, 2, 3):
        assert run(*common, f"--task={i}/4")[0] == 0
    code, err = run("--out", out, "--merge")  # a task is missing: nothing merged, one line naming it
    assert code == 1 and "--task=1/4" in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(os.path.join(out, "x", "meta.json"))
    assert run(*common, "--task=4", env={"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10"})[0] == 0  # = 1/4
    assert run("--out", out, "--merge") == (0, "")
    prepare.prepare(one, {"x": src}, tokenizer=tok, workers=1, filters=[prepare.parse_filter("int_score!=1")])
    assert docs(out, "x") == docs(one, "x") and len(docs(out, "x")) == 1040
    meta = tokenfiles.read_meta(out, "x")
    assert meta["format"] == "parts" and len(meta["parts"]) == 4 and meta["tasks"] == 4
    assert 0 < meta["val_tokens"] <= 1_048_576 and os.path.exists(os.path.join(out, "tokenizer.json"))
    loader = data.MixtureLoader(out, 16, 4, [{"start": 0, "weights": {"x": 1}}], doc_ids=True)
    assert len(loader._src[0].shards) == 4 and loader.next_batch()[0].shape == (4, 16)
    # a part damaged after the merge: the run that opens the source says which file
    part = os.path.join(out, "x", meta["parts"][2], "train.bin")
    with open(part, "r+b") as f:
        f.truncate(os.path.getsize(part) - 2)
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.MixtureLoader(out, 16, 4, [{"start": 0, "weights": {"x": 1}}])


def test_task_errors(corpus_dir, tmp_path):
    src = f"x={corpus_dir / 'src'}"
    for spec in ("4/4", "a/3", "3"):
        code, err = run("--out", str(tmp_path / "o"), "--tokenizer", str(corpus_dir / "tok"), "--source", src,
                        f"--task={spec}")
        assert code == 1 and "--task=" in err and len(err.splitlines()) == 1, err
    code, err = run("--out", str(tmp_path / "o"), "--train_tokenizer=300", "--source", src, "--task=0/2")
    assert code == 1 and "train it first" in err, err
    for d in ("missing", "."):
        code, err = run("--out", str(tmp_path / d), "--merge")
        assert code == 1 and "no source prepared in tasks" in err and len(err.splitlines()) == 1, err
