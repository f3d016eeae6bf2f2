# Rotary position embedding, rotate-half (Hugging Face / Llama) layout: with x1, x2 the two halves of head_dim,
#   out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin),   cos, sin (T, D/2) fp32.
# Design (KERNELS.md, after Liger): one program rotates all heads of BLOCK_T tokens, so cos/sin are read once per
# token; math in fp32, one rounding to x's dtype. The backward is the same kernel with -sin (a rotation's transpose).
# x may be a strided view (e.g. q or k sliced out of a fused qkv projection): any b/t/h strides, unit stride in d.
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .utils import INTERPRET, check_device, launch


@triton.jit
def _rope_kernel(X, COS, SIN, Y, n_tokens, T, H, stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh,
                 stride_cos, stride_sin, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    """y1 = x1*cos - s*x2*sin, y2 = x2*cos + s*x1*sin with s = -1 for INVERSE (the backward), over a (BLOCK_T tokens,
    BLOCK_H heads, HALF) tile; tokens are the flattened (b, t) pairs of X (B, T, H, 2*HALF)."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = (tok // T).to(tl.int64)
    t = tok % T
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    tok_ok = tok < n_tokens
    cs_mask = tok_ok[:, None] & (d[None, :] < HALF)
    cos = tl.load(COS + t[:, None] * stride_cos + d[None, :], mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    sin = tl.load(SIN + t[:, None] * stride_sin + d[None, :], mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    if INVERSE:
        sin = -sin
    mask = cs_mask[:, None, :] & (heads < H)[None, :, None]
    x_off = (b * stride_xb + t * stride_xt)[:, None, None] + (heads * stride_xh)[None, :, None] + d[None, None, :]
    y_off = (b * stride_yb + t * stride_yt)[:, None, None] + (heads * stride_yh)[None, :, None] + d[None, None, :]
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + y_off, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + HALF, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def _tile(n_heads, half):
    block_h = triton.next_power_of_2(n_heads)
    block_half = triton.next_power_of_2(half)
    # ~4K elements per half-tile on the GPU (9 heads -> 16 x 32 x 8 tokens); not yet tuned on a GPU (owed).
    # Under the interpreter: 2 tokens per program so the tests cross program boundaries with odd T.
    elems = 0 if INTERPRET else 4096
    block_t = max(2, min(64, elems // (block_h * block_half)))
    return block_t, block_h, block_half


@triton_op("nanosmol::rope", mutates_args=())
def rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    B, T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    n_tokens = B * T
    if n_tokens == 0 or H == 0:
        return y
    block_t, block_h, block_half = _tile(H, D // 2)
    launch("rope_bwd" if inverse else "rope_fwd", _rope_kernel, (triton.cdiv(n_tokens, block_t),), x, cos, sin, y,
           n_tokens, T, H, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2), cos.stride(0),
           sin.stride(0), HALF=D // 2, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, INVERSE=inverse,
           num_warps=4)
    return y


def _setup_context(ctx, inputs, output):
    _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    # cos/sin are buffers (no gradient); the upstream grad may be expanded (stride 0): the op makes it unit-stride in d
    # and honours the other strides, and rope_op's contiguous() covers a stride-0 last dim
    return torch.ops.nanosmol.rope(dy, cos, sin, not ctx.inverse), None, None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by the angles behind cos, sin (T, D/2); returns a new contiguous (B, T, H, D) tensor."""
    if x.dim() != 4:
        raise ValueError(f"kernels.apply_rope: x must be (B, T, H, D), got shape {tuple(x.shape)}")
    B, T, H, D = x.shape
    if D % 2:
        raise ValueError(f"kernels.apply_rope: head_dim must be even for rotate-half, got D={D}")
    if tuple(cos.shape) != (T, D // 2) or tuple(sin.shape) != (T, D // 2):
        raise ValueError(f"kernels.apply_rope: cos and sin must be (T, D/2) = ({T}, {D // 2}) for x {tuple(x.shape)}, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)} (slice the tables to the positions of x)")
    if not (x.is_floating_point() and cos.is_floating_point() and sin.is_floating_point()):
        raise TypeError(f"kernels.apply_rope: floating-point inputs only, got {x.dtype}, {cos.dtype}, {sin.dtype}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("kernels.apply_rope: cos and sin are treated as constants (no gradient); pass them detached")
    check_device("rope", x, cos, sin)
    return torch.ops.nanosmol.rope(x, cos, sin, False)
