"""
SmolLM2 (a Llama-architecture decoder) in one file.

Reads bottom-up: config and presets -> RoPE -> RMSNorm -> Attention -> FeedForward -> Block -> GPT -> the fused head.
Names follow Meta's Llama code (tok_embeddings, layers, attention.wqkv, feed_forward.w13/w2, attention_norm, ffn_norm,
norm, output); formats.py translates to and from the Hugging Face and GGUF layouts. Generation (the KV cache,
sampling) is engine.py's; opening a checkpoint is checkpoint.open_model's.
References: ../shared/REFERENCE.md, nanoGPT (model owns init, optimizer groups and MFU), gpt-fast (presets).
"""
import importlib
import math
import os
import sys
import types
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from documents import Documents, doc_attention


@dataclass
class GPTConfig:
    block_size: int = 2048          # longest sequence the RoPE tables cover (the context length)
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9                 # query heads
    n_kv_head: int = 3              # key/value heads (grouped-query attention); n_head % n_kv_head == 0
    n_embd: int = 576
    intermediate_size: int = 1536   # SwiGLU hidden width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: Optional[float] = None  # None -> n_embd**-0.5, as nanotron's SmolLM2 configs
    tie_embeddings: bool = True
    bos_token_id: int = 0           # metadata carried to config.json / generation_config.json
    eos_token_id: int = 0
    # runtime switches for the Triton kernels (kernels/): None = on CUDA tensors only, True = always (CPU tensors need
    # TRITON_INTERPRET=1), False = the PyTorch reference path (SDPA for attention). One flag per op for ablations.
    triton_rmsnorm: Optional[bool] = None
    triton_rope: Optional[bool] = None
    triton_attention: Optional[bool] = None
    # forward(idx, targets) computes the loss chunk by chunk without the (B, T, vocab) logits (fused_cross_entropy) and
    # returns None for them; train.py turns it on, a plain GPT returns the logits as nanoGPT does
    fused_head: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.init_std is None:
            self.init_std = self.n_embd ** -0.5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# Pretraining shapes (context 2048, rope_theta 10000). init_std from the nanotron YAMLs (REFERENCE.md §1).
PRESETS = {
    "tiny": dict(block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160, init_std=0.02),
    "smol135m": dict(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536, init_std=1 / math.sqrt(576)),
    "smol360m": dict(n_layer=32, n_head=15, n_kv_head=5, n_embd=960, intermediate_size=2560, init_std=1 / math.sqrt(960)),
    "smol1.7b": dict(n_layer=24, n_head=32, n_kv_head=32, n_embd=2048, intermediate_size=8192, init_std=0.02),
}

# -----------------------------------------------------------------------------
# Triton kernels: imported lazily, so model.py works where triton is absent.

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The CPU's own paths where they beat the general ones there: fp32 attention in training, the C head, smaller head
# chunks. plan.py turns them off to trace a GPU's step on fake CPU tensors.
CPU_PATHS = True


# None (the default) means PyTorch everywhere for now: the kernels have run only in Triton's CPU interpreter, so on a
# GPU they are opt-in (triton_*=True) until a GPU run of their tests and benchmarks is recorded (BENCHMARKS.md, owed);
# the commit that records it flips KERNELS_BY_DEFAULT.
KERNELS_BY_DEFAULT = False


def _use_kernel(flag: Optional[bool], x: torch.Tensor) -> bool:
    if flag is False or (flag is None and not (x.is_cuda and KERNELS_BY_DEFAULT)):
        return False
    if not (x.is_cuda or _INTERPRET):
        raise RuntimeError("a triton_* switch is True but the tensors are on the CPU: set TRITON_INTERPRET=1 to run the "
                           "kernels in Triton's interpreter, or use None (PyTorch) / False")
    return True


_TRITON = None  # the kernels' module once imported: a global that torch.compile reads, never an import it traces


