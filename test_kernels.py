# Tests of kernels/ (Triton RMSNorm, RoPE, attention) against plain PyTorch references written inline below.
# Without a GPU, conftest.py sets TRITON_INTERPRET=1 and the kernels run in Triton's interpreter on CPU tensors: fp32
# (and fp16) on small odd shapes, forward and backward. Every kernel call is checked to have launched Triton (the launch
# counter moved) with the PyTorch functions a fallback would use patched to raise, so a silent fallback fails.
# The GPU tests (skipped without CUDA) cover bf16/fp16/fp32 on SmolLM2's shapes with flash-attention's tolerance rule,
# bitwise determinism, torch.compile(fullgraph=True) and a 50-step kernels-on/off training comparison.
import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from model import triton_kernels

kernels = triton_kernels()  # kernels/ops.py, the package nanosmol_kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = pytest.mark.skipif(not kernels.available(), reason="Triton cannot run here (no triton, or no GPU and "
                                                                 "TRITON_INTERPRET unset before import)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------- inline references
def rms_norm_ref(x, w, eps):
    # model.py's RMSNorm / transformers' LlamaRMSNorm: fp32 statistics, the weight multiplies after the cast back
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (w * xf.to(x.dtype)).to(x.dtype)


def rope_ref(x, cos, sin, upcast=True):
    # rotate-half (transformers' apply_rotary_pos_emb): out = cat(x1 cos - x2 sin, x2 cos + x1 sin)
    d = x.shape[-1] // 2
    xc = x.float() if upcast else x
    x1, x2 = xc[..., :d], xc[..., d:]
    c, s = cos[:, None, :].to(xc.dtype), sin[:, None, :].to(xc.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def attention_ref(q, k, v, causal=True, upcast=True):
    # softmax(q k^T / sqrt(D)) v with kv heads repeated for GQA; causal mask aligned bottom-right (j <= i + Tk - Tq).
    # upcast=False keeps the computation in the input dtype: the "same-precision PyTorch" of flash-attention's rule.
    H, Hkv, Tq, Tk = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    dt = torch.float32 if upcast else q.dtype
    q, k, v = q.to(dt), k.repeat_interleave(H // Hkv, 2).to(dt), v.repeat_interleave(H // Hkv, 2).to(dt)
    s = torch.einsum("bihd,bjhd->bhij", q / math.sqrt(q.shape[-1]), k)
    if causal:
        s = s.masked_fill(~torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)


@contextlib.contextmanager
def triton_only(*names):
    # Fails unless every named kernel launched inside the block, and makes the PyTorch routes a fallback would take
    # raise. The references above are only ever called outside this block.
    before = dict(kernels.launches)
    patched = {(torch, "rsqrt"), (F, "scaled_dot_product_attention"), (F, "rms_norm"), (torch, "einsum"),
               (torch.Tensor, "softmax"), (torch, "softmax"), (torch, "cat")}
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in patched]

    def boom(*a, **k):
        raise AssertionError("a PyTorch fallback ran inside a kernel call")
    try:
        for obj, attr, _ in saved:
            setattr(obj, attr, boom)
        yield
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
    for name in names:
        assert kernels.launches[name] > before.get(name, 0), f"Triton kernel {name} did not launch"


def grads(out, inputs, dy):
    return torch.autograd.grad(out, inputs, dy)


def leaf(*shape, dtype=torch.float32, device=DEV, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()


def rope_tables(T, D, theta=10000.0, device=DEV):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, device=device).float() / D)
    f = torch.outer(torch.arange(T, device=device).float(), inv)
    return f.cos(), f.sin()


