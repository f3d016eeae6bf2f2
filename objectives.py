"""
What differs between training objectives, one unit each; train.py is the loop around them and never asks which one.

    pretrain            next-token loss over every token of data.MixtureLoader's staged mixture; doc_masking: attention
                        within each document of a window (doc_positions: positions per document too)
    sft                 chat data (chat.SFTLoader): conversations packed into rows, attention and positions per
                        conversation, the loss on assistant tokens as the mean over the global batch's trained tokens
    dpo, apo_zero, ipo  preference pairs (chat.PairLoader) against a frozen reference model, TRL's loss types:
                        DPO's sigmoid, APO-zero (SmolLM3's), IPO

An objective checks the config before anything runs (config_error(cfg): a message or None), is built from the run
(Run: the config, the ranks, the device) and gives train.py:
    loader(max_steps)             its data loader: next_batch(), stages, state_dict(); val_batches() for validate
    accum_steps(T, B)             micro steps per optimizer step at a stage's shape
    describe(accum, max_steps)    the run's size, for the log
    setup(model, tok, ckpt, ...)  once the model exists (before it is wrapped): the preference reference's pass
    begin_step(batches)           the micro-batches of one optimizer step, before the first backward
    inputs(batch)                 -> (x, y, the model's other arguments): positions, documents (pretrain, sft)
    probe_doc_len()               the mean document length a time_budget probe packs its rows with (0: none)
    loss(model, batch)            -> (the micro step's loss to backward, its statistics to sum over the step or None)
    step_log(stats)               numbers for the step's log line from the summed statistics
    validate(model)               -> ({source: (val loss, val bits per byte)}, {other numbers})
    state_dict()                  what it keeps in a checkpoint (e.g. where the preference reference came from)
Adding an objective is one class here and its name in OBJECTIVES.
"""
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import chat
import corpus
import data
import tokenfiles
from checkpoint import open_model
from documents import Documents


@dataclass
class Run:
    cfg: dict                # train.py's resolved config
    rank: int
    world_size: int
    ddp: bool                # more than one process (torchrun)
    device: str
    autocast: object         # the compute dtype's context (nullcontext in fp32)
    print0: Callable         # prints on rank 0 and keeps the line in out_dir/log.txt


def _sum_ranks(run, t):
    if run.ddp:
        dist.all_reduce(t)
    return t


class Objective:
    tokens_per_step = True   # the step's tokens/s and MFU mean something (not for preference pairs)
    needs_weights = False    # starts from a trained model (init_from), never from scratch

    def __init__(self, run: Run):
        self.run, self.cfg = run, run.cfg

    @classmethod
    def config_error(cls, c):
        # what in the config this objective cannot run with, or None; here post-training's (Pretrain has its own)
        name = c["objective"]
        if c["stages"] is not None or c["data_prepare"] not in ("", "auto", "chat_demo"):
            return f"objective={name!r} reads one chat directory (prepare.py --chat): stages and data_prepare are for pretraining"
        if c["epochs"] < 0:
            return f"epochs={c['epochs']}: a run's length in passes over the data, >= 0"
        if c["doc_masking"] or c["doc_positions"]:
            return (f"doc_masking and doc_positions are pretraining's switches; objective={name!r} "
                    f"{'always attends within each conversation' if name == 'sft' else 'reads unpacked pairs'}")
        if cls.needs_weights and c["init_from"] == "scratch":
            return f"objective={name!r} starts from a trained (SFT) model: set init_from"
        return None

    def probe_doc_len(self):
        return 0

    def data_preset(self):
        # (prepare.py preset, directory to build it in) for data_prepare, or None
        p = self.cfg["data_prepare"]
        return (p, self.cfg["data_dir"]) if p not in ("", "auto") else None

    def accum_steps(self, T, B):
        # gradient accumulation so that every optimizer step sees total_batch_tokens at any world size (llm.c)
        per_micro, total = B * T * self.run.world_size, self.cfg["total_batch_tokens"]
        if total % per_micro:
            raise SystemExit(f"total_batch_tokens={total} is not a multiple of micro_batch_size*block_size*world_size "
                             f"= {B}*{T}*{self.run.world_size} = {per_micro}: change micro_batch_size or "
                             f"total_batch_tokens")
        return total // per_micro

    def describe(self, accum, max_steps):
        T, B = self.loader_.stages[self.loader_.stage]["block_size"], self.loader_.stages[self.loader_.stage]["batch_size"]
        total = self.cfg["total_batch_tokens"]
        return (f"tokens per step: {total:,} = {B} seqs x {T} tokens x {self.run.world_size} ranks x {accum} "
                f"accumulation steps; {max_steps:,} steps = {total * max_steps / 1e9:.3g}B tokens")

    def setup(self, model, tok, ckpt, max_steps, accum, init_origin):
        self.token_bytes = torch.tensor(tok.token_byte_lengths(), device=self.run.device)  # bits per byte
        self.refresh_val()

    def refresh_val(self):
        # fixed validation batches (each rank its own share, every eval the same), at the current stage's shape
        n = self.cfg["eval_batches"]
        self.val = {s: self.loader_.val_batches(s, n) for s in self.loader_.sources}

    def begin_step(self, batches):
        self.n_micro = len(batches)

    def step_log(self, stats):
        return {}

    def state_dict(self):
        return {}


