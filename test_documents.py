# documents.py: packed rows' document bounds, and attention causal within each document (the PyTorch path; the
# Triton kernel's variant: test_kernels.py) against dense masks and against each document run alone
import pytest
import torch
import torch.nn.functional as F

from documents import Documents, doc_attention
from model import GPT, GPTConfig, PRESETS


def tiny(**kw):
    return GPT(GPTConfig(**{**PRESETS["tiny"], "vocab_size": 512, **kw}))


def doc_ids(rows):
    # each row's document lengths -> (B, T) document numbers, a run per document
    return torch.tensor([sum(([d] * n for d, n in enumerate(r)), []) for r in rows])


def test_documents_bounds_and_positions():
    ids = torch.tensor([[0, 0, 0, 1, 2, 2, -1, -1], [5, 5, 5, 5, 5, 5, 5, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
    d = Documents(ids)
    assert d.start.tolist() == [[0, 0, 0, 3, 4, 4, 6, 6], [0] * 8, list(range(8))]
    assert d.end.tolist() == [[3, 3, 3, 4, 6, 6, 8, 8], [8] * 8, list(range(1, 9))]
    assert d.positions().tolist() == [[0, 1, 2, 0, 0, 1, 0, 1], list(range(8)), [0] * 8]
    # query tiles of 3 rows start at the batch's lowest document start of their first row
    assert d.tiles(3) == [(0, 3, 0), (3, 6, 0), (6, 8, 0)] and Documents(ids[::2]).tiles(3) == [(0, 3, 0), (3, 6, 3), (6, 8, 6)]


@pytest.mark.parametrize("rows", [[[1, 20, 3, 40], [64], [5] * 12 + [4]], [[64]], [[1] * 64]])
def test_packed_documents_equal_one_by_one(rows):
    # packed rows with attention and positions per document (the PyTorch path: no (T, T) tensor) against each document
    # run alone: logits, the summed loss and every gradient, fp32
    torch.manual_seed(0)
    m = tiny(block_size=64)
    B, T = len(rows), 64
    x, y = torch.randint(0, 512, (B, T)), torch.randint(0, 512, (B, T))
    ids = doc_ids(rows)
    logits, loss = m(x, y, positions=Documents(ids).positions(), docs=ids, reduction="sum")
    (loss / (B * T)).backward()
    packed = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    total = 0.0
    for b, r in enumerate(rows):
        a = 0
        for n in r:
            lg, l = m(x[b:b + 1, a:a + n], y[b:b + 1, a:a + n], reduction="sum")
            torch.testing.assert_close(logits[b:b + 1, a:a + n], lg, atol=1e-5, rtol=0)
            total = total + l
            a += n
    (total / (B * T)).backward()
    torch.testing.assert_close(loss, total, atol=1e-5 * B * T, rtol=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, atol=1e-5, rtol=0, msg=lambda msg: f"{n}: {msg}")


@pytest.mark.parametrize("rows", [16, 48, None])
def test_doc_attention_equals_a_dense_mask_in_every_tiling(rows):
    # GQA, fp32, forward and backward, against SDPA with the (B, T, T) mask: tiles of 16 and 48 query rows split
    # documents (T = 100 is no multiple of either); None: the default tiling (one tile here)
    torch.manual_seed(0)
    lengths = [[1, 1, 30, 17, 51], [100], [7] * 14 + [2]]
    ids = doc_ids(lengths)
    B, T, H, Hkv, D = 3, 100, 4, 2, 16
    q = torch.randn(B, H, T, D, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, D, requires_grad=True) for _ in range(2))
    o = doc_attention(q, k, v, Documents(ids), rows=rows)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), do)
    mask = torch.ones(T, T, dtype=torch.bool).tril() & (ids[:, :, None] == ids[:, None, :])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    g_ref = torch.autograd.grad(ref, (q, k, v), do)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip("qkv", g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_doc_attention_keeps_bf16_inputs_and_computes_in_fp32():
    torch.manual_seed(0)
    ids = torch.tensor([[0] * 9 + [1] * 23])
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = doc_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), Documents(ids))
    ref = doc_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), Documents(ids))
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), ref, atol=1e-2, rtol=0)
