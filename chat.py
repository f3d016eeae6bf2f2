"""
Post-training data: chat (SFT) and preference (DPO) rows rendered with the chat template into checked token files with
a per-token loss mask beside them, and the loaders train.py reads them with (objective = "sft" / "dpo").

    python prepare.py --chat sft --out data_cache/smoltalk --tokenizer TOK --source /data/smoltalk/*.parquet
    python prepare.py --chat dpo --out data_cache/ultrafeedback --tokenizer TOK --source /data/uf/train_prefs*.parquet
    python prepare.py --preset chat_demo          # the embedded demo task (corpus.py): data_cache/chat_demo/{sft,dpo}

Rows: SFT {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} (SmolTalk / OpenAI format).
DPO {"chosen": [messages], "rejected": [messages]} sharing the prompt turns (UltraFeedback-binarized), or
{"prompt": str, "chosen": str, "rejected": str}; the response is the last assistant turn. jsonl, jsonl.gz or parquet.

On disk, per split (train, val): the token file and index of data.py (documents = conversations; DPO: pair k is
documents 2k (chosen) and 2k + 1 (rejected)) and NAME.mask: the same header, then one uint8 per token, 1 where the
token is trained (SFT: every assistant turn's content and <|im_end|>; DPO: the last assistant turn's). chat.json says
what was kept, dropped and why.
"""
import json
import os

import numpy as np
import torch

from data import best_fit
from rows import DataError, file_kind, iter_rows, resolve_files
from tokenfiles import HEADER_BYTES, KIND_MASK, TokenWriter, make_header, open_tokens, read_header
from tokenizer import load_tokenizer

ROLES = ("system", "user", "assistant")


# -----------------------------------------------------------------------------
# rows -> (ids, mask)


def _check_messages(msgs, where):
    if not (isinstance(msgs, list) and msgs):
        raise ValueError(f"{where}: a non-empty list of messages is required")
    for m in msgs:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: each message needs a role in {ROLES} and str content, got {str(m)[:80]!r}")
    turns = [m["role"] for m in msgs if m["role"] != "system"]
    if any(m["role"] == "system" for m in msgs[1:]):
        raise ValueError(f"{where}: a system message may only come first")
    if any(a == b for a, b in zip(turns, turns[1:])) or (turns and turns[0] != "user"):
        raise ValueError(f"{where}: turns must alternate user / assistant, starting with the user")
    if "assistant" not in turns:
        raise ValueError(f"{where}: no assistant turn, nothing to train on")


def render_sft(tok, row):
    _check_messages(row.get("messages"), "messages")
    return [tok.render_chat(row["messages"])]