class Pretrain(Objective):
    @classmethod
    def config_error(cls, c):
        if c["epochs"]:
            return f"epochs={c['epochs']}: a run's length in passes over sft or preference data; pretraining's is max_steps"
        if c["doc_positions"] and not c["doc_masking"]:
            return ("doc_positions=True restarts positions at each document, which needs attention within documents "
                    "too: set doc_masking=True")
        return None

    def probe_doc_len(self):
        # with doc_masking, the data's mean document length (the time the attention takes depends on it)
        if not self.cfg["doc_masking"]:
            return 0
        try:
            metas = tokenfiles.check_data_dir(self.cfg["data_dir"]).values()
        except data.DataError:
            return 0  # the loader, built next, says what is wrong
        return sum(m["n_tokens"] for m in metas) / max(1, sum(m["n_docs"] for m in metas))

    def data_preset(self):
        # "auto": a quickstart corpus when data_dir is its directory, so `python train.py` runs offline
        if self.cfg["data_prepare"] == "auto":
            d = os.path.normpath(self.cfg["data_dir"])
            return next(((p, d) for p, q in corpus.QUICKSTART_DIRS.items() if os.path.normpath(q) == d), None)
        return super().data_preset()

    def loader(self, max_steps):
        # a stage's start in tokens, or as a float in (0, 1) a fraction of the run (rounded to a step, so a stage that
        # changes the batch's shape begins on a step boundary); a stage's rope_theta is the model's business (train.py)
        c, total = self.cfg, self.cfg["total_batch_tokens"]
        start = lambda x: round(x * max_steps) * total if isinstance(x, float) and 0 < x < 1 else x
        stages = c["stages"] and [{**{k: v for k, v in s.items() if k != "rope_theta"}, "start": start(s["start"])}
                                  for s in c["stages"]]
        self.loader_ = data.MixtureLoader(c["data_dir"], block_size=c["block_size"], batch_size=c["micro_batch_size"],
                                          rank=self.run.rank, world_size=self.run.world_size, seed=c["seed"],
                                          stages=stages, doc_ids=c["doc_masking"])
        return self.loader_

    def inputs(self, batch):
        # (x, y) or, with doc_masking, (x, y, document numbers)
        batch = [t.to(self.run.device, non_blocking=True) for t in batch]
        if len(batch) == 2:
            return batch[0], batch[1], {}
        docs = Documents(batch[2])
        return batch[0], batch[1], dict(docs=docs, positions=docs.positions() if self.cfg["doc_positions"] else None)

    def loss(self, model, batch):
        x, y, kw = self.inputs(batch)
        _, loss = model(x, y, **kw)
        return loss / self.n_micro, None  # the gradient of the mean over the whole global batch

    def validate(self, model):
        return likelihoods(self.run, model, self.val, self.inputs, self.token_bytes, token_mean=False), {}


