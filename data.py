"""
nanosmol data: MixtureLoader, which mixes the sources of a data directory by stage while training.

SmolLM2's central idea is the data mixture and how it changes by stage (shared/REFERENCE.md §3): web, code and math
sources are prepared once (prepare.py; tokenfiles.py has their format), and the trainer reads them at weights that
change at given token counts.

    loader = MixtureLoader("data_cache/mix", block_size=2048, batch_size=16, stages=stages, rank=r, world_size=W)
    x, y = loader.next_batch()    # int64 (B, T); y is x shifted by one token
    # doc_ids=True: x, y, doc = loader.next_batch(); doc (B, T) int32 numbers the documents of each window (from the
    # token files' document index), for attention within documents (documents.Documents)
"""
import math
import sys
import zlib
from bisect import bisect_left, insort
from fractions import Fraction

import numpy as np
import torch

from rows import DataError
from tokenfiles import check_data_dir, list_sources, source_shards

# -----------------------------------------------------------------------------
# packing and windows


def best_fit(lengths, order, capacity):
    """Bin packing, best fit: documents (indices, in `order`) into rows of `capacity` tokens, each into the row with the
    least room that still holds it; none is split (one longer than capacity gets a row of its own). SFT packs
    conversations with it (chat.py), eval.py its multiple-choice items. -> rows, lists of document indices."""
    rows, free = [], []  # free: sorted (room left, row index)
    for d in order:
        n = int(lengths[d])
        k = bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(d)
            insort(free, (room - n, r))
        else:
            rows.append([d])
            insort(free, (max(capacity, n) - n, len(rows) - 1))
    return rows


def mark_docs(ends, a, first):
    # first[t] = whether a document of a token array starts at its token a + t (ends: the array's sorted document ends;
    # a document starts at 0 and at every end but the last)
    lo, hi = np.searchsorted(ends, [a, a + len(first)])
    first[:] = False
    first[(ends[lo:hi] - a).astype(np.int64)] = True
    first[0] |= a == 0


def doc_numbers(first):
    # (B, T) bool document starts -> (B, T) int32 document numbers from 0 (documents.Documents); a window's first token
    # begins its first document whatever the flag says
    ids = np.zeros(first.shape, dtype=np.int32)
    np.cumsum(first[:, 1:], axis=1, out=ids[:, 1:])
    return torch.from_numpy(ids)


