"""
Rows packed with several documents (SFT's conversations, pretraining windows cut at <|endoftext|> with doc_masking):
attention causal within each document, without a (T, T) mask.

    docs = Documents(ids)                  # ids (B, T): each token's document number, a run of equal numbers is one
    model(x, y, positions=docs.positions(), docs=docs)

On a GPU the Triton kernel (kernels/attention.py) reads each token's document bounds and skips the tiles of other
documents; elsewhere doc_attention computes the same in PyTorch, one query tile at a time.
"""
import torch


class Documents:
    """Rows packed with several documents, from each token's document number ids (B, T): a run of equal numbers is
    one document (SFT's conversations, padding included, or pretraining windows cut at <|endoftext|>). start and end
    (B, T) int32: token i's document is [start, end). The Triton kernel reads them as they are; the PyTorch path
    (doc_attention) also needs where each query tile's keys begin, on the host: one sync per forward, shared by the
    layers."""

    def __init__(self, ids: torch.Tensor):
        B, T = ids.shape
        idx = torch.arange(T, device=ids.device).expand(B, T)
        first = torch.ones_like(ids, dtype=torch.bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        last = torch.ones_like(first)
        last[:, :-1] = first[:, 1:]
        self.start = torch.where(first, idx, 0).cummax(dim=1).values.to(torch.int32)
        self.end = torch.where(last, idx + 1, T).flip(1).cummin(dim=1).values.flip(1).to(torch.int32)
        self._tiles = {}

    def positions(self) -> torch.Tensor:
        # each token's position in its own document (B, T) int64
        return torch.arange(self.start.shape[1], device=self.start.device) - self.start.long()

    def tiles(self, rows: int):
        # [(q0, q1, k0)]: query tiles of `rows` rows and the first key any of their rows sees (the lowest document
        # start of the tile, at its first row, over the batch)
        if rows not in self._tiles:
            T = self.start.shape[1]
            k0 = self.start[:, ::rows].amin(dim=0).tolist()  # CPU-GPU sync
            self._tiles[rows] = [(q0, min(q0 + rows, T), k) for q0, k in zip(range(0, T, rows), k0)]
        return self._tiles[rows]


class _DocAttention(torch.autograd.Function):
    # softmax(q k^T / sqrt(D)) v causal within documents, q (B, H, T, D), k and v (B, Hkv, T, D), in fp32. Query tiles
    # of S rows see keys [k0, q1) only, masked by a (B, S, L) comparison of positions: the scores of one tile at a
    # time, never a (T, T) tensor (saved: q, k, v, o and the (B, H, T) log-sum-exp, as flash attention). The backward
    # recomputes each tile's probabilities from the log-sum-exp.
    @staticmethod
    def forward(ctx, q, k, v, start, tiles):
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        dtype = q.dtype
        q, k, v = q.float().reshape(B, Hkv, H // Hkv, T, D), k.float()[:, :, None], v.float()[:, :, None]
        o = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # (B, Hkv, G, T)
        for q0, q1, k0 in tiles:
            p, lse[..., q0:q1] = _tile_probs(q, k, start, q0, q1, k0, None)
            o[..., q0:q1, :] = p @ v[..., k0:q1, :]
        ctx.save_for_backward(q, k, v, o, lse, start)
        ctx.tiles, ctx.dtype = tiles, dtype
        return o.view(B, H, T, D).to(dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, start = ctx.saved_tensors
        do = do.float().view(o.shape)
        delta = (o * do).sum(-1)  # (B, Hkv, G, T)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k[:, :, 0]), torch.zeros_like(v[:, :, 0])
        scale = q.shape[-1] ** -0.5
        for q0, q1, k0 in ctx.tiles:
            p, _ = _tile_probs(q, k, start, q0, q1, k0, lse[..., q0:q1])
            dv[..., k0:q1, :] += (p.transpose(-1, -2) @ do[..., q0:q1, :]).sum(2)  # the group's heads share k, v
            ds = p * (do[..., q0:q1, :] @ v[..., k0:q1, :].transpose(-1, -2) - delta[..., q0:q1, None])
            dq[..., q0:q1, :] = ds @ k[..., k0:q1, :] * scale
            dk[..., k0:q1, :] += (ds.transpose(-1, -2) @ q[..., q0:q1, :]).sum(2) * scale
        B, Hkv, G, T, D = q.shape
        return dq.view(B, Hkv * G, T, D).to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None, None


def _tile_probs(q, k, start, q0, q1, k0, lse):
    # softmax probabilities of query rows [q0, q1) over keys [k0, q1) (B, Hkv, G, S, L), and their log-sum-exp; with
    # lse given (backward), the probabilities from it
    s = (q[..., q0:q1, :] @ k[..., k0:q1, :].transpose(-1, -2)) * q.shape[-1] ** -0.5
    i = torch.arange(q0, q1, device=q.device)[:, None]
    j = torch.arange(k0, q1, device=q.device)[None, :]
    keep = (j <= i) & (j >= start[:, q0:q1, None])  # (B, S, L): causal, and inside the query's document
    s = s.masked_fill(~keep[:, None, None], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)  # every query sees itself: finite
    return torch.exp(s - lse[..., None]), lse


def doc_attention(q, k, v, docs: Documents, rows=None):
    # the PyTorch path of packed documents (CPU, and GPUs without the Triton kernels): q (B, H, T, D), k, v
    # (B, Hkv, T, D) -> (B, H, T, D). rows: query rows per tile, by default sized so one tile's fp32 scores stay near
    # 64 MB
    B, H, T, _ = q.shape
    rows = rows or max(16, min(256, 1 << max(0, (2 ** 24 // max(1, B * H * T)).bit_length() - 1)))
    with torch.autocast(q.device.type, enabled=False):  # fp32 math whatever the autocast dtype (as SDPA's softmax)
        return _DocAttention.apply(q, k, v, docs.start, docs.tiles(rows))
