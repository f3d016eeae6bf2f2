"""
Generation: the one engine behind sample.py, serve.py, eval.py's generative and code tasks and train.py's samples.

    with Engine(model, tok) as engine:
        req, = engine.generate([Request(tok.encode("The capital of France is"), max_new_tokens=16)])
        print(req.text, req.finish)                     # " Paris. ..." and "stop" or "length"

A Request carries a prompt (token ids), its sampling options (temperature 0 = greedy, top_k, top_p, seed) and its
stop strings. The engine fills in the generated ids (out), the text (UTF-8-safe, cut before a stop string) and why it
ended (finish). Requests join at the next step() and leave when they end (continuous batching): a new request is
prefilled alone, then every running request gets its next token from one batched forward through the KV cache, each
row at its own length. In fp32 a request's greedy tokens are the ones it gets alone.

One stop-token rule for every caller: the tokenizer's end of text, the model's eos_token_id and ChatML's end of turn
(<|im_end|>) where the vocabulary has it. The stop token is the last id of `out`; it adds no text.
"""
import codecs
import collections
import secrets
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    # logits (B, vocab) -> token ids (B,). temperature 0 is greedy.
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p (the top token always)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stop_token_ids(tok, model_config):
    # the one stop-token rule (see the module docstring)
    return {t for t in (tok.eos_id, model_config.eos_token_id, tok.token_to_id("<|im_end|>")) if t is not None}


class Detokenizer:
    """Token ids -> text deltas, O(1) per token: each id's bytes go through an incremental UTF-8 decoder, so a character
    split across tokens waits for its last byte. Stop strings: the text ends before the first one, and a tail that could
    still become one is held back, so no delta ever holds part of a stop string."""

    def __init__(self, tok, stops=()):
        self.tok, self.stops = tok, [s for s in stops if s]
        self.table = tok.token_bytes() if tok.byte_level else None
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.ids, self.prefix, self.read = [], 0, 0  # other decoders: ids since the last complete character (below)
        self.pending, self.stopped = "", False

    def _piece(self, t):
        if t >= self.tok.vocab_size:  # a model with a padded vocabulary sampled an id past the tokenizer: shown, not decoded
            return f"<{t}?>"
        if self.table is not None:
            return self.utf8.decode(self.table[t])
        # a tokenizer whose decode() depends on the neighbouring ids (e.g. sentencepiece's leading space): decode the
        # ids since the last emitted boundary with and without the new one, as Hugging Face's text streamers do
        self.ids.append(t)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def push(self, t):
        # -> the text that may be shown now; sets self.stopped at a stop string (the text before it is the last delta)
        if self.stopped:
            return ""
        self.pending += self._piece(t)
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self):
        # the end of the text: held-back text and an unfinished character (as U+FFFD, like decode())
        if self.stopped:
            return ""
        out = self.pending + (self.utf8.decode(b"", final=True) if self.table is not None else
                              self.tok.decode(self.ids[self.prefix:])[len(self.tok.decode(self.ids[self.prefix:self.read])):])
        self.pending = ""
        return out


@dataclass
class Request:
    ids: list                      # the prompt's token ids
    max_new_tokens: int = 256
    temperature: float = 0.0       # 0: greedy
    top_k: int = 0                 # 0: all tokens
    top_p: float = 1.0             # 1: no nucleus cut
    seed: Optional[int] = None     # sampling: the request's own generator (None: a random seed)
    stop: tuple = ()               # stop strings: the text ends before the first one
    out: list = field(default_factory=list)  # generated ids (a stop token is the last)
    text: str = ""                 # the generated text so far
    finish: Optional[str] = None   # "stop" (a stop token or string), "length" or "cancelled"
    cancelled: bool = False        # set by a caller: the request leaves at the next step