def render_dpo(tok, row):
    # -> [(chosen ids, mask), (rejected ids, mask)], each masked on its last assistant turn only
    c, r = row.get("chosen"), row.get("rejected")
    if isinstance(row.get("prompt"), str) and isinstance(c, str) and isinstance(r, str):
        c, r = ([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": x}] for x in (c, r))
    _check_messages(c, "chosen")
    _check_messages(r, "rejected")
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise ValueError("chosen and rejected must end with the assistant's response")
    if c[:-1] != r[:-1]:
        raise ValueError("chosen and rejected must share the prompt turns (all but the last)")
    out = []
    for msgs in (c, r):
        ids, mask = tok.render_chat(msgs)
        last = len(mask) - 1 - mask[::-1].index(1)  # the last trained token (the response's <|im_end|>)
        start = last
        while start > 0 and mask[start - 1]:
            start -= 1
        out.append((ids, [int(start <= k <= last) for k in range(len(mask))]))
    return out


# -----------------------------------------------------------------------------
# reading


def open_chat(data_dir, kind):
    """-> (meta, {split: (tokens, document offsets, mask)}), checked: headers, sizes, the tokenizer, the kind."""
    path = os.path.join(data_dir, "chat.json")
    if not os.path.exists(path):
        raise DataError(f"{data_dir}: no chat.json; prepare it with python prepare.py --chat {kind} --out {data_dir} "
                        f"--tokenizer TOK --source FILES")
    with open(path) as f:
        meta = json.load(f)
    if meta["kind"] != kind:
        raise DataError(f"{data_dir} holds {meta['kind']} data, but objective={kind!r} needs {kind} data")
    out = {}
    for split in ("train", "val"):
        hb, hm = (read_header(os.path.join(data_dir, f"{split}.{e}"), meta.get("command")) for e in ("bin", "mask"))
        if hm["kind"] != KIND_MASK or hm["n_items"] != hb["n_tokens"] or hm["identity"] != meta["tokenizer"]:
            raise DataError(f"{data_dir}/{split}.mask does not belong to {split}.bin; re-prepare the directory")
        toks = open_tokens(os.path.join(data_dir, f"{split}.bin"))
        offs = open_tokens(os.path.join(data_dir, f"{split}.idx"))
        mask = np.memmap(os.path.join(data_dir, f"{split}.mask"), dtype=np.uint8, mode="r", offset=HEADER_BYTES,
                         shape=(hm["n_items"],)).view(np.ndarray)
        out[split] = (toks, offs.astype(np.int64), mask)
    return meta, out


class SFTLoader:
    """Whole conversations packed into rows of block_size tokens (best-fit over a seeded per-epoch shuffle; none split
    across rows), rows shuffled, rank r taking its share of each global batch. next_batch() -> (x, y, positions,
    doc) int64 (B, T): y is -100 where the next token is not trained or belongs to another conversation, positions
    restart at 0 for each conversation, doc numbers the conversations of a row (-1: padding): attention must not
    cross them (documents.Documents). The state is (epoch, row): resume is exact."""

    def __init__(self, data_dir, block_size, batch_size, rank=0, world_size=1, seed=1337):
        self.meta, self.splits = open_chat(data_dir, "sft")
        self.T, self.B, self.rank, self.world_size, self.seed = block_size, batch_size, rank, world_size, seed
        toks, offs, _ = self.splits["train"]
        self.lengths = np.diff(offs)
        if self.lengths.max() > block_size:
            raise DataError(f"{data_dir}: a conversation of {int(self.lengths.max())} tokens does not fit "
                            f"block_size={block_size}; re-prepare with --max_len {block_size} or raise block_size")
        self.epoch, self.row = 0, 0
        self._rows = self._pack(0)
        self.rows_per_epoch = self.items_per_epoch = len(self._rows)
        # what train.py reads of a MixtureLoader: one stage of this shape, one source
        self.stages, self.stage, self.sources = [dict(start=0, block_size=block_size, batch_size=batch_size)], 0, ["chat"]

    def _pack(self, epoch):
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.lengths))
        rows = best_fit(self.lengths, order, self.T)
        perm = np.random.default_rng((self.seed, epoch, 1)).permutation(len(rows))
        return [rows[i] for i in perm]

    def _batch(self, split, rows):
        toks, offs, mask = self.splits[split]
        T = self.T
        x = np.zeros((len(rows), T), np.int64)
        y = np.full((len(rows), T), -100, np.int64)
        pos = np.zeros((len(rows), T), np.int64)
        doc = np.full((len(rows), T), -1, np.int64)
        for b, row in enumerate(rows):
            t = 0
            for k, d in enumerate(row):
                a, e = offs[d], offs[d + 1]
                n = e - a
                x[b, t:t + n] = toks[a:e]
                y[b, t:t + n - 1] = np.where(mask[a + 1:e] == 1, toks[a + 1:e].astype(np.int64), -100)
                pos[b, t:t + n], doc[b, t:t + n] = np.arange(n), k
                t += n
        return tuple(torch.from_numpy(a) for a in (x, y, pos, doc))

    def next_batch(self):
        # rows [row, row + B * W) of the epoch form the global micro-batch; an epoch's remainder is dropped
        if self.row + self.B * self.world_size > self.rows_per_epoch:
            self.epoch, self.row = self.epoch + 1, 0
            self._rows = self._pack(self.epoch)
            self.rows_per_epoch = len(self._rows)
        a = self.row + self.rank * self.B
        self.row += self.B * self.world_size
        return self._batch("train", self._rows[a:a + self.B])

    def val_batches(self, source="chat", num_batches=None):
        # every validation conversation once (num_batches: at most that many batches), packed in file order; rank r
        # takes batches r, r + W, ...
        # Every rank gets the same number of batches (FSDP runs its forwards in lockstep): a rank short of one gets a
        # copy of batch 0 with no trained token, which adds nothing.
        _, offs, _ = self.splits["val"]
        rows = best_fit(np.diff(offs), range(len(offs) - 1), self.T)
        batches = [rows[i:i + self.B] for i in range(0, len(rows), self.B)][:num_batches]
        out = []
        for k in range(self.rank, -(-len(batches) // self.world_size) * self.world_size, self.world_size):
            x, y, pos, doc = self._batch("val", batches[k % len(batches)])
            out.append((x, y if k < len(batches) else torch.full_like(y, -100), pos, doc))
        return out

    def state_dict(self):
        return dict(kind="sft", epoch=self.epoch, row=self.row, seed=self.seed, tokenizer=self.meta["tokenizer"],
                    n_docs=len(self.lengths))

    def load_state_dict(self, sd):
        if (sd.get("kind"), sd["seed"], sd["tokenizer"], sd["n_docs"]) != ("sft", self.seed, self.meta["tokenizer"],
                                                                           len(self.lengths)):
            raise DataError("cannot resume: the checkpoint's SFT data or seed differ from this run's")
        self.epoch, self.row = sd["epoch"], sd["row"]
        self._rows = self._pack(self.epoch)
        self.rows_per_epoch = len(self._rows)


class PairLoader:
    """Preference pairs, shuffled per epoch, P pairs per rank per micro-batch. next_batch() -> (x, y, idx): x, y
    (2P, T) with rows 2i / 2i + 1 the chosen / rejected of pair i (right-padded; y is -100 outside the response), idx
    (P,) the pairs' indices (for stored reference log-probabilities). The state is (epoch, position): resume is exact."""

    def __init__(self, data_dir, batch_pairs, rank=0, world_size=1, seed=1337):
        self.meta, self.splits = open_chat(data_dir, "dpo")
        self.P, self.rank, self.world_size, self.seed = batch_pairs, rank, world_size, seed
        self.n_pairs = {s: (len(v[1]) - 1) // 2 for s, v in self.splits.items()}
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)
        self.items_per_epoch = self.n_pairs["train"]
        self.stages = [dict(start=0, block_size=self.meta["max_len"], batch_size=batch_pairs)]
        self.stage, self.sources = 0, ["pairs"]

    def _perm(self, epoch):
        return np.random.default_rng((self.seed, epoch)).permutation(self.n_pairs["train"])

    def batch(self, split, pairs):
        toks, offs, mask = self.splits[split]
        docs = [d for p in pairs for d in (2 * p, 2 * p + 1)]
        T = int(max(offs[d + 1] - offs[d] for d in docs))
        x = np.zeros((len(docs), T), np.int64)
        y = np.full((len(docs), T), -100, np.int64)
        for b, d in enumerate(docs):
            a, e = offs[d], offs[d + 1]
            x[b, :e - a] = toks[a:e]
            y[b, :e - a - 1] = np.where(mask[a + 1:e] == 1, toks[a + 1:e].astype(np.int64), -100)
        return torch.from_numpy(x), torch.from_numpy(y), torch.as_tensor(np.asarray(pairs, dtype=np.int64))

    def next_batch(self):
        if self.pos + self.P * self.world_size > self.n_pairs["train"]:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        a = self.pos + self.rank * self.P
        self.pos += self.P * self.world_size
        return self.batch("train", self._order[a:a + self.P].tolist())

    def pairs_ahead(self, micro_steps):
        """The train pairs that every rank's next micro_steps micro-batches read, sorted; the loader's state does not
        change. DPO's stored reference log-probabilities cover these, not the whole split."""
        n, per = self.n_pairs["train"], self.P * self.world_size
        epoch, pos, order, seen = self.epoch, self.pos, self._order, set()
        for _ in range(micro_steps):
            if len(seen) == n:
                break
            if pos + per > n:  # next_batch's epoch turn
                epoch, pos = epoch + 1, 0
                order = self._perm(epoch)
            seen.update(order[pos:pos + per].tolist())
            pos += per
        return sorted(seen)

    def _val_chunks(self, num_batches):
        n = self.n_pairs["val"]
        return [list(range(i, min(i + self.P, n))) for i in range(0, n, self.P)][:num_batches]

    def val_pairs(self, num_batches=None):
        """The validation pairs that val_batches(num_batches) reads on all ranks together."""
        return [p for b in self._val_chunks(num_batches) for p in b]

    def val_batches(self, source="pairs", num_batches=None):
        # the same number of batches on every rank (FSDP's lockstep): a rank short of one gets batch 0 again with its
        # pair indices set to -1, which train.py does not count
        batches = self._val_chunks(num_batches)
        out = []
        for k in range(self.rank, -(-len(batches) // self.world_size) * self.world_size, self.world_size):
            x, y, idx = self.batch("val", batches[k % len(batches)])
            out.append((x, y, idx if k < len(batches) else torch.full_like(idx, -1)))
        return out

    def state_dict(self):
        return dict(kind="dpo", epoch=self.epoch, pos=self.pos, seed=self.seed, tokenizer=self.meta["tokenizer"],
                    n_pairs=self.n_pairs["train"])

    def load_state_dict(self, sd):
        if (sd.get("kind"), sd["seed"], sd["tokenizer"], sd["n_pairs"]) != ("dpo", self.seed, self.meta["tokenizer"],
                                                                            self.n_pairs["train"]):
            raise DataError("cannot resume: the checkpoint's DPO data or seed differ from this run's")
        self.epoch, self.pos = sd["epoch"], sd["pos"]
        self._order = self._perm(self.epoch)


# -----------------------------------------------------------------------------
# preparing chat data (prepare.py --chat): rows read, rendered with the chat template in parallel, split, written


def _chat_files(sources):
    # a source's files (a file, a directory, a glob), chat formats only; NAME=PATH is accepted too
    out = []
    for s in sources:
        s = s.partition("=")[2] if "=" in s and not os.path.exists(s) else s
        files = resolve_files(s)[0]
        other = [f for f in files if file_kind(f) not in ("jsonl", "parquet")]
        if other:
            raise DataError(f"{other[0]}: chat data must be .jsonl, .jsonl.gz or .parquet")
        out += files
    return out


_chat_tok = None


def _init_chat_worker(tok_path):
    global _chat_tok
    _chat_tok = load_tokenizer(tok_path)


def _render_chunk(args):
    kind, max_len, truncate, items = args
    out = []
    for where, row in items:
        try:
            if isinstance(row, Exception):
                raise ValueError(f"not valid JSON ({row})")
            seqs = (render_sft if kind == "sft" else render_dpo)(_chat_tok, row)
        except (ValueError, TypeError, AttributeError) as e:
            out.append((where, "skip", str(e)))
            continue
        if max(len(ids) for ids, _ in seqs) > max_len:
            if not truncate:
                out.append((where, "long", None))
                continue
            seqs = [(ids[:max_len], mask[:max_len]) for ids, mask in seqs]
            if not all(any(m) for _, m in seqs):
                out.append((where, "long", None))  # truncation left no trained token
                continue
            out.append((where, "cut", seqs))
            continue
        out.append((where, "ok", seqs))
    return out


def prepare_chat(out_dir, sources, kind, tokenizer, max_len=2048, truncate=False, workers=None, val_frac=0.01,
                 max_val=1000, cmd=None):
    """Render every row of `sources` with `tokenizer`'s chat template into out_dir (see the module docstring).
    Conversations longer than max_len tokens are dropped (truncate=True: cut, if a trained token remains); rows
    that are not valid conversations are skipped; both are counted and reported, and a few named."""
    from multiprocessing import get_context
    if kind not in ("sft", "dpo"):
        raise DataError(f"--chat {kind}: must be sft or dpo")
    files = _chat_files(sources)
    tok = load_tokenizer(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(out_dir)
    tok_json = os.path.join(out_dir, "tokenizer.json")
    workers = workers or len(os.sched_getaffinity(0))
    every = max(1, round(1 / val_frac)) if val_frac > 0 else 0
    writers = {s: (TokenWriter(os.path.join(out_dir, s), tok.vocab_size, tok.eos_id or 0, tok.identity),
                   open(os.path.join(out_dir, s + ".mask.tmp"), "wb")) for s in ("train", "val")}
    for _, fm in writers.values():
        fm.write(b"\0" * HEADER_BYTES)
    counts = dict(kept=0, train=0, val=0, long=0, cut=0, skip=0, tokens=0, trained=0)
    examples = []

    def chunks():
        buf = []
        for path in files:
            for line, row in iter_rows(path):
                buf.append((f"{path}:{line}", row))
                if len(buf) == 256:
                    yield (kind, max_len, truncate, buf)
                    buf = []
        if buf:
            yield (kind, max_len, truncate, buf)

    ctx = get_context("fork")
    with ctx.Pool(workers, initializer=_init_chat_worker, initargs=(tok_json,)) as pool:
        for res in pool.imap(_render_chunk, chunks()):
            for where, status, seqs in res:
                if status in ("skip", "long"):
                    counts[status] += 1
                    if status == "skip" and len(examples) < 5:
                        examples.append(f"{where}: {seqs}")
                    continue
                counts["cut"] += status == "cut"
                split = "val" if every and counts["kept"] % every == 0 and counts["val"] < max_val else "train"
                counts["kept"] += 1
                counts[split] += 1
                w, fm = writers[split]
                flat = np.array([t for ids, _ in seqs for t in ids], dtype="<u2")
                w.add(flat, [len(ids) for ids, _ in seqs])
                fm.write(np.array([m for _, mask in seqs for m in mask], dtype=np.uint8).tobytes())
                counts["tokens"] += len(flat)
                counts["trained"] += sum(sum(mask) for _, mask in seqs)
    if counts["train"] == 0 or counts["val"] == 0:
        for w, fm in writers.values():
            w.abort()
            fm.close()
        raise DataError(f"{out_dir}: {counts['kept']} usable rows ({counts['skip']} skipped, {counts['long']} longer "
                        f"than max_len={max_len}); need at least one for train and one for val"
                        + "".join(f"\n  {e}" for e in examples))
    for split, (w, fm) in writers.items():
        n = w.n_tokens
        w.finish()
        fm.seek(0)
        fm.write(make_header(KIND_MASK, n, 1, n, w.n_docs, tok.vocab_size, tok.eos_id or 0, tok.identity))
        fm.close()
        os.replace(os.path.join(out_dir, split + ".mask.tmp"), os.path.join(out_dir, split + ".mask"))
    meta = dict(kind=kind, tokenizer=tok.identity, max_len=max_len, truncate=truncate, files=files, command=cmd,
                **counts)
    with open(os.path.join(out_dir, "chat.json"), "w") as f:
        json.dump(meta, f, indent=1)
    what = "conversations" if kind == "sft" else "pairs"
    print(f"{out_dir}: {counts['train']:,} train + {counts['val']:,} val {what}, {counts['tokens']:,} tokens "
          f"({counts['trained']:,} trained); dropped {counts['long']:,} longer than {max_len} tokens"
          + (f", cut {counts['cut']:,}" if truncate else " (--truncate keeps them cut)")
          + f"; skipped {counts['skip']:,} invalid rows" + "".join(f"\n  {e}" for e in examples))
    return meta