class SFT(Objective):
    def loader(self, max_steps):
        c = self.cfg
        self.loader_ = chat.SFTLoader(c["data_dir"], c["block_size"], c["micro_batch_size"], self.run.rank,
                                      self.run.world_size, c["seed"])
        return self.loader_

    def data_preset(self):  # the chat demo's sft/ and dpo/ share a parent directory
        p = self.cfg["data_prepare"]
        return (p, os.path.dirname(os.path.normpath(self.cfg["data_dir"]))) if p == "chat_demo" else None

    def begin_step(self, batches):
        # the loss is the mean over the trained tokens of the whole global batch, so each micro-batch's summed loss is
        # divided by that count (all ranks, all micro-batches: known before the first backward). DDP and FSDP average
        # gradients over ranks, hence the world_size factor in loss(). A micro-batch without a trained token adds 0.
        n = torch.tensor(float(sum(int((b[1] != -100).sum()) for b in batches)), device=self.run.device)
        self.n_trained = _sum_ranks(self.run, n).clamp(min=1)

    def inputs(self, batch):
        # packed conversations: positions restart and attention stays within each (chat.SFTLoader)
        x, y, pos, doc = (t.to(self.run.device) for t in batch)
        return x, y, dict(positions=pos, docs=doc)

    def loss(self, model, batch):
        x, y, kw = self.inputs(batch)
        _, loss = model(x, y, reduction="sum", **kw)
        return loss * self.run.world_size / self.n_trained, None

    def validate(self, model):
        return likelihoods(self.run, model, self.val, self.inputs, self.token_bytes, token_mean=True), {}


@torch.no_grad()
def likelihoods(run, model, val, inputs, token_bytes, token_mean):
    # per source, over its fixed validation batches (each rank holds its own, disjoint share): {source: (mean loss in
    # nats per token, bits per byte)}. Bits per byte = the summed loss / ln 2 / the UTF-8 bytes the targets stand for:
    # it does not depend on the tokenizer, so runs with different tokenizers compare. token_mean: the mean over the
    # trained tokens of all batches (sft), else the mean of the batches' means (equal-sized batches). inputs: the
    # objective's, a batch -> (x, y, the model's other arguments).
    model.eval()
    out = {}
    for src, batches in val.items():
        tot = torch.zeros(5, dtype=torch.float64, device=run.device)  # (sum of batch means, batches, nats, targets, bytes)
        for batch in batches:
            x, y, kw = inputs(batch)
            with run.autocast:
                _, nats = model(x, y, reduction="sum", **kw)
            nats, n = nats.double(), (y != -100).sum().double()
            tot += torch.stack([nats / n.clamp(min=1), torch.ones_like(n), nats, n,
                                token_bytes[y.clamp(min=0)][y != -100].sum().double()])
        _sum_ranks(run, tot)
        loss = tot[2] / tot[3] if token_mean else tot[0] / tot[1]
        out[src] = (loss.item(), (tot[2] / (math.log(2) * tot[4])).item())  # CPU-GPU sync
    model.train()
    return out


# -----------------------------------------------------------------------------
# preference optimisation