FP32 = dict(atol=2e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- CPU / anywhere
def test_available_and_interpreter():
    assert kernels.available()
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest.py; CPU runs go through Triton's interpreter


@pytest.mark.parametrize("shape", [(2, 17, 576), (1, 1, 123), (3, 64, 123), (37, 576), (1, 9, 960), (2, 5, 2048)])
def test_rms_norm_fp32(shape):
    x, w = leaf(*shape), leaf(shape[-1], scale=0.5)
    with torch.no_grad():
        w += 1.0
    dy = torch.randn(shape, device=DEV)
    with triton_only("rms_norm_fwd", "rms_norm_bwd"):
        y = kernels.rms_norm(x, w, 1e-5)
        dx, dw = grads(y, (x, w), dy)
    y_ref = rms_norm_ref(x, w, 1e-5)
    dx_ref, dw_ref = grads(y_ref, (x, w), dy)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(dx, dx_ref, **FP32)
    torch.testing.assert_close(dw, dw_ref, atol=1e-4, rtol=1e-5)  # a sum over up to 192 rows


def test_rms_norm_fp16_and_expanded_grad():
    # fp16 activations with an fp32 weight (model.py under autocast keeps fp32 weights); y.sum() gives a stride-0 grad
    x, w = leaf(2, 17, 576, dtype=torch.float16), leaf(576)
    with triton_only("rms_norm_fwd", "rms_norm_bwd"):
        y = kernels.rms_norm(x, w, 1e-5)
        dx, dw = torch.autograd.grad(y.float().sum(), (x, w))
    y_ref = rms_norm_ref(x.float(), w, 1e-5)
    dx_ref, dw_ref = torch.autograd.grad(y_ref.sum(), (x, w))
    assert y.dtype == torch.float16 and dx.dtype == torch.float16 and dw.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, atol=4e-3, rtol=2e-3)
    torch.testing.assert_close(dx.float(), dx_ref.float(), atol=4e-3, rtol=2e-3)
    torch.testing.assert_close(dw, dw_ref, atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("B,T,H,D", [(2, 17, 9, 64), (1, 1, 3, 64), (2, 64, 4, 64), (1, 17, 2, 128), (1, 5, 1, 6)])
def test_rope_fp32(B, T, H, D):
    x = leaf(B, T, H, D)
    cos, sin = rope_tables(T, D)
    dy = torch.randn(B, T, H, D, device=DEV)
    with triton_only("rope_fwd", "rope_bwd"):
        y = kernels.apply_rope(x, cos, sin)
        (dx,) = grads(y, (x,), dy)
    y_ref = rope_ref(x, cos, sin)
    (dx_ref,) = grads(y_ref, (x,), dy)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx, dx_ref, atol=1e-6, rtol=1e-6)


def test_rope_strided_view_fp16():
    # q and k as model.py makes them: views into one fused qkv projection (B, T, (H + 2 Hkv) D), not contiguous
    B, T, H, Hkv, D = 2, 17, 9, 3, 64
    qkv = leaf(B, T, (H + 2 * Hkv) * D, dtype=torch.float16)
    q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k = q.view(B, T, H, D), k.view(B, T, Hkv, D)
    assert not q.is_contiguous()
    cos, sin = rope_tables(T, D)
    with triton_only("rope_fwd", "rope_bwd"):
        out = torch.stack([kernels.apply_rope(q, cos, sin).sum(), kernels.apply_rope(k, cos, sin).float().square().sum()])
        (g,) = torch.autograd.grad(out.float().sum(), (qkv,))
    ref = torch.stack([rope_ref(q, cos, sin).sum(), rope_ref(k, cos, sin).float().square().sum()])
    (g_ref,) = torch.autograd.grad(ref.float().sum(), (qkv,))
    torch.testing.assert_close(out.float(), ref.float(), atol=0.5, rtol=2e-3)
    torch.testing.assert_close(g.float(), g_ref.float(), atol=2e-3, rtol=2e-3)
    assert (g[..., (H + Hkv) * D:] == 0).all()  # v got no gradient


ATTN_CASES = [(B, T, H, Hkv, 64) for (H, Hkv) in [(9, 3), (4, 1), (2, 2)] for (B, T) in [(2, 1), (1, 17), (2, 64)]]


@pytest.mark.parametrize("B,T,H,Hkv,D", ATTN_CASES + [(1, 33, 2, 1, 128), (2, 23, 4, 2, 16), (3, 113, 1, 1, 64),
                                                      (1, 17, 15, 5, 64)])