def triton_kernels():
    # nanosmol's Triton kernels (kernels/ops.py), imported on first use so that model.py works where triton is absent
    # (a model with a triton_* switch on imports them when built). kernels/ is a folder without __init__.py, imported
    # here under the package name "nanosmol_kernels": Python prefers an installed package to such a folder (PEP 420), so
    # `import kernels` finds Hugging Face's where it is installed (transformers >= 5.25 imports it), even in a Python
    # started in this directory
    global _TRITON
    if _TRITON is None:
        if "nanosmol_kernels" not in sys.modules:
            package = types.ModuleType("nanosmol_kernels")
            package.__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")]
            sys.modules["nanosmol_kernels"] = package
        _TRITON = importlib.import_module("nanosmol_kernels.ops")
    return _TRITON


def _cpu_kernels():
    # cpu_kernels (C, compiled on first use), or None where this machine has no C compiler: PyTorch then
    import cpu_kernels
    return cpu_kernels if cpu_kernels.available() else None


# -----------------------------------------------------------------------------
# Rotary embeddings, rotate-half layout (Hugging Face's, not Meta's interleaved pairs)


def rope_tables(block_size: int, head_dim: int, theta: float, device=None):
    # cos, sin of shape (block_size, head_dim/2), always fp32: bf16 angles lose positions past a few hundred
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    t = torch.arange(block_size, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, T, H, D); cos, sin (T, D/2), or (B, T, D/2) for per-row positions. out = cat(x1 cos - x2 sin,
    # x2 cos + x1 sin), computed in fp32
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., T, 1, D/2) broadcasts over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# -----------------------------------------------------------------------------


def rms_unscaled(x, eps):
    # x / rms(x) with the statistics in fp32, as transformers' LlamaRMSNorm; the gain multiplies after the cast back
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, use_triton: Optional[bool] = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.use_triton = use_triton

    def forward(self, x):
        if _use_kernel(self.use_triton, x):
            return triton_kernels().rms_norm(x, self.weight, self.eps)
        return self.weight * rms_unscaled(x, self.eps)