PAIR_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class Preference(Objective):
    """Pairs against a frozen reference: the initial (SFT) model, also when the run resumes (checkpoints keep where
    its weights came from). Its log-probabilities are computed at the start for the pairs the run reads and stored in
    out_dir/dpo_reference.pt (dpo_reference = "precompute"), or by a frozen copy at every step ("online"). The losses
    are TRL's (logratio = log pi - log pi_ref, summed over the response): dpo -logsigmoid(beta (c - r)) (with cDPO's
    label smoothing), apo_zero (1 - sigmoid(beta c)) + sigmoid(beta r), ipo (h - 1/(2 beta))^2 with h from the
    logratios averaged over the response tokens. Rewards are beta * logratio, as TRL logs them."""
    tokens_per_step, needs_weights = False, True

    def data_preset(self):
        return SFT.data_preset(self)

    def loader(self, max_steps):
        c = self.cfg
        self.loader_ = chat.PairLoader(c["data_dir"], c["micro_batch_size"], self.run.rank, self.run.world_size,
                                       c["seed"])
        return self.loader_

    def accum_steps(self, T, B):
        pairs, world = self.cfg["batch_pairs"], self.run.world_size
        if pairs % (B * world):
            raise SystemExit(f"batch_pairs={pairs} is not a multiple of micro_batch_size*world_size = {B}*{world}")
        return pairs // (B * world)

    def describe(self, accum, max_steps):
        return (f"pairs per step: {self.cfg['batch_pairs']} = {self.cfg['micro_batch_size']} x {self.run.world_size} "
                f"ranks x {accum} accumulation steps; {max_steps:,} steps")

    def setup(self, model, tok, ckpt, max_steps, accum, init_origin):
        run, c, loader = self.run, self.cfg, self.loader_
        self.val = {"pairs": loader.val_batches("pairs", c["eval_batches"])}
        self.init_origin, self.ref_model, self.ref_logps = init_origin, None, None
        if c["dpo_reference"] == "online":
            self.ref_model = self.reference()
            return
        # the reference log-probabilities of the pairs this run reads, before its first step; NaN for the others (a
        # demo's 40 steps read a third of its train pairs). A resumed run that reads further (a raised max_steps, a
        # branch into a new out_dir) computes what the stored file lacks with the reference model, init_origin.
        path = os.path.join(c["out_dir"], "dpo_reference.pt")
        if ckpt is not None and os.path.exists(path):
            self.ref_logps = torch.load(path, map_location="cpu", weights_only=True)
            if self.ref_logps["tokenizer"] != loader.meta["tokenizer"] or \
                    self.ref_logps["train"].shape[0] != loader.n_pairs["train"]:
                raise SystemExit(f"{path} does not belong to {c['data_dir']}'s pairs: resume with the data it was made for")
        else:
            self.ref_logps = {"tokenizer": loader.meta["tokenizer"], **{
                s: torch.full((loader.n_pairs[s], 2), math.nan, dtype=torch.float64) for s in ("train", "val")}}
        steps_left = max_steps - (ckpt["step"] if ckpt is not None else 0)
        wanted = {"train": loader.pairs_ahead(steps_left * accum), "val": loader.val_pairs(c["eval_batches"])}
        missing = {s: [p for p, gone in zip(w, self.ref_logps[s][w, 0].isnan().tolist()) if gone] for s, w in wanted.items()}
        if not (missing["train"] or missing["val"]):
            return
        t0 = time.time()
        net = model.eval() if ckpt is None else self.reference()
        for split, pairs in missing.items():
            out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=run.device)
            mine = list(range(run.rank, len(pairs), run.world_size))  # each rank its share, summed across ranks (before
            with torch.no_grad():                                    # any wrapping: ranks may run unequal forwards)
                for i in range(0, len(mine), c["micro_batch_size"]):
                    rows = mine[i:i + c["micro_batch_size"]]
                    x, y, _ = loader.batch(split, [pairs[j] for j in rows])
                    with run.autocast:
                        _, lp = net(x.to(run.device), y.to(run.device), reduction="rows")
                    out[rows] = lp.view(-1, 2).double()
            self.ref_logps[split][pairs] = _sum_ranks(run, out).cpu()
        model.train()
        if run.rank == 0:
            torch.save(self.ref_logps, path)
        run.print0(f"dpo: reference log-probabilities of {len(missing['train']):,} train pairs (of "
                   f"{loader.n_pairs['train']:,}: the ones this run reads) and {len(missing['val']):,} val pairs computed"
                   f"{'' if ckpt is None else ' with ' + init_origin} and stored in {path} ({time.time() - t0:.1f} s)")

    def reference(self):
        # a frozen copy of the reference model: every step's ("online"), or the stored pass's when a resume reads further
        try:
            return open_model(self.init_origin, need_tokenizer=False).model.to(self.run.device).requires_grad_(False)
        except (ValueError, OSError) as e:
            raise SystemExit(f"{self.cfg['objective']}: the reference model {self.init_origin} cannot be loaded: {e}")

    def loss(self, model, batch, split="train"):
        # a micro-batch of pairs (rows 2i / 2i+1 chosen / rejected): the mean loss over its pairs (over the step's
        # pairs once divided by the micro steps) and the sums of PAIR_STATS and of the pairs (padding pairs have idx -1)
        x, y, idx = (t.to(self.run.device) for t in batch)
        _, lp = model(x, y, reduction="rows")
        lp = lp.view(-1, 2)  # (pairs, chosen / rejected)
        if self.ref_model is not None:
            with torch.no_grad():
                ref = self.ref_model(x, y, reduction="rows")[1].view(-1, 2)
        else:
            ref = self.ref_logps[split][idx.cpu().clamp(min=0)]
            if ref.isnan().any():  # pairs_ahead / val_pairs missed one: a bug, not a user's mistake
                raise RuntimeError(f"no stored reference log-probability for {split} pairs {idx.tolist()}")
            ref = ref.to(device=lp.device, dtype=lp.dtype)
        beta, kind = self.cfg["dpo_beta"], self.cfg["objective"]
        ratio = lp - ref  # (pairs, 2): the log-ratios of chosen and rejected
        if kind == "dpo":
            h, eps = beta * (ratio[:, 0] - ratio[:, 1]), self.cfg["dpo_label_smoothing"]
            losses = -F.logsigmoid(h) * (1 - eps) - F.logsigmoid(-h) * eps
        elif kind == "apo_zero":
            losses = 1 - torch.sigmoid(beta * ratio[:, 0]) + torch.sigmoid(beta * ratio[:, 1])
        else:  # ipo: per response token
            n = (y != -100).sum(1).view(-1, 2).clamp(min=1)
            h = ratio[:, 0] / n[:, 0] - ratio[:, 1] / n[:, 1]
            losses = (h - 1 / (2 * beta)) ** 2
        r, w = beta * ratio.detach().double(), (idx >= 0).to(device=lp.device, dtype=torch.float64)
        stats = torch.stack([(losses.detach().double() * w).sum(), (r[:, 0] * w).sum(), (r[:, 1] * w).sum(),
                             ((r[:, 0] - r[:, 1]) * w).sum(), ((r[:, 0] > r[:, 1]).double() * w).sum(), w.sum()])
        return losses.mean() / getattr(self, "n_micro", 1), stats

    def step_log(self, stats):
        stats = _sum_ranks(self.run, stats)
        return {k: (stats[i] / stats[-1]).item() for i, k in enumerate(PAIR_STATS) if i}

    @torch.no_grad()
    def validate(self, model):
        # the mean loss and rewards over the held-out pairs; no bits per byte (the loss is not a likelihood)
        model.eval()
        stats = torch.zeros(6, dtype=torch.float64, device=self.run.device)
        for batch in self.val["pairs"]:
            with self.run.autocast:
                stats += self.loss(model, batch, "val")[1]
        stats = _sum_ranks(self.run, stats)
        model.train()
        vals = {k: (stats[i] / stats[-1]).item() for i, k in enumerate(PAIR_STATS)}
        return {"pairs": (vals.pop("loss"), float("nan"))}, vals

    def state_dict(self):
        return {"init_origin": self.init_origin}


OBJECTIVES = {"pretrain": Pretrain, "sft": SFT, "dpo": Preference, "apo_zero": Preference, "ipo": Preference}