class _Source:
    """One source's training tokens as an endless stream, read as shuffled windows. Two levels of shuffling:
    1. Epoch e of the stream is the documents regrouped into chunks of whole documents (~chunk_tokens each), in a
       permutation seeded by (seed, source, e): every region of the source, in a random order.
    2. Each epoch is cut into segments of shuffle_tokens, and a segment's windows of T tokens are read in a
       permutation seeded by (seed, source, segment): so the windows of one global batch are independent samples of
       a segment, never runs of neighbours (Megatron and nanotron shuffle samples too; one permutation of a whole
       epoch's windows would not fit in memory).
    A position is a token count in the stream: windows(pos, count, T) -> where the next windows lie and the position
    after them. A stage that changes T continues at the next segment (segment_end), since the windows already read
    are spread over the current one. Chunk edges fall on <|endoftext|>, so a window that spans two chunks looks like
    any packed window."""
    MAX_CHUNKS = 1 << 20

    def __init__(self, data_dir, name, seed, chunk_tokens, shuffle_tokens):
        self.name, self.shuffle_tokens = name, shuffle_tokens
        # the source's token arrays (one, or a datatrove folder's shards) as one stream: memmaps, never loaded whole
        self.shards = source_shards(data_dir, name, "train")
        sizes = [len(t) for t, _ in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)  # each shard's first token
        self.n = int(sum(sizes))
        # chunk k of a shard starts at its first document start at or after k * step (long documents stay whole; no
        # chunk spans two shards). At most ~MAX_CHUNKS chunks, so a trillion-token source keeps its per-epoch tables
        # small (~16 MB) with coarser chunks.
        step = max(chunk_tokens, -(-self.n // self.MAX_CHUNKS))
        cuts = []
        for off, (toks, ends) in zip(self.offsets.tolist(), self.shards):
            t = np.arange(0, len(toks), step, dtype=np.uint64)
            k = np.minimum(np.searchsorted(ends[:-1], t) + (t > 0), len(ends) - 1)  # index of the first start >= t
            starts = np.where(k == 0, 0, ends[np.maximum(k, 1) - 1]).astype(np.int64)  # start k is end k - 1
            cuts.append(off + np.unique(starts))
        self.chunk_start = np.concatenate(cuts)
        self.chunk_len = np.diff(np.append(self.chunk_start, self.n))
        self.seed_key = (seed, zlib.crc32(name.encode()))
        self._tables, self._perms = {}, {}
        self._lo = self._hi = self._base = 0  # the chunk the last read ended in: stream positions [lo, hi) at token base

    def _copy(self, a, out, first=None):
        # out[:] = tokens a .. a + len(out) of the concatenated shards, a range inside one chunk (so one shard); first
        # (optional): where documents begin
        f = int(self.offsets.searchsorted(a, side="right")) - 1 if len(self.shards) > 1 else 0
        toks, ends = self.shards[f]
        a -= int(self.offsets[f])
        out[:] = toks[a:a + len(out)]
        if first is not None:
            mark_docs(ends, a, first)

    def _table(self, epoch):  # (start token of each chunk in read order, cumulative lengths), cached for two epochs
        t = self._tables.get(epoch)
        if t is None:
            perm = np.random.default_rng([*self.seed_key, epoch]).permutation(len(self.chunk_start))
            t = (self.chunk_start[perm], np.concatenate([[0], np.cumsum(self.chunk_len[perm])]))
            if len(self._tables) >= 2:
                self._tables.pop(min(self._tables))
            self._tables[epoch] = t
        return t

    def _segment(self, pos):  # (segment start, its length) of the stream position pos
        e, q = divmod(pos, self.n)
        s0 = e * self.n + q // self.shuffle_tokens * self.shuffle_tokens
        return s0, min(self.shuffle_tokens, (e + 1) * self.n - s0)

    def segment_end(self, pos):  # pos at a segment's start, else where its segment ends
        s0, length = self._segment(pos)
        return pos if pos == s0 else s0 + length

    def windows(self, pos, count, T):
        """Stream positions of the next `count` windows of T tokens from position pos (at the start of a window of
        its segment), in the segments' shuffled orders -> (positions (count,) int64, the position after them). The
        last T - 1 tokens of a segment at most are never a window's start: a segment holds len // T windows."""
        out, got = np.empty(count, dtype=np.int64), 0
        while got < count:
            s0, length = self._segment(pos)
            nw, k = length // T, (pos - s0) // T
            if k >= nw:                        # the segment is used up: the next one starts where it ends
                pos = s0 + length
                continue
            key = (s0, nw)
            perm = self._perms.get(key)
            if perm is None:                   # the seed names the segment by its start: unique in the stream
                perm = np.random.default_rng([*self.seed_key, s0, nw, 1]).permutation(nw)
                if len(self._perms) >= 2:
                    self._perms.pop(next(iter(self._perms)))
                self._perms[key] = perm
            take = min(count - got, nw - k)
            out[got:got + take] = s0 + perm[k:k + take] * T
            got += take
            pos = s0 + (k + take) * T
        return out, pos

    def gather(self, starts, length, buf, rows, first=None):
        # buf[rows[i]] = stream[starts[i] : starts[i] + length]; first (optional, bool like buf): True where a
        # document begins
        if len(starts) == 0:
            return
        epoch, q = np.divmod(starts, self.n)
        slow = []
        groups = [np.arange(len(starts))] if epoch.min() == epoch.max() else \
            [np.flatnonzero(epoch == e) for e in np.unique(epoch)]  # nearly always one epoch
        for sel in groups:
            cstart, cum = self._table(int(epoch[sel[0]]))
            k = cum.searchsorted(q[sel], side="right") - 1
            fits = q[sel] + length <= cum[k + 1]           # inside one chunk: one contiguous slice of the file
            a = cstart[k] + q[sel] - cum[k]
            for i, r, ai, f in zip(sel.tolist(), rows[sel].tolist(), a.tolist(), fits.tolist()):
                if f:  # slices: cheaper than one fancy-indexed gather of every token
                    self._copy(ai, buf[r], None if first is None else first[r])
                else:
                    slow.append(i)
        for i in slow:                                     # across a chunk edge (or an epoch's end)
            self.read(int(starts[i]), buf[rows[i]], None if first is None else first[rows[i]])

    def read(self, pos, out, first=None):  # out[:] = stream[pos : pos + len(out)]; first: as gather's
        length = len(out)
        if self._lo <= pos and pos + length <= self._hi:  # most windows lie inside the chunk the last one ended in
            self._copy(self._base + pos - self._lo, out, first)
            return
        filled = 0
        while filled < length:
            epoch, q = divmod(pos, self.n)
            starts, cum = self._table(epoch)
            k = int(cum.searchsorted(q, side="right")) - 1
            self._lo, self._hi, self._base = epoch * self.n + int(cum[k]), epoch * self.n + int(cum[k + 1]), int(starts[k])
            take = min(self._hi - pos, length - filled)
            self._copy(self._base + pos - self._lo, out[filled:filled + take],  # a chunk begins with a document
                       None if first is None else first[filled:filled + take])
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
    So proportions hold in every global batch, ranks read disjoint sequences, and a resume at another world size or
    batch size continues the same stream exactly. (One exception: a stage that changes block_size or batch_size begins
    with the first global batch at or after its start, so where it begins depends on the global batch size.) Each
    source's windows are shuffled within segments of shuffle_tokens of its chunk-shuffled stream (_Source)."""

    def __init__(self, data_dir, block_size, batch_size, stages=None, rank=0, world_size=1, seed=1337,
                 chunk_tokens=8192, shuffle_tokens=1 << 25, doc_ids=False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.data_dir, self.rank, self.world_size, self.seed = data_dir, rank, world_size, seed
        self.chunk_tokens, self.shuffle_tokens = chunk_tokens, shuffle_tokens
        self.doc_ids = doc_ids  # batches add each token's document number (the token files' own index)
        available = list_sources(data_dir)
        if not available:
            raise DataError(f"{data_dir}: no prepared sources in it\n---> HINT: python prepare.py --out {data_dir} ...")
        if stages is None:  # one stage, each source at its natural share of tokens (in 1/1000: a short period)
            metas = check_data_dir(data_dir)
            total = sum(m["n_tokens"] for m in metas.values())
            stages = [{"start": 0, "weights": {n: max(1, round(1000 * m["n_tokens"] / total)) for n, m in metas.items()}}]
        self.stages = self._check_stages(stages, block_size, batch_size, available)
        if shuffle_tokens < max(s["block_size"] for s in self.stages) + 1:
            raise DataError(f"shuffle_tokens={shuffle_tokens} must exceed every block_size "
                            f"({max(s['block_size'] for s in self.stages)}): a shuffle segment holds whole windows")
        self.sources = sorted({n for s in self.stages for n in s["weights"]})
        self.metas = check_data_dir(data_dir, self.sources)  # only the sources used: a broken unused one is no matter
        self.vocab_size = next(iter(self.metas.values()))["vocab_size"]
        self.tokenizer_identity = next(iter(self.metas.values()))["tokenizer"]
        self._src = [_Source(data_dir, n, seed, chunk_tokens, shuffle_tokens) for n in self.sources]
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
            if nxt["block_size"] != self.block_size:  # windows of another size: each source continues at its next
                self.pos = [s.segment_end(p) for s, p in zip(self._src, self.pos)]  # segment (none read twice)
            self._enter_stage(self.stage + 1)
        return None

    def next_batch(self):
        left = self._next_switch(batch_start=True)
        T, B, W, rank = self.block_size, self.batch_size, self.world_size, self.rank
        buf = np.empty((B, T + 1), dtype=np.uint16)
        first = np.empty((B, T + 1), dtype=bool) if self.doc_ids else None
        j = 0
        while j < B * W:
            if left == 0:
                left = self._next_switch(batch_start=False)
            n = B * W - j if left is None else min(B * W - j, left)  # the next n sequences are all of this stage
            loc = self._mix.picks(self._counts, self.stage_seq, n)         # (n,) stage-local source of each
            for l, d in enumerate(self._stage_src):
                mine = np.flatnonzero(loc == l)  # the run's sequences from source d (all ranks), in order
                if len(mine) == 0:
                    continue
                starts, self.pos[d] = self._src[d].windows(self.pos[d], len(mine), T)
                keep = (j + mine) % W == rank  # windows overlap by one token, so each token is input and target once
                self._src[d].gather(starts[keep], T + 1, buf, (j + mine[keep]) // W, first)
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
        return (x, y) if first is None else (x, y, doc_numbers(first[:, :-1]))

    def epochs(self):
        return {n: self.pos[i] / self._src[i].n for i, n in enumerate(self.sources)}

    def val_batches(self, source, num_batches):
        """Fixed batches of the source's held-out documents: consecutive windows of the current block size, rank r
        taking batches r, r + W, ... of the global list (rank-disjoint; average the loss over ranks). Wraps around,
        with a warning, when the val split is smaller than num_batches * world_size batches."""
        if source not in self.sources:
            raise DataError(f"unknown source '{source}'; this loader has {self.sources}")
        T, B, W = self.block_size, self.batch_size, self.world_size
        (toks, ends), = source_shards(self.data_dir, source, "val", self.metas[source])
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
            batch = (torch.from_numpy(win[:, :-1].copy()), torch.from_numpy(win[:, 1:].copy()))
            if self.doc_ids:
                first = np.empty((B, T), dtype=bool)
                for r, wr in enumerate(w.tolist()):
                    mark_docs(ends, wr * T, first[r])
                batch += (doc_numbers(first),)
            out.append(batch)
        return out

    def state_dict(self):
        return dict(version=2, seq=self.seq, tokens_consumed=self.tokens_consumed, stage=self.stage,
                    stage_seq=self.stage_seq, stage_counts={self.sources[s]: c for s, c in zip(self._stage_src, self._counts)},
                    pos=dict(zip(self.sources, self.pos)), seed=self.seed, chunk_tokens=self.chunk_tokens,
                    shuffle_tokens=self.shuffle_tokens,
                    source_tokens={n: s.n for n, s in zip(self.sources, self._src)},
                    stages=[dict(s, weights=dict(s["weights"])) for s in self.stages[:self.stage + 1]],
                    tokenizer=self.tokenizer_identity)

    def load_state_dict(self, sd):
        if sd.get("version") != 2:
            raise DataError(f"loader state version {sd.get('version')}: written by an older data.py, whose sequences "
                            f"were not shuffled; this data.py reads version 2. Resume with the nanosmol version that "
                            f"wrote the checkpoint, or continue from its weights with --init_from=<ckpt_*.pt>")
        for key, mine in (("seed", self.seed), ("chunk_tokens", self.chunk_tokens), ("shuffle_tokens", self.shuffle_tokens),
                          ("tokenizer", self.tokenizer_identity)):
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