class Linear(nn.Linear):
    # nn.Linear (no bias), plus the layout CPU generation streams: while `weight_t` holds an (in, out) copy of the weight,
    # one-token steps multiply by it. A decode step reads every weight once, so its speed is memory bandwidth, and MKL's
    # fp32 matrix-vector product streams (in, out) rows faster than nn.Linear's (out, in) (the 49152x576 head: 5.3 ->
    # 3.6 ms on this project's 2-core CPU). engine.Engine makes the copies while it runs and drops them.
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        self.weight_t = None

    def reset_parameters(self):
        _init_unless_meta(self, super().reset_parameters)

    def forward(self, x):
        if self.weight_t is not None and x.shape[-2] == 1:
            if x.numel() == x.shape[-1]:  # one token of one sequence
                return x @ self.weight_t
            # one token of each of a few sequences (the engine's batched decode): W @ x^T streams the weight once in
            # MKL's fast layout for a skinny product (the 49152x576 head, 8 rows: 7.8 ms, against 17-18 ms either way
            # round with x on the left)
            return (self.weight @ x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # q, k, v in one matmul (one launch instead of three); formats.py splits it for Hugging Face
        self.wqkv = Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim)
        self.wo = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd)
        self.cfg = cfg

    def forward(self, x, cos, sin, mask=None, cache=None, docs=None):
        # mask: optional (B, T, T) bool, True where query i may see key j (eval.py's packed choices, which share a
        # context). docs: Documents, rows packed with several documents, causal within each (no (T, T) tensor).
        # cache: generation's KV cache of this layer (engine.py). It stores the new keys and values and returns all
        # those the queries see, with their mask ((B, T, L) bool, or None for plain causal attention from position 0).
        B, T, C = x.size()
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x)  # (B, T, (H + 2 Hkv) D)
        qk = qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D)  # the q and k heads side by side: rotated in one call
        v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
        if cos.dim() == 2 and _use_kernel(self.cfg.triton_rope, x):  # the kernel takes one (T, D/2) table for all rows
            qk = triton_kernels().apply_rope(qk, cos, sin)
        else:
            qk = apply_rope(qk, cos, sin)
        q, k = qk.split([H, Hkv], dim=2)  # (B, T, heads, D)

        if docs is not None and (mask is not None or cache is not None):
            raise ValueError("Attention: docs is for training's packed rows; it takes no mask or cache")
        if cache is None and mask is None and _use_kernel(self.cfg.triton_attention, x):
            # (B, T, H, D), GQA inside the kernel; with docs, causal within each document, skipping the tiles between
            y = triton_kernels().flash_attention(q, k, v, causal=True, docs=None if docs is None else (docs.start, docs.end))
        elif docs is not None:
            y = doc_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), docs).transpose(1, 2)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
            if cache is not None:
                k, v, mask = cache.update(k, v)  # (B, Hkv, L, D) each; mask (B, T, L) or None
                if T == 1:
                    # one decode step: one query per head sees every cached key. Grouping the query heads by their
                    # kv head makes GQA three small matmuls with no head repeat; SDPA's CPU flash kernel, built for
                    # long queries, was 58% of decode time in a profile on this project's loaded 2-core VM.
                    qg = q.reshape(B, Hkv, H // Hkv, D)  # (B, Hkv, group, D): q heads of a group share k and v
                    att = (qg @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D))  # (B, Hkv, group, L)
                    if mask is not None:  # rows of a batch with fewer cached tokens than the longest
                        att = att.masked_fill(~mask[:, None], float("-inf"))  # (B, 1, 1, L) over heads and group
                    y = att.float().softmax(dim=-1).to(v.dtype) @ v  # (B, Hkv, group, D)
                    return self.wo(y.reshape(B, 1, H * D))
            causal = mask is None
            mask = None if mask is None else mask[:, None]  # (B, 1, T, L): every head alike
            dt, upcast = q.dtype, nullcontext()
            training = torch.is_grad_enabled() and q.requires_grad
            if CPU_PATHS and x.device.type == "cpu" and dt != torch.float32 and training:
                # training under CPU autocast: SDPA's CPU flash backward is slower in bf16 than in fp32 (a quickstart
                # layer's: 18-20 vs 8 ms, BENCHMARKS.md; its forward alone is faster in bf16). Autocast would cast
                # the fp32 inputs straight back to bf16, so it is off for this call.
                q, k, v, upcast = q.float(), k.float(), v.float(), torch.autocast("cpu", enabled=False)
            with upcast:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != Hkv)
            y = y.to(dt).transpose(1, 2)  # (B, T, H, D)
        return self.wo(y.reshape(B, T, H * D))


class FeedForward(nn.Module):
    # SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one matmul
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w13 = Linear(cfg.n_embd, 2 * cfg.intermediate_size)
        self.w2 = Linear(cfg.intermediate_size, cfg.n_embd)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.triton_rmsnorm)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.triton_rmsnorm)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, docs=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, docs)
        return x + self.feed_forward(self.ffn_norm(x))


def _init_unless_meta(module, init):
    # PyTorch's default init, except on the meta device (a model built there to adopt a checkpoint's tensors): a meta
    # tensor has nothing to draw, and its init ops would import torch._dynamo (~2 s) into sample.py, eval.py, export.py
    if not module.weight.is_meta:
        init()


