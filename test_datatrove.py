# datatrove's tokenized shards as a source (tokenfiles.py, prepare.py, data.py), checked against datatrove itself: its
# local executor tokenizes a parquet sample in 2 tasks, and nanosmol must read the same documents, token for token, as
# prepare.py makes of the same rows with the same tokenizer
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data
import prepare
import tokenfiles
from rows import DataError

ROOT = os.path.dirname(os.path.abspath(__file__))
pytest.importorskip("datatrove")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DATATROVE = """
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.tokens import DocumentTokenizer
src, out, tok, logs = sys.argv[1:]
LocalPipelineExecutor(pipeline=[ParquetReader(src), DocumentTokenizer(out, tokenizer_name_or_path=tok,
                      eos_token="<|endoftext|>", seed=0)], tasks=2, workers=1, logging_dir=logs).run()
"""


def docs_of(shards):  # [(tokens, ends)] -> the documents, as tuples of ids
    out = []
    for toks, ends in shards:
        e = np.asarray(ends, dtype=np.int64)
        out += [tuple(toks[a:b].tolist()) for a, b in zip(np.concatenate([[0], e[:-1]]), e)]
    return out


@pytest.fixture(scope="module")
def folders(tiny_data, tmp_path_factory):
    # tiny_data's raw documents as 3 parquet files; datatrove's shards of them; the same
    # rows prepared by prepare.py; and a data directory with the shards registered beside tiny_data's math source
    d = tmp_path_factory.mktemp("datatrove")
    raw = os.path.join(os.path.dirname(tiny_data), "raw")
    os.makedirs(d / "parquet")
    for name in ("code", "prose", "math"):
        with open(os.path.join(raw, f"{name}.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        pq.write_table(pa.Table.from_pylist(rows), str(d / "parquet" / f"{name}.parquet"))
    tok = os.path.join(tiny_data, "tokenizer.json")
    r = subprocess.run([sys.executable, "-c", DATATROVE, str(d / "parquet"), str(d / "shards"), tok, str(d / "logs")],
                       capture_output=True, text=True, timeout=300, cwd=str(d))  # (not the checkout: its kernels/)
    assert r.returncode == 0, r.stderr[-2000:]
    prepare.prepare(str(d / "prepared"), {"web": str(d / "parquet")}, tokenizer=tok, workers=1, val_frac=0.1)
    mixed = str(d / "mixed")
    shutil.copytree(os.path.join(tiny_data, "math"), os.path.join(mixed, "math"))
    prepare.prepare(mixed, {"web": str(d / "shards")}, tokenizer=tok, val_frac=0.05, val_tokens=2000)
    return dict(shards=str(d / "shards"), prepared=str(d / "prepared"), mixed=mixed, tok=tok, parquet=str(d / "parquet"))


def test_the_same_documents_as_prepare_py(folders):
    assert len(tokenfiles.datatrove_shards(folders["shards"])) == 2  # one shard per task
    mine = {s: docs_of(tokenfiles.source_shards(folders["mixed"], "web", s)) for s in ("train", "val")}
    theirs = docs_of(tokenfiles.source_shards(folders["prepared"], "web", "train")) + \
        docs_of(tokenfiles.source_shards(folders["prepared"], "web", "val"))
    assert len(theirs) > 400 and sorted(mine["train"] + mine["val"]) == sorted(theirs)  # datatrove shuffles the order
    eos = tokenfiles.read_meta(folders["mixed"], "web")["eos_id"]
    assert all(d[-1] == eos and eos not in d[:-1] for d in theirs)
    meta = tokenfiles.read_meta(folders["mixed"], "web")
    assert meta["val_tokens"] <= 2000 and meta["val_docs"] >= 1 and meta["n_docs"] + meta["val_docs"] == len(theirs)
    assert meta["n_tokens"] + meta["val_tokens"] == sum(map(len, theirs))
    tokenfiles.check_tokens(folders["mixed"])  # every id, every document end


def test_the_loader_reads_every_document_of_the_shards(folders):
    # one epoch of the stream, read whole: the chunks of both shards in a shuffled order, every training document once,
    # whole, and the document numbers of the windows begin where the index says
    loader = data.MixtureLoader(folders["mixed"], block_size=64, batch_size=4, stages=[{"start": 0, "weights": {"web": 1}}],
                                chunk_tokens=512, doc_ids=True)
    src = loader._src[0]
    assert len(src.shards) == 2 and src.n == tokenfiles.read_meta(folders["mixed"], "web")["n_tokens"]
    out, first = np.empty(src.n, dtype=np.uint16), np.empty(src.n, dtype=bool)
    src.read(0, out, first)
    cuts = np.flatnonzero(first).tolist() + [src.n]
    seen = [tuple(out[a:b].tolist()) for a, b in zip(cuts, cuts[1:])]
    assert sorted(seen) == sorted(docs_of(tokenfiles.source_shards(folders["mixed"], "web", "train")))
    assert seen != docs_of(tokenfiles.source_shards(folders["mixed"], "web", "train"))  # chunks shuffled
    batches = [loader.next_batch() for _ in range(20)] + loader.val_batches("web", 3)
    eos = tokenfiles.read_meta(folders["mixed"], "web")["eos_id"]
    for x, y, doc in batches:
        assert x.shape == (4, 64) and (x[:, 1:] == y[:, :-1]).all()
        starts = doc[:, 1:] != doc[:, :-1]  # a document starts after every <|endoftext|>, nowhere else
        assert (starts == (x[:, :-1] == eos)).all()
    assert sum(int(d.max()) for _, _, d in batches[20:]) >= 1  # (the val batches hold document starts too)


def test_mixing_and_bitwise_resume_with_a_datatrove_source(folders):
    stages = [{"start": 0, "weights": {"web": 0.7, "math": 0.3}}, {"start": 3000, "weights": {"web": 0.2, "math": 0.8}}]
    a = data.MixtureLoader(folders["mixed"], 32, 8, stages, doc_ids=True, chunk_tokens=256, shuffle_tokens=4096)
    for _ in range(7):
        a.next_batch()
    sd = json.loads(json.dumps(a.state_dict()))
    b = data.MixtureLoader(folders["mixed"], 32, 8, stages, doc_ids=True, chunk_tokens=256, shuffle_tokens=4096)
    b.load_state_dict(sd)
    for _ in range(40):  # past the stage switch, across chunks of both shards
        for u, v in zip(a.next_batch(), b.next_batch()):
            assert (u == v).all()


def cli(*args):
    r = subprocess.run([sys.executable, "prepare.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr.strip()


def test_a_damaged_folder_is_a_one_line_error(folders, tmp_path):
    shards = str(tmp_path / "shards")
    shutil.copytree(folders["shards"], shards)
    first, second = tokenfiles.datatrove_shards(shards)
    out = str(tmp_path / "dd")
    assert cli("--out", out, "--tokenizer", folders["tok"], "--source", f"web={shards}") == (0, "")
    loader = lambda: data.MixtureLoader(out, 32, 4, [{"start": 0, "weights": {"web": 1}}])  # noqa: E731
    loader()
    # a truncated shard, found when a run opens the source (and when prepare.py registers it)
    with open(os.path.join(shards, first), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(shards, first)) - 2)
    with pytest.raises(DataError, match="truncated or rewritten since"):
        loader()
    code, err = cli("--out", str(tmp_path / "dd2"), "--tokenizer", folders["tok"], "--source", f"web={shards}")
    assert code == 1 and len(err.splitlines()) == 1 and "truncated" in err, err
    shutil.rmtree(shards)
    shutil.copytree(folders["shards"], shards)
    loader()
    # an index that belongs to another shard
    shutil.copy(os.path.join(shards, second + ".index"), os.path.join(shards, first + ".index"))
    code, err = cli("--out", str(tmp_path / "dd3"), "--tokenizer", folders["tok"], "--source", f"web={shards}")
    assert code == 1 and len(err.splitlines()) == 1 and "index" in err, err
    with pytest.raises(DataError):
        loader()
    # datatrove's 4-byte tokens (a vocabulary over 65536)
    shutil.rmtree(shards)
    shutil.copytree(folders["shards"], shards)
    meta = os.path.join(shards, first + ".metadata")
    with open(meta) as f:
        lines = f.read().split("\n")
    with open(meta, "w") as f:
        f.write("\n".join([lines[0][:-1] + "4", *lines[1:]]))
    code, err = cli("--out", str(tmp_path / "dd4"), "--tokenizer", folders["tok"], "--source", f"web={shards}")
    assert code == 1 and len(err.splitlines()) == 1 and "uint16" in err, err


def test_another_tokenizer_is_refused(folders, tmp_path):
    # shards of the same rows from a different BPE: the first documents do not re-encode to their ids
    other = str(tmp_path / "other")
    prepare.prepare(other, {"x": folders["parquet"]}, train_vocab=300, workers=1)
    code, err = cli("--out", other, "--source", f"web={folders['shards']}", "--tokenizer",
                    os.path.join(other, "tokenizer.json"))
    assert code == 1 and len(err.splitlines()) == 1 and "tokenized with" in err and "re-encode" in err, err
    assert not os.path.exists(os.path.join(other, "web", "meta.json"))
    code, err = cli("--out", str(tmp_path / "o2"), "--source", f"web={folders['shards']}", "--train_tokenizer", "300")
    assert code == 1 and "--tokenizer" in err and len(err.splitlines()) == 1, err
