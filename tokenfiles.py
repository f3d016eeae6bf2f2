"""
nanosmol's token files on disk: the checked uint16 files prepare.py writes, and datatrove's tokenized shards, read in
place. data.py's MixtureLoader reads both through source_shards.

A data directory (all integers little-endian):
    DIR/tokenizer.json (+ configs)       the tokenizer every source was encoded with
    DIR/NAME/meta.json                   the source's summary; written last, so a source without it is incomplete
  a source prepare.py tokenized:
    DIR/NAME/train.bin, val.bin          1024-byte header, then uint16 tokens; every document ends with <|endoftext|>
    DIR/NAME/train.idx, val.idx          1024-byte header, then uint64 document start offsets (n_docs + 1 of them)
  a source prepared in N tasks (prepare.py --task=i/N, then --merge; meta.json's "format": "parts"):
    DIR/NAME/part-I-of-N/train.*         each task's training documents, read in place, in order
    DIR/NAME/val.bin, val.idx            every task's validation documents, gathered by the merge
  a datatrove folder that prepare.py registered (meta.json's "format": "datatrove"; nothing copied):
    FOLDER/*.ds                          uint16 tokens (datatrove's DocumentTokenizer, one file per task)
    FOLDER/*.ds.index                    uint64 document ends; the last equals the shard's token count
    FOLDER/*.ds.metadata                 "tokenizer|token size", token count (checked when registered)
"""
import json
import os

import numpy as np

from rows import DataError

# -----------------------------------------------------------------------------
# token file format

MAGIC = int.from_bytes(b"nanosmol", "little")  # first 8 bytes of every .bin/.idx file
VERSION = 1
HEADER_BYTES = 1024   # header = 128 int64 fields; fields 16..31 (bytes 128..255) hold the tokenizer identity string
KIND_TOKENS, KIND_INDEX, KIND_MASK = 1, 2, 3  # KIND_MASK: chat data's per-token loss mask (chat.py)


def _hint(cmd):
    return f"\n---> HINT: re-run {cmd}" if cmd else "\n---> HINT: re-run python prepare.py ... for this source"