class Embedding(nn.Embedding):
    def reset_parameters(self):
        _init_unless_meta(self, super().reset_parameters)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps, config.triton_rmsnorm)
        self.output = Linear(config.n_embd, config.vocab_size)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one tensor, counted once
        self.activation_checkpointing = False  # recompute each block in backward (train.py's switch)
        if True in (config.triton_rmsnorm, config.triton_rope, config.triton_attention):
            triton_kernels()  # now, not first inside a torch.compile trace
        self.setup_rope(config.block_size, config.rope_theta)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def setup_rope(self, block_size: int, rope_theta: float):
        # (re)build the fp32 cos/sin tables: also the long-context switch (2k -> 8k context, larger theta)
        self.config.block_size, self.config.rope_theta = block_size, rope_theta
        device = self.tok_embeddings.weight.device
        device = "cpu" if device.type == "meta" else device  # a meta model's tables are rebuilt once it has weights
        cos, sin = rope_tables(block_size, self.config.head_dim, rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        # SmolLM2 / nanotron: every weight N(0, std); the projections that write into the residual stream (wo, w2)
        # get std / sqrt(2 n_layer) so the residual variance does not grow with depth (GPT-2 paper §2.3); norms 1.
        if self.config.tie_embeddings:  # to_empty() materialises the two names as two tensors: tie them again
            self.output.weight = self.tok_embeddings.weight
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        self.setup_rope(self.config.block_size, self.config.rope_theta)  # buffers were empty after to_empty()

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n

    def hidden_states(self, idx, positions=None, mask=None, cache=None, docs=None):
        # idx (B, T) -> final-normed hidden states (B, T, C). docs (B, T): the document number of each token, for rows
        # packed with several documents (a run of equal numbers is one document; or a Documents): attention is then
        # causal within each. positions (B, T): each token's position when it is not its index in the row: packed
        # documents (SFT's restart per document: Documents.positions), a mask's packed choices (mask (B, T, T) says
        # which keys each query sees), or generation's rows at their own offsets in the KV cache (cache: engine.KVCache).
        B, T = idx.size()
        docs = docs if docs is None or isinstance(docs, Documents) else Documents(docs)
        if positions is not None:
            if int(positions.max()) >= self.config.block_size:  # CPU-GPU sync
                raise ValueError(f"position {int(positions.max())} exceeds block_size={self.config.block_size}")
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, D/2)
        else:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}; "
                                 f"call model.setup_rope(block_size, rope_theta) for a longer context")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        x = self.tok_embeddings(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, docs, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, None if cache is None else cache.layer(i), docs)
        return self.norm(x)

    def forward(self, idx, targets=None, positions=None, mask=None, reduction="mean", docs=None):
        # -> (logits (B, T, vocab), the cross-entropy of targets != -100); logits are None with fused_head and targets.
        # reduction "mean" (over the targets), "sum" (0 with no target: post-training divides by the global batch's
        # count), or "rows": the summed log-probability of each row's targets (B,) (DPO), with the head applied to the
        # target positions only. positions / mask / docs: packed sequences (hidden_states).
        h = self.hidden_states(idx, positions=positions, mask=mask, docs=docs)  # (B, T, C)
        if targets is not None and reduction == "rows":
            sel = targets != -100
            logp = F.log_softmax(self.output(h[sel]).float(), dim=-1)  # (targets, vocab)
            tok_logp = logp.gather(1, targets[sel][:, None])[:, 0]
            row = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(targets)[sel]
            return None, torch.zeros(idx.shape[0], device=idx.device, dtype=torch.float32).index_add(0, row, tok_logp)
        if targets is not None and self.config.fused_head:
            return None, fused_cross_entropy(h.flatten(0, 1), self.output.weight, targets.reshape(-1), reduction=reduction)
        logits = self.output(h)  # (B, T, vocab)
        loss = None
        if targets is not None:  # fp32 softmax even under bf16 autocast
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                                   reduction=reduction)
        return logits, loss

    # ------------------------------------------------------------------ optimisation and accounting

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), eps=1e-8, device_type="cpu",
                             decay_all=False):
        # matrices and embeddings decay, norm gains do not (nanoGPT). decay_all=True reproduces nanotron's SmolLM2
        # runs, which applied weight decay to every parameter (REFERENCE.md §3).
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 or decay_all]
        no_decay = [p for p in params if not (p.dim() >= 2 or decay_all)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused AdamW: one pass per tensor instead of ~10 foreach passes, on GPUs and on CPUs (torch >= 2.4), where it
        # cut the quickstart's optimizer step 1.67 -> 0.2-0.3 s
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        # training FLOPs per token (forward + backward = 3x forward): 6 per weight of every matmul (the tied
        # output head included, the embedding lookup excluded) plus attention scores and values: 4*T*D per head per
        # layer forward, halved because causal attention computes only the lower triangle (as FlashAttention counts).
        cfg, T = self.config, seq_len or self.config.block_size
        n_matmul = self.num_params() - self.tok_embeddings.weight.numel() * (not cfg.tie_embeddings)
        n_matmul -= sum(p.numel() for n, p in self.named_parameters() if n.endswith("norm.weight"))
        attn = 3 * cfg.n_layer * cfg.n_head * 4 * T * cfg.head_dim / 2
        return 6 * n_matmul + attn

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float, seq_len: Optional[int] = None) -> float:
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    @classmethod
    def from_state_dict(cls, cfg: GPTConfig, sd: dict, device="cpu"):
        # built on the meta device and the tensors adopted, then moved: no random init that the weights would overwrite
        # (a minute of CPU time for 1.7B) and no second copy of the weights
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        model.setup_rope(cfg.block_size, cfg.rope_theta)  # the rope tables were built on meta
        return model.to(device)

    # ------------------------------------------------------------------ generation's fast path (engine.py)

    def set_decode_copies(self, on: bool):
        # the (in, out) weight copies one-token steps stream (Linear.weight_t): made only for fp32 weights on the CPU,
        # where they are faster; off drops them (they would go stale once the weights change)
        w = self.output.weight
        use = on and w.device.type == "cpu" and w.dtype == torch.float32
        for m in self.modules():
            if isinstance(m, Linear):
                m.weight_t = m.weight.t().contiguous() if use else None


