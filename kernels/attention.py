# Scaled dot-product attention, FlashAttention-2 algorithm (Dao 2023, arXiv 2307.08691), written from the paper and
# KERNELS.md's notes; no code copied. q (B, Tq, H, D), k/v (B, Tk, Hkv, D), H a multiple of Hkv (MHA, GQA, MQA),
# scale 1/sqrt(D), causal mask aligned bottom-right (query i sees keys j <= i + Tk - Tq, as flash-attn >= 2.1; Tq == Tk
# in training). Any sequence length (masked tails), head_dim 16/32/64/128, fp32 / fp16 / bf16 (math in fp32).
# Packed documents (DOC): START/END (B, T) int32 give each token's document [start, end); query i sees key j when
# start_i <= j <= i (equivalently j <= i < end_j), causal within each document, with no (T, T) mask. Documents are
# contiguous runs, so the starts never decrease along a row: a query block's keys begin at its first row's start, and
# key blocks wholly outside every row's document are never visited (a row of short documents costs ~ its documents'
# triangles, not the whole causal triangle). Tiles that every row sees in full run without masks, as in plain causal.
#   forward: online softmax in the exp2 domain; the causal loop is split into unmasked off-diagonal key blocks and
#            masked diagonal/tail blocks; saves lse = logsumexp(scores) (B, H, Tq) fp32 (natural log).
#   backward: Delta = rowsum(O * dO) pre-pass; dK/dV with one program per (key block, kv head) that loops over the
#             q heads of its GQA group and their query blocks (fp32 register accumulation); dQ with one program per
#             (query block, q head). No atomics anywhere: gradients are bitwise deterministic.
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .utils import INTERPRET, check_device, dot_precision, launch

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the native instruction
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # powers of two that tl.dot takes; SmolLM2 uses 64, the tiny preset 16


