# RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32 (as model.py's RMSNorm), one rounding to x's dtype.
# Design (KERNELS.md): multi-row tiles so narrow rows (hidden 576) still give each program enough bytes in flight;
# rstd saved in fp32; the backward writes dX and one fp32 partial dW row per program, summed once on the host side
# (deterministic: no atomics).
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .utils import INTERPRET, check_device, launch, num_sms


@triton.jit
def _rms_norm_forward_kernel(X, W, Y, RSTD, n_rows, n_cols, stride_x, stride_y, eps: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """rstd = 1/sqrt(sum(x^2)/C + eps); y = x * rstd * w. One program normalises BLOCK_M rows of X (n_rows, n_cols)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_M,) fp32
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_backward_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, rows_per_program,
                              stride_dy, stride_x, stride_dx, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """With xhat = x * rstd and g = dy * w:  dx = rstd * (g - xhat * sum(g * xhat) / C),  dw = sum over rows of dy * xhat.
    Program p handles rows [p * rows_per_program, (p + 1) * rows_per_program) in tiles of BLOCK_M rows and writes its
    dw partial sum (fp32) to DW_PARTIAL[p, :]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / n_cols  # (BLOCK_M,)
        dx = rstd[:, None] * (g - xhat * c[:, None])
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


# Tile shapes. Rows are padded to a power of two (576 -> 1024 columns, masked); BLOCK_M rows are stacked until a tile
# holds TILE_ELEMS elements (8 rows of 1024 for hidden 576/960, 4 of 2048); the backward runs BWD_PROGRAMS_PER_SM
# programs per SM. Not yet tuned on a GPU: owed, see BENCHMARKS.md (Kernels). Under the interpreter the tiles are
# smaller so that the tests cross row-tile and program boundaries.
TILE_ELEMS = 8192
BWD_PROGRAMS_PER_SM = 4
MAX_COLS = 65536


def _tile(n_cols):
    block_c = triton.next_power_of_2(n_cols)
    elems = 1024 if INTERPRET else TILE_ELEMS
    block_m = max(1, min(16, elems // block_c))
    num_warps = 8 if block_m * block_c >= 8192 else 4
    return block_m, block_c, num_warps


def _as_rows(x, n_cols):
    x2 = x.reshape(-1, n_cols)  # (N, C): a view when x is contiguous
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@triton_op("nanosmol::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_cols = x.shape[-1]
    x2 = _as_rows(x, n_cols)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: row stride n_cols
    rstd = torch.empty((x2.shape[0],), dtype=torch.float32, device=x.device)
    block_m, block_c, num_warps = _tile(n_cols)
    grid = (triton.cdiv(x2.shape[0], block_m),)
    if x2.shape[0] == 0:
        return y, rstd
    launch("rms_norm_fwd", _rms_norm_forward_kernel, grid, x2, weight, y, rstd, x2.shape[0], n_cols,
           x2.stride(0), n_cols, eps=eps, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    return y, rstd


@triton_op("nanosmol::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_cols = x.shape[-1]
    x2 = _as_rows(x, n_cols)
    dy2 = dy.contiguous().view(-1, n_cols)  # the upstream grad of y.sum() arrives expanded (stride 0)
    n_rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: row stride n_cols
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    block_m, block_c, num_warps = _tile(n_cols)
    block_m = max(1, block_m // 2)  # backward holds x, dy and the dw accumulator per row: half the rows per tile
    tiles = triton.cdiv(n_rows, block_m)
    # enough programs to fill the GPU several times over (KERNELS.md: Liger's bwd, one program per SM, is latency-bound);
    # each program walks its own contiguous run of tiles and keeps one fp32 dw row
    max_programs = 3 if INTERPRET else BWD_PROGRAMS_PER_SM * num_sms(x.device.index or 0)
    programs = max(1, min(tiles, max_programs))
    rows_per_program = triton.cdiv(tiles, programs) * block_m
    programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    launch("rms_norm_bwd", _rms_norm_backward_kernel, (programs,), dy2, x2, weight, rstd, dx, dw_partial, n_rows, n_cols,
           rows_per_program, dy2.stride(0), x2.stride(0), n_cols, BLOCK_M=block_m, BLOCK_C=block_c,
           num_warps=num_warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.nanosmol.rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., C) with weight (C,); returns x's dtype and shape."""
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"kernels.rms_norm: x (..., C) and weight (C,) must agree on C, got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    if x.shape[-1] > MAX_COLS:
        raise ValueError(f"kernels.rms_norm: C={x.shape[-1]} exceeds the one-tile limit {MAX_COLS}; use the PyTorch path")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"kernels.rms_norm: floating-point inputs only, got {x.dtype} and {weight.dtype}")
    check_device("rms_norm", x, weight)
    y, _ = torch.ops.nanosmol.rms_norm_fwd(x, weight.contiguous(), float(eps))
    return y