# -----------------------------------------------------------------------------
# the output head and the loss in one pass (Liger's FusedLinearCrossEntropy; Wijmans et al. 2024, Cut Cross-Entropy)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    # Mean cross-entropy of h @ w^T without the (N, vocab) fp32 logits (2048 x 49152 x 4 B = 400 MB for the
    # quickstart's 8 x 256 micro-batch, 1.5 GiB for 135M's 4 x 2048): rows go through in chunks, and each chunk's
    # logits become its loss and, at once, its share of dh and dw. The gradients are made in forward (the logits exist
    # only there) and scaled by the incoming gradient in backward. On a CPU, cpu_kernels.softmax_xent_ turns a chunk's
    # logits into its loss and logit gradient in one pass; elsewhere one log_softmax (fp32, read straight from the
    # matmul's output) and one exp touch the (n, vocab) block. Everything else is (n, C) or (vocab, C) sized.
    @staticmethod
    def forward(ctx, h, w, targets, dtype, chunk, grad_enabled, reduction):
        # h (N, C), w (vocab, C), targets (N,) with -100 = no loss; matmuls in dtype, softmax and sums in fp32.
        # needs_input_grad is True for a parameter even under no_grad (evaluation): grad_enabled says whether it counts
        need_dh, need_dw = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        use_c = CPU_PATHS and h.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) \
            and _cpu_kernels() is not None
        with torch.autocast(h.device.type, enabled=False):
            wc = w.to(dtype)
            dh = torch.empty_like(h) if need_dh else None
            # dw accumulates in dtype (addmm into it: oneDNN sums each product in fp32, rounding once per chunk; bf16
            # -> fp32 conversions of a (vocab, C) block cost more than the matmul on a CPU), as Liger's does
            dw = None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.shape[0], chunk):
                hc, t = h[s:s + chunk].to(dtype), targets[s:s + chunk]
                if use_c:
                    # d(summed loss)/d(logits) = softmax - onehot(target), rounded once to dtype (as autocast's
                    # backward); ignored rows get 0, so they add nothing to dh and dw
                    g = hc @ wc.t()
                    total -= torch.ops.nanosmol.softmax_xent_(g, t).sum()
                else:
                    valid = (t != -100)[:, None]  # (n, 1)
                    tc = torch.where(valid[:, 0], t, 0)  # (n,): an ignored row points at token 0, then is masked
                    logp = torch.log_softmax(hc @ wc.t(), dim=-1, dtype=torch.float32)  # (n, vocab)
                    rows = torch.arange(len(tc), device=h.device)
                    logp_t = logp[rows, tc]  # (n,) log-probability of each target
                    total -= (logp_t * valid[:, 0]).sum()
                    if not (need_dh or need_dw):
                        continue
                    g = logp.exp_().to(dtype)  # the same gradient, in three passes over the block
                    g[rows, tc] = (logp_t.exp() - 1).to(dtype)
                    hc = hc * valid  # ignored rows: no share of dw, and (below) no dh
                if need_dh:
                    dh[s:s + chunk] = g @ wc if use_c else (g @ wc) * valid
                if need_dw:  # (vocab, C); the first chunk writes it, so it needs no zeroing
                    dw = g.t() @ hc if dw is None else dw.addmm_(g.t(), hc)
            if need_dw and dw is None:  # no rows
                dw = torch.zeros(w.shape, dtype=dtype, device=w.device)
            # mean: 0 targets -> nan, as F.cross_entropy; sum: 0, with zero gradients
            n = (targets != -100).sum() if reduction == "mean" else torch.ones((), device=h.device)
            ctx.save_for_backward(dh, dw, n)
            ctx.w_dtype = w.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad):
        dh, dw, n = ctx.saved_tensors
        scale = grad / n
        # dw: one (vocab, C) copy in fp32, scaled in place (a copy even in fp32: the saved dw stays as it is)
        return (dh * scale.to(dh.dtype) if dh is not None else None,
                dw.to(torch.float32, copy=True).mul_(scale).to(ctx.w_dtype) if dw is not None else None,
                None, None, None, None, None)