# ----------------------------------------------------------------------------------------------------------- forward
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, row_start, lo, hi, Tk, OFFSET,
                    QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    CAUSAL: tl.constexpr, DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi): m = running max, l = running sum of exp2(s - m), acc = sum p v.
    Unmasked blocks (MASKED=False) are fully visible to every row of the query block and lie inside [0, Tk)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < Tk, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < Tk, other=0.0)
        else:
            k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            keep = cols[None, :] < Tk
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + OFFSET)
            if DOC:
                keep = keep & (cols[None, :] >= row_start[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # fully-masked-row guard: a row with no visible key yet keeps p = 0 and alpha = 0 instead of NaN (inf - inf)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_range(START, b, pid_m, offs_m, row_ok, Tq, Tk, OFFSET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, DOC: tl.constexpr):
    """The keys a query block visits (forward and dQ): [lo, hi), of which [full_lo, full_hi) every row sees whole
    (full_lo <= full_hi, both multiples of BLOCK_N, inside [0, Tk)); row_start: each row's document start (DOC)."""
    row_start = 0
    if CAUSAL:
        # keys [0, full_hi) are visible to every row >= pid_m * BLOCK_M (causally); [full_hi, hi) need the mask
        full_hi = (tl.maximum(tl.minimum(pid_m * BLOCK_M + OFFSET + 1, Tk), 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M + OFFSET, Tk)
    else:
        full_hi = (Tk // BLOCK_N) * BLOCK_N
        hi = Tk
    lo = 0
    full_lo = 0
    if DOC:  # Tq == Tk: the first row's document start is the block's lowest, the last row's its highest
        row_start = tl.load(START + b * Tq + offs_m, mask=row_ok, other=0)
        first = tl.load(START + b * Tq + pid_m * BLOCK_M)
        last = tl.load(START + b * Tq + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1)
        lo = (first // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(last, BLOCK_N) * BLOCK_N
        full_hi = tl.maximum(full_hi, full_lo)  # none of it whole: an empty unmasked range
    return lo, full_lo, full_hi, hi, row_start


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, START, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, H, GROUP, Tq, Tk,
                     QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """O[b, i, h] = sum_j softmax_j(q_i . k_j / sqrt(D)) v_j for one (query block, b, h); LSE[b, h, i] = logsumexp_j."""
    if CAUSAL:  # the last query blocks do the most work: schedule them first (a shorter tail of lone programs)
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    OFFSET = Tk - Tq  # bottom-right causal alignment
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    lo, full_lo, full_hi, hi, row_start = _key_range(START, b, pid_m, offs_m, row_ok, Tq, Tk, OFFSET, BLOCK_M, BLOCK_N,
                                                     CAUSAL, DOC)
    # keys [lo, full_lo) and [full_hi, hi) need the mask, [full_lo, full_hi) are visible to every row of the block
    if DOC:
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, row_start, lo,
                                        tl.minimum(full_lo, hi), Tk, OFFSET, QK_SCALE, HEAD_DIM, BLOCK_N, True, CAUSAL,
                                        DOC, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, row_start, full_lo, full_hi,
                                    Tk, OFFSET, QK_SCALE, HEAD_DIM, BLOCK_N, False, CAUSAL, DOC, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, row_start, full_hi, hi, Tk,
                                    OFFSET, QK_SCALE, HEAD_DIM, BLOCK_N, True, CAUSAL, DOC, DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key (only with causal and Tk < Tq): output 0
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)  # +inf: p = 0 in bwd
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + (b * H + h) * Tq + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh, H, Tq,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta[b, h, i] = sum_d O[b, i, h, d] * dO[b, i, h, d] (fp32): the softmax backward's row term."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + (b * H + h) * Tq + offs_m, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n, key_end, lo, hi, Tq,
                         OFFSET, QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """For query blocks [lo, hi) of one q head, in the transposed (keys x queries) layout:
    P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T * (dP^T - Delta), dK += dS^T Q (scaled later).
    Unmasked blocks lie inside [0, Tq) and see every key of this key block."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        if MASKED:
            row_ok = rows < Tq
            q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        else:
            q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :])
            do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :])
            lse = tl.load(LSE + rows)
            delta = tl.load(DELTA + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * QK_SCALE  # (BLOCK_N, BLOCK_M), log2 units
        if MASKED:  # mask before exp2: masked scores may exceed lse and would overflow
            keep = rows[None, :] < Tq
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= rows[None, :] + OFFSET)
            if DOC:  # row i sees key j <= i while i is still in j's document
                keep = keep & (rows[None, :] < key_end[:, None])
            s_t = tl.where(keep, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - (lse * 1.4426950408889634)[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, END, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt,
                          stride_kh, stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh, stride_dkb,
                          stride_dkt, stride_dkh, H, HKV, GROUP, Tq, Tk, SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                          DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV for one (key block, b, kv head), summed over the GROUP q heads that share this kv head."""
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    hk = bh % HKV
    OFFSET = Tk - Tq
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < Tk
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    tq_full = (Tq // BLOCK_M) * BLOCK_M
    tq_ceil = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    key_end = 0
    # query blocks [lo, hi) see some key of this block; [full_lo, full_hi) see all of it (whole blocks inside [0, Tq))
    if CAUSAL:
        # rows i see key j when i >= j - OFFSET: rows below lo see none of this block; rows >= full_lo see all of it
        lo = (tl.maximum(start_n - OFFSET, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - OFFSET, 0), BLOCK_M) * BLOCK_M, tq_ceil)
        full_lo = tl.maximum(full_lo, lo)
    else:
        lo = 0
        full_lo = 0
    full_hi = tl.maximum(full_lo, tq_full)  # a partial last query block is handled with masks
    hi = tq_ceil
    if DOC:  # Tq == Tk: rows past the first key's document miss a key of the block; past the last key's, all of them
        key_end = tl.load(END + b * Tq + offs_n, mask=col_ok, other=0)
        end_first = tl.load(END + b * Tq + start_n)
        end_last = tl.load(END + b * Tq + tl.minimum(start_n + BLOCK_N, Tk) - 1)
        full_lo = tl.cdiv(tl.minimum(start_n + BLOCK_N, Tk) - 1, BLOCK_M) * BLOCK_M
        full_hi = tl.maximum((end_first // BLOCK_M) * BLOCK_M, full_lo)
        hi = tl.cdiv(end_last, BLOCK_M) * BLOCK_M
    # Rows of padding (key j >= Tk) compute garbage that is never stored; padded queries load as 0 and add nothing.
    for g in range(0, GROUP):
        h = hk * GROUP + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        LSEh = LSE + (b * H + h) * Tq
        DELTAh = DELTA + (b * H + h) * Tq
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot, offs_n, key_end, lo,
                                      tl.minimum(full_lo, hi), Tq, OFFSET, QK_SCALE, HEAD_DIM, BLOCK_M, True, CAUSAL,
                                      DOC, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot, offs_n, key_end,
                                      full_lo, full_hi, Tq, OFFSET, QK_SCALE, HEAD_DIM, BLOCK_M, False, CAUSAL, DOC,
                                      DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot, offs_n, key_end,
                                      full_hi, hi, Tq, OFFSET, QK_SCALE, HEAD_DIM, BLOCK_M, True, CAUSAL, DOC,
                                      DOT_PRECISION)
    dk = dk * SM_SCALE  # S = scale * Q K^T, so dK = scale * dS^T Q
    base = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(DK + base, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, offs_m, row_start, lo, hi, Tk, OFFSET,
                       QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                       CAUSAL: tl.constexpr, DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """For key blocks [lo, hi): P = exp(S - lse), dP = dO V^T, dS = P * (dP - Delta), dQ += dS K (scaled later)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < Tk, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < Tk, other=0.0)
        else:
            k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
        if MASKED:
            keep = cols[None, :] < Tk
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + OFFSET)
            if DOC:
                keep = keep & (cols[None, :] >= row_start[:, None])
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, START, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                        stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt,
                        stride_dqh, H, GROUP, Tq, Tk, SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        DOC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ for one (query block, b, q head): the same key-block walk as the forward."""
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    OFFSET = Tk - Tq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + (b * H + h) * Tq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + (b * H + h) * Tq + offs_m, mask=row_ok, other=0.0)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    lo, full_lo, full_hi, hi, row_start = _key_range(START, b, pid_m, offs_m, row_ok, Tq, Tk, OFFSET, BLOCK_M, BLOCK_N,
                                                     CAUSAL, DOC)
    if DOC:
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, offs_m, row_start, lo,
                                tl.minimum(full_lo, hi), Tk, OFFSET, QK_SCALE, HEAD_DIM, BLOCK_N, True, CAUSAL, DOC,
                                DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, offs_m, row_start, full_lo, full_hi, Tk,
                            OFFSET, QK_SCALE, HEAD_DIM, BLOCK_N, False, CAUSAL, DOC, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, offs_m, row_start, full_hi, hi, Tk,
                            OFFSET, QK_SCALE, HEAD_DIM, BLOCK_N, True, CAUSAL, DOC, DOT_PRECISION)
    dq = dq * SM_SCALE
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------------------ configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) keyed by (element size in bytes, head_dim). Chosen by compiling for H100
# (sm_90) and A100 (sm_80) on a CPU machine (python -m kernels.aot; test_kernels_aot.py): the largest FA2-style tiles
# that fit with zero register spills on both targets, in every dtype. The forward's 128x64 query/key tile takes 8 warps
# (4 spill on sm_80); dK/dV keeps 128 keys per program for head_dim 64 (8 warps; 4 spill ~500 B) and 32 keys x 64
# queries for 128; fp32 (ieee dots, no tensor cores) uses small tiles. NOT yet timed on a GPU: owed
# (bench/kernels.py --sweep, bench/gpu.sh). bench/kernels.py may overwrite these dicts to sweep configs.
FWD_CONFIGS = {(2, 64): (128, 64, 8, 3), (2, 128): (128, 64, 8, 3), (4, 64): (64, 32, 8, 2), (4, 128): (32, 16, 8, 1)}
DKDV_CONFIGS = {(2, 64): (32, 128, 8, 3), (2, 128): (64, 32, 8, 2), (4, 64): (16, 32, 8, 2), (4, 128): (16, 32, 8, 1)}
DQ_CONFIGS = {(2, 64): (128, 32, 4, 3), (2, 128): (64, 32, 4, 2), (4, 64): (64, 16, 4, 2), (4, 128): (32, 16, 8, 1)}
# The packed-documents variant (DOC) holds more live registers (each row's document start or each key's end, a third
# key loop): where the plain tile spills on a target it takes these instead (python kernels/aot.py, the same check).
DOC_CONFIGS = {("fwd", 2, 128): (128, 32, 8, 3), ("dkdv", 4, 64): (16, 32, 4, 1)}
# Under the interpreter the tiles are small (same shape ratios) so that T = 17..64 crosses several blocks, the
# diagonal split and the masked tails: what the CPU tests are for.
INTERPRET_CONFIGS = {"fwd": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1), "dq": (32, 16, 1, 1)}


def _config(kind, dtype, head_dim, docs=False):
    if INTERPRET:
        return INTERPRET_CONFIGS[kind]
    key = (2 if dtype in (torch.float16, torch.bfloat16) else 4, 64 if head_dim <= 64 else 128)
    if docs and (kind, *key) in DOC_CONFIGS:
        return DOC_CONFIGS[(kind, *key)]
    return {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}[kind][key]


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


@triton_op("nanosmol::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, start: Optional[torch.Tensor],
                  end: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    o = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if B * H * Tq == 0:
        return o, lse
    block_m, block_n, num_warps, num_stages = _config("fwd", q.dtype, D, start is not None)
    launch("attention_fwd", _attn_fwd_kernel, (triton.cdiv(Tq, block_m), B * H), q, k, v, o, lse, start,
           q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
           v.stride(2), o.stride(0), o.stride(1), o.stride(2), H, H // Hkv, Tq, Tk,
           QK_SCALE=LOG2E / math.sqrt(D), HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
           DOC=start is not None, DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    return o, lse


@triton_op("nanosmol::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, causal: bool, start: Optional[torch.Tensor],
                  end: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    do = do.contiguous()  # may arrive expanded (stride 0) or in another layout
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    dq = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Tk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Tk, Hkv, D), dtype=v.dtype, device=v.device)
    if B * H * Tq == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(D)
    precision = dot_precision(q.dtype)
    block_m = 16 if INTERPRET else 64  # a streaming pass: 64 rows x D per program keeps registers low
    launch("attention_bwd_pre", _attn_bwd_preprocess_kernel, (triton.cdiv(Tq, block_m), B * H), o, do, delta,
           o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), H, Tq,
           HEAD_DIM=D, BLOCK_M=block_m, num_warps=4 if D <= 64 else 8)
    block_m, block_n, num_warps, num_stages = _config("dkdv", q.dtype, D, end is not None)
    launch("attention_bwd_dkdv", _attn_bwd_dkdv_kernel, (triton.cdiv(Tk, block_n), B * Hkv), q, k, v, do, lse, delta,
           dk, dv, end, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
           v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), dk.stride(0), dk.stride(1),
           dk.stride(2), H, Hkv, H // Hkv, Tq, Tk, SM_SCALE=scale, QK_SCALE=scale * LOG2E, HEAD_DIM=D,
           BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, DOC=end is not None, DOT_PRECISION=precision,
           num_warps=num_warps, num_stages=num_stages)
    block_m, block_n, num_warps, num_stages = _config("dq", q.dtype, D, start is not None)
    launch("attention_bwd_dq", _attn_bwd_dq_kernel, (triton.cdiv(Tq, block_m), B * H), q, k, v, do, lse, delta, dq,
           start, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
           v.stride(2), do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
           H, H // Hkv, Tq, Tk, SM_SCALE=scale, QK_SCALE=scale * LOG2E, HEAD_DIM=D, BLOCK_M=block_m,
           BLOCK_N=block_n, CAUSAL=causal, DOC=start is not None, DOT_PRECISION=precision, num_warps=num_warps,
           num_stages=num_stages)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, causal, start, end = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, start, end)
    ctx.causal = causal


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, start, end = ctx.saved_tensors
    dq, dk, dv = torch.ops.nanosmol.attention_bwd(do, q, k, v, o, lse, ctx.causal, start, end)
    return dq, dk, dv, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    docs: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with q (B, T, H, D), k and v (B, T, Hkv, D); returns (B, T, H, D) in q's dtype.
    Strided views (e.g. slices of a fused qkv projection) are read in place as long as the last dim is contiguous.
    docs: packed documents, (start, end) each (B, T) int32, token i's document being [start[b, i], end[b, i]) (contiguous
    runs: documents.Documents makes them from document ids); attention is then causal within each document."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"kernels.flash_attention: q, k, v must be (B, T, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, Tq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"kernels.flash_attention: k and v must be (B, Tk, Hkv, D) = ({B}, Tk, Hkv, {D}) like q "
                         f"{tuple(q.shape)}, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Tk, Hkv = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"kernels.flash_attention: the number of q heads ({H}) must be a multiple of the number of kv heads "
                         f"({Hkv}) (MHA, GQA or MQA)")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"kernels.flash_attention: head_dim {D} is not supported (supported: {SUPPORTED_HEAD_DIMS}); "
                         f"use the PyTorch path (triton_attention=False)")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"kernels.flash_attention: q, k, v must share one dtype of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if causal and Tk < Tq:
        raise ValueError(f"kernels.flash_attention: causal attention needs at least as many keys as queries (Tk={Tk} < "
                         f"Tq={Tq}); the mask is aligned bottom-right (query i sees keys j <= i + Tk - Tq)")
    if Tk == 0 and Tq > 0:
        raise ValueError("kernels.flash_attention: no keys (Tk=0)")
    start = end = None
    if docs is not None:
        start, end = docs
        if not causal or Tk != Tq:
            raise ValueError(f"kernels.flash_attention: docs need causal attention over one sequence (Tq == Tk), got "
                             f"causal={causal}, Tq={Tq}, Tk={Tk}")
        if start.shape != (B, Tq) or end.shape != (B, Tq) or start.dtype != torch.int32 or end.dtype != torch.int32:
            raise ValueError(f"kernels.flash_attention: docs must be (start, end), each ({B}, {Tq}) int32, got "
                             f"{tuple(start.shape)} {start.dtype} and {tuple(end.shape)} {end.dtype}")
        start, end = start.contiguous(), end.contiguous()
        check_device("attention", q, start, end)
    check_device("attention", q, k, v)
    o, _ = torch.ops.nanosmol.attention_fwd(q, k, v, causal, start, end)
    return o