def make_header(kind, n_items, itemsize, n_tokens, n_docs, vocab_size, eos_id, identity):
    h = np.zeros(HEADER_BYTES // 8, dtype="<i8")
    h[:9] = [MAGIC, VERSION, kind, n_items, itemsize, n_tokens, n_docs, vocab_size, eos_id]
    ident = identity.encode()[:127]
    raw = bytearray(h.tobytes())
    raw[128:128 + len(ident)] = ident
    return bytes(raw)


def read_header(path, cmd=None):
    """Reads and checks a .bin/.idx header against the file's size. Returns a dict."""
    if not os.path.exists(path):
        raise DataError(f"{path}: missing" + _hint(cmd))
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or int(np.frombuffer(raw[:8], "<i8")[0]) != MAGIC:
        raise DataError(f"{path}: not a nanosmol token file (bad magic number)" + _hint(cmd))
    h = np.frombuffer(raw, "<i8")
    if h[1] != VERSION:
        raise DataError(f"{path}: format version {h[1]}, this tokenfiles.py reads version {VERSION}" + _hint(cmd))
    hd = dict(kind=int(h[2]), n_items=int(h[3]), itemsize=int(h[4]), n_tokens=int(h[5]), n_docs=int(h[6]),
              vocab_size=int(h[7]), eos_id=int(h[8]), identity=raw[128:256].rstrip(b"\0").decode())
    size, want = os.path.getsize(path), HEADER_BYTES + hd["n_items"] * hd["itemsize"]
    if size != want:
        raise DataError(f"{path}: {size} bytes, but its header promises {want} ({hd['n_items']} items of "
                        f"{hd['itemsize']} bytes): truncated or corrupt" + _hint(cmd))
    if hd["kind"] == KIND_TOKENS and (hd["itemsize"] != 2 or hd["vocab_size"] > 65536):
        raise DataError(f"{path}: tokens must be uint16 with a vocabulary of at most 65536" + _hint(cmd))
    return hd


class TokenWriter:
    """Streams a token file (.bin) and its document index (.idx) to temporary names; finish() renames them into place.
    An interrupted run leaves only *.tmp<pid> files, which nothing reads (the pid keeps two concurrent runs apart)."""

    def __init__(self, path_stem, vocab_size, eos_id, identity):
        self.stem, self.meta, self.tmp = path_stem, (vocab_size, eos_id, identity), f".tmp{os.getpid()}"
        self.fb, self.fi = open(path_stem + ".bin" + self.tmp, "wb"), open(path_stem + ".idx" + self.tmp, "wb")
        self.fb.write(b"\0" * HEADER_BYTES)  # placeholder; a zero magic never validates
        self.fi.write(b"\0" * HEADER_BYTES)
        self.n_tokens, self.n_docs = 0, 0
        self.fi.write(np.zeros(1, "<u8").tobytes())  # offset of the first document

    def add(self, flat, lens):  # flat: uint16 tokens of several documents; lens: their lengths (EOS included)
        self.fb.write(flat.tobytes())
        self.fi.write((self.n_tokens + np.cumsum(lens, dtype=np.int64)).astype("<u8").tobytes())
        self.n_tokens += len(flat)
        self.n_docs += len(lens)

    def finish(self):
        v, e, ident = self.meta
        for f, kind, n, isz in ((self.fb, KIND_TOKENS, self.n_tokens, 2), (self.fi, KIND_INDEX, self.n_docs + 1, 8)):
            f.seek(0)
            f.write(make_header(kind, n, isz, self.n_tokens, self.n_docs, v, e, ident))
            f.flush()
            os.fsync(f.fileno())
            f.close()
        os.replace(self.stem + ".bin" + self.tmp, self.stem + ".bin")
        os.replace(self.stem + ".idx" + self.tmp, self.stem + ".idx")

    def abort(self):
        for f, suffix in ((self.fb, ".bin" + self.tmp), (self.fi, ".idx" + self.tmp)):
            f.close()
            if os.path.exists(self.stem + suffix):
                os.remove(self.stem + suffix)


# -----------------------------------------------------------------------------
# reading a data directory


def list_sources(data_dir):
    """The complete sources of data_dir (those whose meta.json exists), sorted."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data directory\n---> HINT: python prepare.py --out {data_dir} ... "
                        f"(or python prepare.py --preset quickstart)")
    return sorted(n for n in os.listdir(data_dir) if os.path.exists(os.path.join(data_dir, n, "meta.json")))


def check_data_dir(data_dir, names=None):
    """Checks the files of the named sources (default: all): headers, sizes, one tokenizer for all. Returns
    {name: meta}."""
    available = list_sources(data_dir)
    names = available if names is None else names
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DataError(f"unknown source(s) {unknown} in {data_dir}; available: {available} (a source appears when "
                        f"python prepare.py ... --source NAME=PATH has finished)")
    metas, ident = {}, None
    for n in names:
        meta = read_meta(data_dir, n)
        cmd = meta.get("command")
        for split in ("train", "val") if meta.get("format") == "datatrove" else ():
            source_shards(data_dir, n, split, meta)  # each shard's size and index against what prepare.py registered
        for split in ("train", "val") if meta.get("format") != "datatrove" else ():
            got = 0
            for stem in token_stems(data_dir, n, split, meta):
                hb, hi = read_header(stem + ".bin", cmd), read_header(stem + ".idx", cmd)
                if hb["identity"] != meta["tokenizer"] or hi["identity"] != meta["tokenizer"]:
                    raise DataError(f"{stem}.bin: tokenizer {hb['identity']} in the header, {meta['tokenizer']} in "
                                    f"meta.json" + _hint(cmd))
                if not (hb["kind"] == KIND_TOKENS and hi["kind"] == KIND_INDEX and hb["n_tokens"] == hi["n_tokens"]
                        and hb["n_docs"] == hi["n_docs"] and hi["n_items"] == hb["n_docs"] + 1):
                    raise DataError(f"{stem}.*: headers disagree with each other (mixed files from different runs?)"
                                    + _hint(cmd))
                got += hb["n_tokens"]
            if got != meta["n_tokens" if split == "train" else "val_tokens"]:
                raise DataError(f"{data_dir}/{n}/{split}: {got:,} tokens in the files, not what meta.json says (mixed "
                                f"files from different runs?)" + _hint(cmd))
        if ident is not None and meta["tokenizer"] != ident:
            raise DataError(f"{data_dir}: sources were tokenized with different tokenizers ({ident} and "
                            f"{meta['tokenizer']} in {n}); re-prepare them with one tokenizer" + _hint(cmd))
        ident = meta["tokenizer"]
        metas[n] = meta
    return metas


def check_tokens(data_dir):
    """check_data_dir, plus a scan of every token id against the vocabulary; prints one line per source."""
    metas = check_data_dir(data_dir)
    if not metas:
        raise DataError(f"{data_dir}: no prepared sources in it")
    for n, m in metas.items():
        for split in ("train", "val"):
            for toks, ends in source_shards(data_dir, n, split, m):
                for a in range(0, len(toks), 1 << 26):  # 128 MB at a time
                    top = int(toks[a:a + (1 << 26)].max(initial=0))
                    if top >= m["vocab_size"]:
                        raise DataError(f"{data_dir}/{n}/{split}: token id {top} >= vocabulary {m['vocab_size']}: "
                                        f"corrupt" + _hint(m.get("command")))
                for a in range(0, len(ends), 1 << 24):  # every document ends with <|endoftext|>, in order
                    e = np.asarray(ends[max(0, a - 1):a + (1 << 24)], dtype=np.int64)
                    if np.any(np.diff(e) <= 0) or (a == 0 and len(e) and e[0] <= 0) or np.any(toks[e - 1] != m["eos_id"]):
                        raise DataError(f"{data_dir}/{n}/{split}: a document is empty or does not end with "
                                        f"<|endoftext|> (id {m['eos_id']}): corrupt" + _hint(m.get("command")))
        print(f"{n:>16s}: {m['n_tokens']:>15,} train tokens in {m['n_docs']:>12,} documents, {m['val_tokens']:,} val "
              f"tokens, {m.get('bytes_per_token', 0):.2f} bytes/token, tokenizer {m['tokenizer']}")
    print(f"{data_dir}: {len(metas)} sources OK")
    return metas


def open_tokens(path):
    hd = read_header(path)
    # a plain ndarray view of the memmap: slicing it is several times cheaper than slicing np.memmap
    arr = np.memmap(path, dtype="<u2" if hd["itemsize"] == 2 else "<u8", mode="r", offset=HEADER_BYTES,
                    shape=(hd["n_items"],)).view(np.ndarray)
    return arr


def read_meta(data_dir, name):
    with open(os.path.join(data_dir, name, "meta.json")) as f:
        return json.load(f)


def write_meta(source_dir, meta):
    # meta.json last, in one step: a source without it is incomplete, and nothing reads one half written
    tmp = os.path.join(source_dir, f"meta.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(source_dir, "meta.json"))


def token_stems(data_dir, name, split, meta):
    # a split's token files in nanosmol's format (STEM.bin, STEM.idx): the source's own, or its training split's parts
    # when prepare.py made it in tasks (--task=i/N, then --merge: each part is read in place, in order)
    if meta.get("format") == "parts" and split == "train":
        return [os.path.join(data_dir, name, part, "train") for part in meta["parts"]]
    return [os.path.join(data_dir, name, split)]


def source_shards(data_dir, name, split, meta=None):
    """A split's token arrays and the document ends of each: [(uint16 tokens, ends)], memory-mapped, never copied. A
    source prepare.py tokenized has one (SPLIT.bin, SPLIT.idx), or for training one per task (--task). A datatrove
    folder, which prepare.py registers in place, has its shards: its val split is the tail of the last shard, its train
    split the rest."""
    meta = meta or read_meta(data_dir, name)
    if meta.get("format") != "datatrove":
        return [(open_tokens(s + ".bin"), open_tokens(s + ".idx")[1:]) for s in token_stems(data_dir, name, split, meta)]
    shards = [open_datatrove(os.path.join(meta["folder"], f["file"]), f["n_tokens"], f["n_docs"], meta.get("command"))
              for f in meta["files"]]
    (toks, ends), cut = shards[-1], meta["val_from"]  # val: the last shard's documents from token val_from on
    k = meta["files"][-1]["n_docs"] - meta["val_docs"]
    if split == "train":
        return shards[:-1] + ([(toks[:cut], ends[:k])] if k else [])
    return [(toks[cut:], np.asarray(ends[k:], dtype=np.int64) - cut)]  # (val is small: its ends in memory)


def open_datatrove(path, n_tokens, n_docs, cmd=None):
    """One shard of datatrove's DocumentTokenizer: PATH (uint16 tokens, little-endian) and PATH.index (uint64 document
    ends), checked against the sizes prepare.py registered -> (tokens, ends) memmaps."""
    hint = _hint(cmd) if cmd else ""  # registering (no command yet): the shard itself is at fault
    for f, want in ((path, 2 * n_tokens), (path + ".index", 8 * n_docs)):
        if not os.path.exists(f):
            raise DataError(f"{f}: missing (a shard of a registered datatrove folder)" + hint)
        if os.path.getsize(f) != want:
            raise DataError(f"{f}: {os.path.getsize(f):,} bytes, but {want:,} when prepare.py registered it: the shard "
                            f"was truncated or rewritten since" + hint)
    toks = np.memmap(path, dtype="<u2", mode="r").view(np.ndarray)
    ends = np.memmap(path + ".index", dtype="<u8", mode="r").view(np.ndarray)
    if n_docs and int(ends[-1]) != n_tokens:
        raise DataError(f"{path}.index: its last document ends at token {int(ends[-1]):,}, but {path} has {n_tokens:,} "
                        f"tokens: the index belongs to another shard" + hint)
    return toks, ends


# -----------------------------------------------------------------------------
# datatrove's tokenized folders, registered in place


def datatrove_shards(folder):
    # the token files of a datatrove tokenized folder (DocumentTokenizer's or its merger's), sorted; [] if it is not one
    return sorted(f for f in os.listdir(folder) if f.endswith(".ds")) if os.path.isdir(folder) else []


def register_datatrove(out_dir, name, folder, tok, val_frac=0.01, val_tokens=1_048_576, cmd=None, sample_docs=64):
    """Makes datatrove's tokenized folder source NAME of out_dir, read in place (nothing is copied): every shard checked
    (its size, its index, its metadata), the tokens checked against out_dir's tokenizer `tok` (the first documents
    decoded must encode to the same ids, each ending with <|endoftext|>), the val split chosen (the last documents of
    the last shard, at most val_frac of the tokens and val_tokens), then meta.json written. -> meta"""
    folder = os.path.abspath(folder)
    eos = tok.token_to_id("<|endoftext|>")
    files, named = [], set()
    for f in datatrove_shards(folder):
        path = os.path.join(folder, f)
        if not os.path.exists(path + ".index"):
            raise DataError(f"{path}.index: missing; datatrove writes it unless DocumentTokenizer(save_index=False)")
        size, isize = os.path.getsize(path), os.path.getsize(path + ".index")
        if os.path.exists(path + ".metadata"):  # "tokenizer|token size", the token count, the count in words
            with open(path + ".metadata") as fm:
                lines = fm.read().split("\n")
            tname, _, width = lines[0].rpartition("|")
            if width != "2":
                raise DataError(f"{path}: {width}-byte tokens (a vocabulary over 65536); nanosmol reads uint16 tokens: "
                                f"use a tokenizer of at most 65536 tokens (SmolLM2's has 49152)")
            if len(lines) < 2 or lines[1].strip() != str(size // 2):
                raise DataError(f"{path}: {size // 2:,} tokens, but its .metadata counts {lines[1:2]}: the shard is "
                                f"truncated or was rewritten without its metadata")
            named.add(tname)
        if size % 2 or isize % 8 or bool(size) != bool(isize):
            raise DataError(f"{path}: {size:,} bytes of tokens and {isize:,} bytes of index: one is truncated")
        toks, ends = open_datatrove(path, size // 2, isize // 8)  # the last end is the token count
        for a in range(0, len(ends), 1 << 24):  # document ends increase (the whole index: 8 bytes a document)
            e = np.asarray(ends[max(0, a - 1):a + (1 << 24)], dtype=np.int64)
            if np.any(np.diff(e) <= 0) or e[0] <= 0:
                raise DataError(f"{path}.index: document ends out of order or an empty document: not this shard's index")
        some = ends[np.linspace(0, len(ends) - 1, min(len(ends), 4096)).astype(np.int64)].astype(np.int64)
        if len(ends) and np.any(toks[some - 1] != eos):  # (prepare.py --check reads every token, every document end)
            raise DataError(f"{path}: documents that do not end with <|endoftext|> (id {eos}): tokenize with "
                            f"DocumentTokenizer(eos_token='<|endoftext|>') and {out_dir}'s tokenizer")
        files.append(dict(file=f, n_tokens=size // 2, n_docs=isize // 8))
    files = [f for f in files if f["n_docs"]]  # a task that wrote nothing
    if not files:
        raise DataError(f"{folder}: no datatrove shards with documents (*.ds and *.ds.index) in it")
    # the tokenizer: the first documents' text must encode back to their ids (a wrong tokenizer fails at once)
    toks, ends = open_datatrove(os.path.join(folder, files[0]["file"]), files[0]["n_tokens"], files[0]["n_docs"])
    n_text = n_tok = 0
    for k in range(min(sample_docs, len(ends))):
        ids = toks[0 if k == 0 else int(ends[k - 1]):int(ends[k]) - 1].tolist()
        text = tok.decode([i for i in ids if i < tok.vocab_size])
        if max(ids, default=0) >= tok.vocab_size or tok.encode(text) != ids:
            other = " or ".join(sorted(named)) or "another tokenizer"
            raise DataError(f"{folder}: its documents were tokenized with {other}, not with {out_dir}'s tokenizer "
                            f"(identity {tok.identity}: document {k} of {files[0]['file']} does not re-encode to its "
                            f"ids); prepare into a data directory of that tokenizer (--tokenizer), or tokenize with "
                            f"this one")
        n_text, n_tok = n_text + len(text.encode()), n_tok + len(ids) + 1
    # the val split: the last documents of the last shard (datatrove shuffles the documents of each shard)
    toks, ends = open_datatrove(os.path.join(folder, files[-1]["file"]), files[-1]["n_tokens"], files[-1]["n_docs"])
    total, n = sum(f["n_tokens"] for f in files), files[-1]["n_tokens"]
    budget = min(val_tokens, int(val_frac * total))
    k = int(np.searchsorted(ends[:-1], n - budget)) + 1 if budget < n else 0  # the first document starting there
    k = min(max(k, 1 if len(files) == 1 else 0), len(ends) - 1)  # one val document at least, one train one
    if len(files) == 1 and len(ends) < 2:
        raise DataError(f"{folder}: one document; a source needs two at least (one for training, one for validation)")
    val_from = int(ends[k - 1]) if k else 0
    meta = dict(name=name, format="datatrove", folder=folder, files=files, val_from=val_from, val_docs=len(ends) - k,
                val_tokens=n - val_from, n_tokens=total - (n - val_from),
                n_docs=sum(f["n_docs"] for f in files) - (len(ends) - k), vocab_size=tok.vocab_size, eos_id=eos,
                tokenizer=tok.identity, datatrove_tokenizer=sorted(named), bytes_per_token=round(n_text / n_tok, 3),
                command=cmd)
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    write_meta(os.path.join(out_dir, name), meta)
    print(f"{name}: datatrove folder {folder}, {len(files)} shards, {meta['n_docs'] + meta['val_docs']:,} documents, "
          f"{total:,} tokens ({meta['val_tokens']:,} val), read in place", flush=True)
    return meta