def fused_cross_entropy(h, w, targets, chunk: Optional[int] = None, reduction: str = "mean"):
    # == F.cross_entropy((h @ w.T).float(), targets, ignore_index=-100), also under autocast (matmuls in its dtype).
    # chunk: rows at a time; the default is a multiple of 16 rows (AMX tiles) whose logits take ~32M elements on a CPU
    # and 64M on a GPU. On the CPU, each chunk re-reads the (vocab, C) weight three times and rewrites dw, so larger
    # chunks are faster as long as freed memory is not handed back to the OS (train.py: cpu_kernels.keep_freed_memory):
    # the quickstart's 2048 rows in 4 chunks of 512 ran 1.2x faster than in 13 of 160 (BENCHMARKS.md)
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else w.dtype
    if chunk is None:  # as many chunks as that takes, of equal size (no last sliver), rounded up to 16 rows
        most = max(16, (1 << (25 if CPU_PATHS and h.device.type == "cpu" else 26)) // w.shape[0] // 16 * 16)
        n_chunks = max(1, math.ceil(h.shape[0] / most))
        chunk = math.ceil(h.shape[0] / n_chunks / 16) * 16 or 16
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: mean or sum")
    return _FusedLinearCrossEntropy.apply(h, w, targets, dtype, chunk, torch.is_grad_enabled(), reduction)


# -----------------------------------------------------------------------------
# the denominator of MFU

# dense bf16 tensor-core FLOP/s per GPU, from the vendors' datasheets; the first name contained in the device's wins
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12),
              ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
              ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(device_name: str) -> Optional[float]:
    # None for a device not in the table (and for CPUs): MFU is then not reported
    return next((f for k, f in PEAK_FLOPS if k in device_name), None)