def test_attention_fp32(B, T, H, Hkv, D):
    q, k, v = leaf(B, T, H, D), leaf(B, T, Hkv, D), leaf(B, T, Hkv, D)
    do = torch.randn(B, T, H, D, device=DEV)
    with triton_only("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        o = kernels.flash_attention(q, k, v, causal=True)
        g = grads(o, (q, k, v), do)
    o_ref = attention_ref(q, k, v)
    g_ref = grads(o_ref, (q, k, v), do)
    assert o.shape == (B, T, H, D) and o.dtype == q.dtype
    torch.testing.assert_close(o, o_ref, **FP32)
    for name, a, b in zip("qkv", g, g_ref):
        torch.testing.assert_close(a, b, **FP32, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("Tq,Tk,causal", [(17, 17, False), (1, 17, True), (5, 40, True), (40, 9, False)])
def test_attention_noncausal_and_kv_longer(Tq, Tk, causal):
    # non-causal, and Tq < Tk with the bottom-right causal mask (a chunk of new queries after a cached prefix)
    q, k, v = leaf(2, Tq, 4, 64), leaf(2, Tk, 2, 64), leaf(2, Tk, 2, 64)
    do = torch.randn(2, Tq, 4, 64, device=DEV)
    with triton_only("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        o = kernels.flash_attention(q, k, v, causal=causal)
        g = grads(o, (q, k, v), do)
    o_ref = attention_ref(q, k, v, causal=causal)
    g_ref = grads(o_ref, (q, k, v), do)
    torch.testing.assert_close(o, o_ref, **FP32)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **FP32)


def doc_bounds(rows):
    # rows: each row's document lengths -> (start, end) (B, T) int32, the kernel's docs argument
    B, T = len(rows), sum(rows[0])
    start, end = torch.zeros(B, T, dtype=torch.int32), torch.zeros(B, T, dtype=torch.int32)
    for b, lengths in enumerate(rows):
        a = 0
        for n in lengths:
            start[b, a:a + n], end[b, a:a + n] = a, a + n
            a += n
    return start.to(DEV), end.to(DEV)


def doc_attention_ref(q, k, v, rows, **kw):
    # each document on its own through attention_ref (causal), written back into its place
    out = torch.zeros_like(q, dtype=torch.float32 if kw.get("upcast", True) else q.dtype)
    for b, lengths in enumerate(rows):
        a = 0
        for n in lengths:
            out[b:b + 1, a:a + n] = attention_ref(q[b:b + 1, a:a + n], k[b:b + 1, a:a + n], v[b:b + 1, a:a + n], **kw)
            a += n
    return out


# documents of length 1, documents across tile edges (the interpreter's tiles are 16 and 32 rows), one document per
# row, many tiny documents, and a tail shorter than a tile
DOC_ROWS = {
    "ones_and_crossing": [[1, 1, 5, 30, 1, 20, 3], [61], [1] * 61],
    "one_document": [[64], [64]],
    "tiny": [[2, 1, 3] * 11 + [1]],
    "edges": [[16, 16, 32, 1, 15], [31, 2, 31, 16]],
}


@pytest.mark.parametrize("name", list(DOC_ROWS))
@pytest.mark.parametrize("H,Hkv,D", [(4, 2, 16), (3, 1, 32), (2, 2, 64)])
def test_attention_documents_fp32(name, H, Hkv, D):
    rows = DOC_ROWS[name]
    B, T = len(rows), sum(rows[0])
    q, k, v = leaf(B, T, H, D), leaf(B, T, Hkv, D), leaf(B, T, Hkv, D)
    do = torch.randn(B, T, H, D, device=DEV)
    with triton_only("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        o = kernels.flash_attention(q, k, v, docs=doc_bounds(rows))
        g = grads(o, (q, k, v), do)
    o_ref = doc_attention_ref(q, k, v, rows)
    g_ref = grads(o_ref, (q, k, v), do)
    torch.testing.assert_close(o, o_ref, **FP32)
    for name, a, b in zip("qkv", g, g_ref):
        torch.testing.assert_close(a, b, **FP32, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("poisoned", ["first", "second"])
def test_attention_documents_skip_other_documents_tiles(poisoned):
    # one document's tensors are NaN: the other's outputs and gradients stay exact, so no tile of the poisoned one was
    # read for them (a masked tile would still multiply NaN by 0). NaN keys and values of the first document test the
    # forward and dQ (query blocks start at their document); NaN queries and output gradients of the second, dK/dV
    # (key blocks stop at their document's end). Both documents are whole tiles of the interpreter's 16/32-row blocks.
    B, T, H, Hkv, D = 1, 64, 2, 1, 16
    q, k, v = leaf(B, T, H, D), leaf(B, T, Hkv, D), leaf(B, T, Hkv, D)
    do = torch.randn(B, T, H, D, device=DEV)
    bad, good = (slice(0, 32), slice(32, 64)) if poisoned == "first" else (slice(32, 64), slice(0, 32))
    with torch.no_grad():
        for t in (k, v) if poisoned == "first" else (q, do):
            t[:, bad] = float("nan")
    o = kernels.flash_attention(q, k, v, docs=doc_bounds([[32, 32]]))
    g = grads(o, (q, k, v), do)
    o_ref = attention_ref(q[:, good], k[:, good], v[:, good])
    g_ref = grads(o_ref, (q, k, v), do[:, good])
    torch.testing.assert_close(o[:, good], o_ref, **FP32)
    assert o[:, bad].isnan().all()
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a[:, good], b[:, good], **FP32)


def test_attention_documents_fp16_flash_rule():
    rows = DOC_ROWS["ones_and_crossing"]
    B, T, H, Hkv, D = len(rows), sum(rows[0]), 4, 2, 64
    q, k, v = (leaf(*s, dtype=torch.float16) for s in [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D)])
    do = torch.randn(B, T, H, D, device=DEV).half()
    o = kernels.flash_attention(q, k, v, docs=doc_bounds(rows))
    g = grads(o, (q, k, v), do)
    o_ref, o_lp = doc_attention_ref(q, k, v, rows), doc_attention_ref(q, k, v, rows, upcast=False)
    g_ref, g_lp = grads(o_ref, (q, k, v), do.float()), grads(o_lp, (q, k, v), do)
    assert_flash_rule("o", o, o_lp, o_ref, 2.0)
    for name, a, lp, ref in zip("qkv", g, g_lp, g_ref):
        assert_flash_rule("d" + name, a, lp, ref, 3.0)


def test_attention_fused_qkv_view_and_expanded_grad():
    # q, k, v as strided views of one projection, and the stride-0 upstream grad of o.sum()
    B, T, H, Hkv, D = 2, 23, 4, 2, 64
    qkv = leaf(B, T, (H + 2 * Hkv) * D)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    with triton_only("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        o = kernels.flash_attention(q, k, v)
        (g,) = torch.autograd.grad(o.sum(), (qkv,))
    o_ref = attention_ref(q, k, v)
    (g_ref,) = torch.autograd.grad(o_ref.sum(), (qkv,))
    torch.testing.assert_close(o, o_ref, **FP32)
    torch.testing.assert_close(g, g_ref, **FP32)


def test_attention_fp16_flash_rule():
    # fp16 in the interpreter (bf16 arithmetic is wrong there): kernel error vs the fp32 reference within 2x (output)
    # or 3x (grads) the error of the same computation done by PyTorch in fp16, plus a small floor
    B, T, H, Hkv, D = 1, 33, 4, 2, 64
    q, k, v = (leaf(*s, dtype=torch.float16) for s in [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D)])
    do = torch.randn(B, T, H, D, device=DEV).half()
    with triton_only("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        o = kernels.flash_attention(q, k, v)
        g = grads(o, (q, k, v), do)
    assert o.dtype == torch.float16 and all(t.dtype == torch.float16 for t in g)
    o_ref, o_lp = attention_ref(q, k, v), attention_ref(q, k, v, upcast=False)
    g_ref, g_lp = grads(o_ref, (q, k, v), do.float()), grads(o_lp, (q, k, v), do)
    assert_flash_rule("o", o, o_lp, o_ref, 2.0)
    for name, a, lp, ref in zip("qkv", g, g_lp, g_ref):
        assert_flash_rule("d" + name, a, lp, ref, 3.0)


def assert_flash_rule(name, out, out_lowp, out_ref, factor, floor=1e-3):
    err = (out.float() - out_ref.float()).abs().max().item()
    err_lp = (out_lowp.float() - out_ref.float()).abs().max().item()
    scale = out_ref.float().abs().max().item()
    assert err <= factor * err_lp + floor * max(scale, 1e-2), \
        f"{name}: kernel error {err:.3e} > {factor} x PyTorch low-precision error {err_lp:.3e} + floor ({scale=:.3e})"


@cuda
def test_backward_is_deterministic():
    # no atomics: two backward passes give bitwise-equal gradients (GQA group of 3 summed inside one program). On a GPU
    # only: the interpreter runs programs one after another, so it could not see a race. Without a GPU,
    # test_kernels_aot.py checks the compiled PTX of every kernel for atomic instructions instead.
    q, k, v = leaf(1, 40, 6, 64), leaf(1, 40, 2, 64), leaf(1, 40, 2, 64)
    x, w = leaf(2, 40, 123), leaf(123)
    do, dy = torch.randn(1, 40, 6, 64, device=DEV), torch.randn(2, 40, 123, device=DEV)
    runs = []
    for _ in range(2):
        runs.append(grads(kernels.flash_attention(q, k, v), (q, k, v), do) + grads(kernels.rms_norm(x, w, 1e-5), (x, w), dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_errors_are_clear():
    x = torch.randn(2, 3, 8, device=DEV)
    with pytest.raises(ValueError, match="agree on C"):
        kernels.rms_norm(x, torch.ones(7, device=DEV), 1e-5)
    q = torch.randn(1, 4, 4, 64, device=DEV)
    cos, sin = rope_tables(5, 64)
    with pytest.raises(ValueError, match=r"\(T, D/2\)"):
        kernels.apply_rope(q, cos, sin)
    with pytest.raises(ValueError, match="must be even"):
        kernels.apply_rope(torch.randn(1, 4, 2, 7, device=DEV), *rope_tables(4, 6))
    kv = torch.randn(1, 4, 3, 64, device=DEV)
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        kernels.flash_attention(q, kv, kv)
    with pytest.raises(ValueError, match="k and v must be"):
        kernels.flash_attention(q, torch.randn(1, 4, 2, 64, device=DEV), torch.randn(1, 5, 2, 64, device=DEV))
    q80 = torch.randn(1, 4, 2, 80, device=DEV)
    with pytest.raises(ValueError, match="head_dim 80 is not supported"):
        kernels.flash_attention(q80, q80, q80)
    with pytest.raises(ValueError, match="at least as many keys"):
        kernels.flash_attention(q, q[:, :2], q[:, :2])
    with pytest.raises(TypeError, match="one dtype"):
        kernels.flash_attention(q, q.half(), q.half())
    start, end = doc_bounds([[2, 2]])
    with pytest.raises(ValueError, match="docs need causal attention"):
        kernels.flash_attention(q, q, q, causal=False, docs=(start, end))
    with pytest.raises(ValueError, match=r"docs must be \(start, end\), each \(1, 4\) int32"):
        kernels.flash_attention(q, q, q, docs=(start.long(), end.long()))


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(kernels.utils, "INTERPRET", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)


def test_kernels_folder_never_shadows_hugging_faces_kernels_package(tmp_path):
    # transformers >= 5.25 imports Hugging Face's `kernels` package; a Python started in the repo root (a notebook in
    # the checkout) has this folder on its path first. kernels/ has no __init__.py, so an installed package of that name
    # wins (PEP 420), and nanosmol imports its own as nanosmol_kernels. Here a stand-in for the installed package:
    import subprocess
    import sys
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'hugging face'\n")
    root = os.path.dirname(os.path.abspath(__file__))
    code = ("from kernels import CUDAProperties; assert CUDAProperties == 'hugging face'\n"
            "from model import triton_kernels; k = triton_kernels()\n"
            "assert k.__name__ == 'nanosmol_kernels.ops' and callable(k.rms_norm) and k.attention.FWD_CONFIGS\n"
            "print('both')")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "both", r.stderr[-2000:]
    # and without an installed package of that name, `import kernels` in the repo root is this folder, a namespace
    import importlib.metadata
    try:
        importlib.metadata.distribution("kernels")
        return  # Hugging Face's is installed in this environment: it is what `import kernels` finds, as it should
    except importlib.metadata.PackageNotFoundError:
        pass
    r = subprocess.run([sys.executable, "-c", "import kernels; print(list(kernels.__path__))"], cwd=root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and os.path.join(root, "kernels") in r.stdout, r.stderr


def test_transformers_llama_loads_from_the_repo_root():
    # where transformers is installed (a researcher's usual venv; not in CI), its Llama code imports from the repo root
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed here")
    r = subprocess.run([sys.executable, "-c", "import transformers.models.llama.modeling_llama"],
                       cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
def test_bench_script_exits_cleanly_without_gpu():
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "bench/kernels.py"], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert r.returncode == 0 and "needs a CUDA GPU" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_gpu_script_dry_run_resolves_every_step(tmp_path):
    # bench/gpu.sh (the owed GPU runs) on this CPU machine: every step is listed with its command and skipped with the
    # reason, and the CPU-runnable parts (pytest collection, bench/kernels.py's interpreter dry run, bench/packed.py at a
    # tiny size, bench/train.py's DDP and FSDP2 wrapping on 2 gloo processes) run, so the first GPU machine's minutes go
    # to measuring
    import subprocess
    out = tmp_path / "gpu.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OUT"] = str(out)
    r = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.abspath(__file__)), timeout=600)
    text = out.read_text()
    assert r.returncode == 0 and "all steps completed" in text and "FAILED" not in text, text + r.stderr
    for section in ("Kernel tests on the GPU", "Kernels vs PyTorch", "Packed documents", "Training step",
                    "train.py --compile=True vs eager", "Memory plan vs measured peak", "ddp on", "fsdp on"):
        assert f"### {section}" in text
    assert text.count("skipped: dry run") == 8
    for ran in ("test_kernels.py: collected", "bench/kernels.py --dry_run=1", "bench/packed.py --part=attention",
                "plan.py configs/quickstart.py --device=cpu --measure: ran on CPU",
                "--parallel=ddp: 2 CPU processes", "--parallel=fsdp: 2 CPU processes"):
        assert ran in text
    r = subprocess.run(["bash", "bench/gpu.sh"], capture_output=True, text=True, env=env, timeout=60,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 1 and "no CUDA GPU" in r.stderr and "--dry-run" in r.stderr


def _tiny_model_config(**kw):
    from model import PRESETS, GPTConfig
    # the tiny preset, widened to head_dim 64 (SmolLM2's) with GQA 2:1, short enough for the interpreter
    cfg = dict(PRESETS["tiny"], vocab_size=97, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=128,
               intermediate_size=96)
    cfg.update(kw)
    return GPTConfig(**cfg)


@pytest.mark.parametrize("packed", [False, True])
def test_tiny_model_kernels_on_equals_off(packed):
    # packed: rows of several documents, the kernel's docs variant against documents.py's PyTorch doc_attention
    from model import GPT
    on = {"triton_rmsnorm": True, "triton_rope": True, "triton_attention": True}
    off = {k: False for k in on}
    torch.manual_seed(0)
    m_off = GPT(_tiny_model_config(**off)).to(DEV)
    m_on = GPT(_tiny_model_config(**on)).to(DEV)
    m_on.load_state_dict(m_off.state_dict())
    idx = torch.randint(0, 97, (2, 19), device=DEV)
    tgt = torch.randint(0, 97, (2, 19), device=DEV)
    tgt[0, :3] = -100
    docs = torch.tensor([[0] * 5 + [1] * 14, [0] + [1] * 16 + [2, 3]], device=DEV) if packed else None
    logits_off, loss_off = m_off(idx, tgt, docs=docs)
    loss_off.backward()
    with triton_only("rms_norm_fwd", "rms_norm_bwd", "rope_fwd", "rope_bwd", "attention_fwd", "attention_bwd_dkdv",
                     "attention_bwd_dq"):
        # model.py's own PyTorch paths would run torch.rsqrt / SDPA / torch.cat: patched to raise in here
        logits_on, loss_on = m_on(idx, tgt, docs=docs)
        loss_on.backward()
    torch.testing.assert_close(logits_on, logits_off, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-6)
    p_off = dict(m_off.named_parameters())
    for name, p in m_on.named_parameters():
        torch.testing.assert_close(p.grad, p_off[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("packed", [False, True])
def test_tiny_model_compile_fullgraph_traces_kernels(packed):
    # Dynamo half of torch.compile(fullgraph=True) on CPU: model.py and the kernels' Python wrappers trace without a
    # graph break, and the ops (shape-propagated with fake tensors) run as Triton kernels in the compiled graph. The
    # Inductor half (which traces into the kernels) needs a GPU: test_gpu_compile_fullgraph.
    from model import GPT
    torch._dynamo.reset()
    m = GPT(_tiny_model_config(triton_rmsnorm=True, triton_rope=True, triton_attention=True)).to(DEV)
    idx = torch.randint(0, 97, (1, 17), device=DEV)
    docs = torch.tensor([[0] * 9 + [1] * 8], device=DEV) if packed else None  # the document bounds trace too
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with triton_only("rms_norm_fwd", "rms_norm_bwd", "rope_fwd", "rope_bwd", "attention_fwd", "attention_bwd_dq"):
        logits_c, loss_c = compiled(idx, idx, docs=docs)
        loss_c.backward()
    g_c = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    logits, loss = m(idx, idx, docs=docs)
    loss.backward()
    torch.testing.assert_close(logits_c, logits, atol=0, rtol=0)
    for n, p in m.named_parameters():
        torch.testing.assert_close(g_c[n], p.grad, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------- GPU only
SMOL_SHAPES = [(576, 9, 3), (960, 15, 5), (2048, 32, 32)]  # hidden, q heads, kv heads (head_dim 64)
LOWP = [torch.bfloat16, torch.float16]


@cuda
@pytest.mark.parametrize("dtype", LOWP + [torch.float32])
@pytest.mark.parametrize("hidden", [576, 960, 2048])
def test_gpu_rms_norm(hidden, dtype):
    x, w = leaf(4, 2048, hidden, dtype=dtype), leaf(hidden, dtype=torch.float32)
    dy = torch.randn(4, 2048, hidden, device=DEV).to(dtype)
    with triton_only("rms_norm_fwd", "rms_norm_bwd"):
        y = kernels.rms_norm(x, w, 1e-5)
        g = grads(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = rms_norm_ref(x64, w64, 1e-5)
    g_ref = grads(y_ref, (x64, w64), dy.double())
    y_lp = rms_norm_ref(x, w, 1e-5)  # the PyTorch module in the same precision
    g_lp = grads(y_lp, (x, w), dy)
    assert_flash_rule("y", y, y_lp, y_ref, 2.0, floor=1e-5)
    for name, a, lp, ref in zip(["dx", "dw"], g, g_lp, g_ref):
        assert_flash_rule(name, a, lp, ref, 3.0, floor=1e-5)


@cuda
@pytest.mark.parametrize("dtype", LOWP + [torch.float32])
@pytest.mark.parametrize("hidden,H,Hkv", SMOL_SHAPES)
def test_gpu_rope(hidden, H, Hkv, dtype):
    x = leaf(4, 2048, H, 64, dtype=dtype)
    cos, sin = rope_tables(2048, 64)
    dy = torch.randn_like(x)
    y = kernels.apply_rope(x, cos, sin)
    (dx,) = grads(y, (x,), dy)
    # fp32 math, one rounding: the same as model.py's apply_rope bit for bit except for fma contraction
    y_ref = rope_ref(x, cos, sin)
    (dx_ref,) = grads(y_ref, (x,), dy)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)


@cuda
@pytest.mark.parametrize("dtype", LOWP + [torch.float32])
@pytest.mark.parametrize("T", [113, 1023, 2048])
@pytest.mark.parametrize("H,Hkv,D", [(H, Hkv, 64) for _, H, Hkv in SMOL_SHAPES] + [(8, 2, 128)])
def test_gpu_attention(H, Hkv, D, T, dtype):
    B = 1 if T == 2048 else 2
    q, k, v = leaf(B, T, H, D, dtype=dtype), leaf(B, T, Hkv, D, dtype=dtype), leaf(B, T, Hkv, D, dtype=dtype)
    do = torch.randn(B, T, H, D, device=DEV).to(dtype)
    with triton_only("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        o = kernels.flash_attention(q, k, v)
        g = grads(o, (q, k, v), do)
    o_ref = attention_ref(q, k, v)
    g_ref = grads(o_ref, (q, k, v), do.float())
    if dtype == torch.float32:  # ieee dots: tight
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        return
    o_lp = attention_ref(q, k, v, upcast=False)
    g_lp = grads(o_lp, (q, k, v), do)
    assert_flash_rule("o", o, o_lp, o_ref, 2.0)
    for name, a, lp, ref in zip("qkv", g, g_lp, g_ref):
        assert_flash_rule("d" + name, a, lp, ref, 3.0)


@cuda
@pytest.mark.parametrize("dtype", LOWP)
def test_gpu_determinism(dtype):
    q, k, v = leaf(2, 2048, 9, 64, dtype=dtype), leaf(2, 2048, 3, 64, dtype=dtype), leaf(2, 2048, 3, 64, dtype=dtype)
    x, w = leaf(8, 2048, 576, dtype=dtype), leaf(576)
    cos, sin = rope_tables(2048, 64)
    do, dy = torch.randn_like(q), torch.randn_like(x)
    runs = []
    for _ in range(3):
        qr = kernels.apply_rope(q, cos, sin)
        runs.append(grads(kernels.flash_attention(qr, k, v), (q, k, v), do) + grads(kernels.rms_norm(x, w, 1e-5), (x, w), dy))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def _smol_mini_config(**kw):
    from model import GPTConfig
    # SmolLM2-135M's widths (576, 9/3 heads, head_dim 64, ffn 1536), 4 layers, a small vocab: minutes of GPU at most
    return GPTConfig(**dict(block_size=256, vocab_size=4096, n_layer=4, n_head=9, n_kv_head=3, n_embd=576,
                            intermediate_size=1536, init_std=576 ** -0.5), **kw)


@cuda
def test_gpu_compile_fullgraph():
    from model import GPT
    torch.manual_seed(0)
    on = dict(triton_rmsnorm=True, triton_rope=True, triton_attention=True)
    model = GPT(_smol_mini_config(**on)).to(DEV)
    idx = torch.randint(0, 4096, (4, 256), device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss_eager = model(idx, idx)
    loss_eager.backward()
    g_eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss_c = compiled(idx, idx)
    loss_c.backward()
    # Inductor fuses the surrounding bf16 ops differently from eager: compare in norm, not elementwise
    torch.testing.assert_close(loss_c, loss_eager, atol=2e-2, rtol=1e-2)
    for n, p in model.named_parameters():
        rel = ((p.grad.float() - g_eager[n].float()).norm() / g_eager[n].float().norm()).item()
        assert rel < 2e-2, f"{n}: compiled grad differs from eager by {rel:.2e} (relative L2)"


@cuda
def test_gpu_mini_model_loss_curves_match():
    # 50 AdamW steps, bf16 autocast, on a fixed learnable stream (8 batches of repeated random motifs, cycled): the
    # kernels-on loss curve must track the PyTorch one. bf16 rounding differs between the paths, and differences
    # compound over steps, so the bound is loose; a wrong gradient blows through it within a few steps.
    from model import GPT
    g = torch.Generator().manual_seed(1)
    motifs = torch.randint(0, 4096, (16, 32), generator=g)
    data = motifs[torch.randint(0, 16, (8, 8, 8), generator=g)].view(8, 8, 256).to(DEV)  # 8 batches (8, 256)
    curves = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = GPT(_smol_mini_config(triton_rmsnorm=flag, triton_rope=flag, triton_attention=flag)).to(DEV)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
        losses = []
        for step in range(50):
            x = data[step % 8]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[flag] = torch.tensor(losses)
    diff = (curves[True] - curves[False]).abs()
    assert curves[False][-5:].mean() < curves[False][:5].mean() - 1.0, "the reference did not learn: test is void"
    assert diff[:10].max() < 0.02 and diff.max() < 0.1 and diff.mean() < 0.03, \
        f"loss curves diverge: max {diff.max():.4f}, mean {diff.mean():.4f}\n{curves}"