class KVCache:
    """Keys and values of up to `rows` sequences: per layer, (rows, Hkv, capacity, D) buffers. Before each forward the
    engine says which rows it feeds and where each row's new tokens start (at); Attention stores them and reads back
    everything its queries see through layer(i).update."""

    def __init__(self, cfg, rows, capacity, dtype, device):
        shape = (rows, cfg.n_kv_head, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.cfg, self.rows, self.capacity = cfg, rows, capacity

    def at(self, first, starts, T):
        # the next forward feeds rows first, first + 1, ... with T new tokens each, row i's from position starts[i]
        device = self.k[0].device
        self.first, self.starts, self.T, self.L = first, starts, T, max(starts) + T
        same = all(s == starts[0] for s in starts)
        self.pos = None if same else torch.tensor(starts, device=device)
        self.index = None if same else torch.arange(first, first + len(starts), device=device)
        self.mask = None  # None: causal from position 0 (a prefill), or one new token that sees every cached key
        if not ((same and starts[0] == 0) or (same and T == 1)):
            s = torch.tensor(starts, device=device)[:, None, None]  # query i of row b sees keys j <= start_b + i
            self.mask = torch.arange(self.L, device=device) <= s + torch.arange(T, device=device)[:, None]  # (B, T, L)

    def layer(self, i):
        return _Layer(self, i)

    def update(self, i, k, v):
        # k, v (B, Hkv, T, D) of the rows at() named -> (keys, values (B, Hkv, L, D), mask (B, T, L) or None)
        K, V, a, B = self.k[i], self.v[i], self.first, k.shape[0]
        if self.pos is None:
            s = self.starts[0]
            K[a:a + B, :, s:s + self.T] = k
            V[a:a + B, :, s:s + self.T] = v
            if s == 0:
                return k, v, None  # a prefill sees only itself
        else:  # one token per row, each at its own position
            K[self.index, :, self.pos] = k[:, :, 0]
            V[self.index, :, self.pos] = v[:, :, 0]
        return K[a:a + B, :, :self.L], V[a:a + B, :, :self.L], self.mask

    def move(self, src, dst, length):
        # row src's first `length` positions to row dst (the engine fills the hole a finished request left)
        for K, V in zip(self.k, self.v):
            K[dst, :, :length] = K[src, :, :length]
            V[dst, :, :length] = V[src, :, :length]

    def grown(self, rows, capacity):
        # a larger cache holding this one's contents
        new = KVCache(self.cfg, rows, capacity, self.k[0].dtype, self.k[0].device)
        for old, grown in zip(self.k + self.v, new.k + new.v):
            grown[:old.shape[0], :, :old.shape[2]] = old
        return new


class _Layer:
    def __init__(self, cache, i):
        self.cache, self.i = cache, i

    def update(self, k, v):
        return self.cache.update(self.i, k, v)


class Engine:
    """Runs Requests on a model: submit() queues, step() advances every running request by one token (see the module
    docstring), generate() runs a list to the end. max_batch: requests decoded together; later ones wait in order."""

    def __init__(self, model, tok, max_batch=8, autocast=None):
        self.model, self.tok, self.max_batch = model, tok, max_batch
        self.autocast = autocast or nullcontext()
        self.stop_ids = stop_token_ids(tok, model.config)
        self.waiting = collections.deque()
        self.running = []  # row i of the cache is running[i]
        self.cache = None
        self.generated = 0  # tokens so far (serve.py's /health)
        model.set_decode_copies(True)  # the fp32 CPU decode layout, for the engine's lifetime

    def close(self):
        self.model.set_decode_copies(False)  # they would go stale once the weights change (training)
        self.cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def submit(self, req):
        block = self.model.config.block_size
        if not req.ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(req.ids) >= block:
            raise ValueError(f"the prompt is {len(req.ids)} tokens; this model's context is {block}")
        if max(req.ids) >= self.model.config.vocab_size or min(req.ids) < 0:
            raise ValueError(f"prompt token id out of range [0, {self.model.config.vocab_size})")
        req.out, req.text, req.finish = [], "", None
        req._detok = Detokenizer(self.tok, req.stop)
        req._gen = None
        if req.temperature > 0:
            device = self.model.output.weight.device
            req._gen = torch.Generator(device=device).manual_seed(secrets.randbits(62) if req.seed is None else req.seed)
        self.waiting.append(req)
        return req

    def abort(self):
        # every waiting and running request ends now ("cancelled"), the engine empty for new ones: -> those requests
        gone = list(self.waiting) + self.running
        for r in gone:
            r.finish = "cancelled"
        self.waiting.clear()
        self.running = []
        self.cache = None  # whatever a failed step left in it goes too; the next prefill allocates afresh
        return gone

    def busy(self):
        return bool(self.waiting or self.running)

    def generate(self, requests):
        # submits them all, steps until every one has ended; -> the requests
        for r in requests:
            self.submit(r)
        while any(r.finish is None for r in requests):
            self.step()
        return requests

    @torch.inference_mode()
    def step(self):
        # -> [(request, text delta)] for the requests that got a token this step (a finished one has .finish set)
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            r.finish = "cancelled"
        for r in self.running:
            if r.cancelled:
                r.finish = "cancelled"
        self._compact()
        with self.autocast:
            while self.waiting and len(self.running) < self.max_batch:
                self._prefill(self.waiting.popleft())
            events = [(r, self._take(r)) for r in self.running]
            self._compact()
            if self.running:  # the next token's logits of every running request, in one forward
                rows = self.running
                x = torch.tensor([[r.out[-1]] for r in rows], device=self.cache.k[0].device)  # (n, 1)
                starts = [r._len for r in rows]
                self.cache.at(0, starts, 1)
                h = self.model.hidden_states(x, positions=torch.tensor(starts, device=x.device)[:, None],
                                             cache=self.cache)
                logits = self.model.output(h)[:, -1]  # (n, vocab); (n, 1, C) rows take Linear's decode layout
                for i, r in enumerate(rows):
                    r._logits, r._len = logits[i:i + 1], r._len + 1
        return events

    def _prefill(self, r):
        # alone: its prompt fills row len(running) of the cache; the logits of its first token come back
        block, n = self.model.config.block_size, len(self.running)
        need = min(len(r.ids) + r.max_new_tokens, block)
        if self.cache is None or need > self.cache.capacity:
            cap = min(block, -(-need // 128) * 128)  # grown in steps of 128 positions
            w = self.model.output.weight
            self.cache = KVCache(self.model.config, self.max_batch, cap, w.dtype, w.device) if self.cache is None \
                else self.cache.grown(self.max_batch, cap)
        x = torch.tensor([r.ids], device=self.cache.k[0].device)
        self.cache.at(n, [0], len(r.ids))
        r._logits = self.model.output(self.model.hidden_states(x, cache=self.cache)[:, -1:])[:, -1]  # (1, vocab)
        r._len = len(r.ids)
        self.running.append(r)

    def _take(self, r):
        # samples the request's next token; its text delta; finish when it ends
        t = int(sample_next(r._logits, r.temperature, r.top_k or None, r.top_p, r._gen)[0])  # CPU-GPU sync
        r.out.append(t)
        self.generated += 1
        if t in self.stop_ids:
            r.finish, delta = "stop", r._detok.flush()
        else:
            delta = r._detok.push(t)
            if r._detok.stopped:
                r.finish = "stop"
            elif len(r.out) >= r.max_new_tokens or len(r.ids) + len(r.out) >= self.model.config.block_size:
                r.finish, delta = "length", delta + r._detok.flush()
        r.text += delta
        return delta

    def _compact(self):
        # finished requests leave; running ones from the end fill their rows, so rows 0..n-1 stay the running ones
        rows = self.running
        keep = [r for r in rows if r.finish is None]
        holes = [i for i in range(len(keep)) if rows[i].finish is not None]
        movers = [j for j in range(len(keep), len(rows)) if rows[j].finish is None]
        for i, j in zip(holes, movers):
            self.cache.move(j, i, rows[j]._len)
            rows[i] = rows[j]
        self.running = rows[:len(keep)]
