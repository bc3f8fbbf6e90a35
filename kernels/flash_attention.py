"""Flash attention (FlashAttention-2) for training and prefill: causal or not, grouped-query, packed rows.

    out = flash_attention(q, k, v, causal=True, segment_ids=None)

q (B, T, H, D); k, v (B, T, H_kv, D) with H a multiple of H_kv; out (B, T, H, D). Query head h reads key/value
head h // (H // H_kv): the kernels index it, K and V are never repeated. With segment_ids (B, T) a token sees
only tokens of its own segment (several examples packed into one row). Softmax scale 1/sqrt(D).

How it works (Dao, "FlashAttention-2", 2023):
- forward: a program per (query block, batch * head) streams key blocks through an online softmax in fp32
  and writes the output and the log-sum-exp of each row, nothing of size T x T. Key blocks above the
  diagonal (causal) or outside the block's segments are never visited; blocks that need no mask take a
  loop without one.
- backward: recomputes the attention probabilities from the saved log-sum-exp. One program per
  (key block, batch * kv head) accumulates dK and dV over every query head of its group, so no atomics;
  a second kernel, a program per (query block, batch * head), accumulates dQ.

The file ends with `attention_reference`, the PyTorch code (SDPA with the same masks) that defines what the
kernels compute; it also runs whenever the kernels do not (see kernels/runtime.py).
"""
from __future__ import annotations  # Triton reads `tl.constexpr` annotations as strings; lets this file import without triton

import math
from typing import Optional

import torch
import torch.nn.functional as F

from kernels.runtime import runs_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch without triton: only attention_reference can run
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


# ---------------------------------------------------------------------------------------------- kernels
@_jit
def _load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    """A (rows, BLOCK_D) tile, masking only what may be out of bounds (unmasked loads vectorize best)."""
    if MASK_ROWS:
        if MASK_D:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_D:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@_jit
def _query_segments(SEG, SEG_FIRST, SEG_LAST, b, T, q_idx, q_ok, HAS_SEG: tl.constexpr):
    """Each query row's segment id and its segment's first and last index; without segments, q_idx for all
    three (placeholders that are never read)."""
    q_seg = q_idx
    seg_first = q_idx
    seg_last = q_idx
    if HAS_SEG:
        q_seg = tl.load(SEG + b * T + q_idx, mask=q_ok, other=0)
        seg_first = tl.load(SEG_FIRST + b * T + q_idx, mask=q_ok, other=0)
        seg_last = tl.load(SEG_LAST + b * T + q_idx, mask=q_ok, other=0)
    return q_seg, seg_first, seg_last


@_jit
def _key_range(start_m, T, seg_first, seg_last, q_ok,
               CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks a query block [start_m, start_m + BLOCK_M) needs: [lo, hi); those in [lo, full_end) need no
    bounds or causal mask. seg_first/seg_last: first and last index of each query row's segment."""
    lo = 0
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        hi = T
    if HAS_SEG:
        lo = tl.min(tl.where(q_ok, seg_first, T), 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, tl.max(tl.where(q_ok, seg_last, 0), 0) + 1)
    if CAUSAL:
        full_end = start_m // BLOCK_N * BLOCK_N  # every row of the block sees every key before start_m
    else:
        full_end = hi // BLOCK_N * BLOCK_N
    return lo, full_end, hi


@_jit
def _attn_fwd_inner(acc, l_i, m_i, q, q_idx, q_seg, k_base, v_base, kseg_base,
                    stride_kt, stride_kd, stride_vt, stride_vd, offs_d, d_ok, lo, hi, T, qk_scale,
                    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, MASK: tl.constexpr, MASK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k_idx = start_n + offs_n
        k_ok = k_idx < T
        k = _load_tile(k_base + k_idx[:, None] * stride_kt + offs_d[None, :] * stride_kd, k_ok, d_ok, MASK, MASK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            visible = k_ok[None, :]
            if CAUSAL:
                visible = visible & (k_idx[None, :] <= q_idx[:, None])
            if HAS_SEG:
                k_seg = tl.load(kseg_base + k_idx, mask=k_ok, other=0)
                visible = visible & (q_seg[:, None] == k_seg[None, :])
            s = tl.where(visible, s, float("-inf"))
        elif HAS_SEG:
            k_seg = tl.load(kseg_base + k_idx)
            s = tl.where(q_seg[:, None] == k_seg[None, :], s, float("-inf"))
        # Online softmax: rescale what was summed so far to the new running max. m_i starts finite
        # (-1e30), so a row with no visible key yet gets p = exp2(-inf) = 0, never inf - inf = nan.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + k_idx[:, None] * stride_vt + offs_d[None, :] * stride_vd, k_ok, d_ok, MASK, MASK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _attn_fwd(Q, K, V, O, LSE, SEG, SEG_FIRST, SEG_LAST,
              stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
              stride_vb, stride_vt, stride_vh, stride_vd, stride_ob, stride_ot, stride_oh, stride_od,
              T, H, GROUP, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    # Causal query blocks near the end do the most work: start them first so the tail of the grid is short.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = h // GROUP  # grouped-query attention: the kv head this query head reads
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM

    q_idx = start_m + tl.arange(0, BLOCK_M)
    q_ok = q_idx < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + h * stride_qh + q_idx[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   q_ok, d_ok, True, MASK_D)  # (BLOCK_M, BLOCK_D)

    q_seg, seg_first, seg_last = _query_segments(SEG, SEG_FIRST, SEG_LAST, b, T, q_idx, q_ok, HAS_SEG)
    lo, full_end, hi = _key_range(start_m, T, seg_first, seg_last, q_ok, CAUSAL, HAS_SEG, BLOCK_M, BLOCK_N)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, q_idx, q_seg, k_base, v_base, SEG + b * T,
                                    stride_kt, stride_kd, stride_vt, stride_vd, offs_d, d_ok, lo, full_end, T,
                                    qk_scale, CAUSAL, HAS_SEG, False, MASK_D, BLOCK_N, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, q_idx, q_seg, k_base, v_base, SEG + b * T,
                                    stride_kt, stride_kd, stride_vt, stride_vd, offs_d, d_ok,
                                    tl.maximum(lo, full_end), hi, T,
                                    qk_scale, CAUSAL, HAS_SEG, True, MASK_D, BLOCK_N, PRECISION)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past T, which are not stored
    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + q_idx[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    # The log-sum-exp of the scaled scores in natural units: all the backward needs to rebuild p.
    tl.store(LSE + bh.to(tl.int64) * T + q_idx, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=q_ok)


@_jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_od,
                    stride_dob, stride_dot, stride_doh, stride_dod, T, H,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) (B, H, T): the softmax backward's correction term, dS = P * (dP - delta)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mask = (t < T)[:, None] & (d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + t[:, None] * stride_ot + d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + t[:, None] * stride_dot + d[None, :] * stride_dod,
                 mask=mask, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * T + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=t < T)


@_jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, k_idx, k_seg, q_base, do_base, lse_base, delta_base, qseg_base,
                         stride_qt, stride_qd, stride_dot, stride_dod, offs_d, d_ok, lo, hi, T, qk_scale,
                         CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, MASK: tl.constexpr, MASK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        q_idx = start_m + offs_m
        q_ok = q_idx < T
        q = _load_tile(q_base + q_idx[:, None] * stride_qt + offs_d[None, :] * stride_qd, q_ok, d_ok, MASK, MASK_D)
        do = _load_tile(do_base + q_idx[:, None] * stride_dot + offs_d[None, :] * stride_dod, q_ok, d_ok, MASK, MASK_D)
        if MASK:
            lse = tl.load(lse_base + q_idx, mask=q_ok, other=0.0)
            delta = tl.load(delta_base + q_idx, mask=q_ok, other=0.0)
        else:
            lse = tl.load(lse_base + q_idx)
            delta = tl.load(delta_base + q_idx)
        # Work transposed, (keys, queries), so P^T needs no transpose for dV = P^T dO.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        p_t = tl.math.exp2(s_t - lse[None, :] * 1.4426950408889634)
        if MASK:
            visible = q_ok[None, :]
            if CAUSAL:
                visible = visible & (q_idx[None, :] >= k_idx[:, None])
            if HAS_SEG:
                q_seg = tl.load(qseg_base + q_idx, mask=q_ok, other=0)
                visible = visible & (k_seg[:, None] == q_seg[None, :])
            p_t = tl.where(visible, p_t, 0.0)
        elif HAS_SEG:
            q_seg = tl.load(qseg_base + q_idx)
            p_t = tl.where(k_seg[:, None] == q_seg[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@_jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, SEG, SEG_FIRST, SEG_LAST,
                   stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
                   stride_vb, stride_vt, stride_vh, stride_vd, stride_dob, stride_dot, stride_doh, stride_dod,
                   stride_dkb, stride_dkt, stride_dkh, stride_dkd, stride_dvb, stride_dvt, stride_dvh, stride_dvd,
                   T, H, H_KV, GROUP, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = (bkv // H_KV).to(tl.int64)
    kvh = bkv % H_KV
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM

    k_idx = start_n + tl.arange(0, BLOCK_N)
    k_ok = k_idx < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # Keys past T load as zeros; they only touch their own dK/dV rows, which are never stored.
    k = _load_tile(K + b * stride_kb + kvh * stride_kh + k_idx[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                   k_ok, d_ok, True, MASK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(V + b * stride_vb + kvh * stride_vh + k_idx[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                   k_ok, d_ok, True, MASK_D)

    # The query rows that can see this key block: [lo, hi). Rows in [diag_end, full_end) need no causal or
    # bounds mask. BLOCK_N is a multiple of BLOCK_M, so every phase starts on a query block.
    lo = 0
    hi = T
    k_seg = k_idx
    if CAUSAL:
        lo = start_n
    if HAS_SEG:
        k_seg = tl.load(SEG + b * T + k_idx, mask=k_ok, other=0)
        first = tl.load(SEG_FIRST + b * T + k_idx, mask=k_ok, other=T)
        last = tl.load(SEG_LAST + b * T + k_idx, mask=k_ok, other=0)
        lo = tl.maximum(lo, tl.min(first, 0) // BLOCK_M * BLOCK_M)
        hi = tl.minimum(hi, tl.max(last, 0) + 1)
    if CAUSAL:
        diag_end = tl.minimum(start_n + BLOCK_N, hi)
    else:
        diag_end = lo
    full_end = hi // BLOCK_M * BLOCK_M

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # Every query head of the group reads this kv head: sum their contributions here, without atomics.
    for g in range(GROUP):
        h = kvh * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        if CAUSAL:  # the diagonal band: queries that see only part of the key block
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_idx, k_seg, q_base, do_base, LSE + bh * T, DELTA + bh * T,
                                          SEG + b * T, stride_qt, stride_qd, stride_dot, stride_dod, offs_d, d_ok,
                                          lo, diag_end, T, qk_scale, CAUSAL, HAS_SEG, True, MASK_D, BLOCK_M,
                                          PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_idx, k_seg, q_base, do_base, LSE + bh * T, DELTA + bh * T,
                                      SEG + b * T, stride_qt, stride_qd, stride_dot, stride_dod, offs_d, d_ok,
                                      diag_end, full_end, T, qk_scale, CAUSAL, HAS_SEG, False, MASK_D, BLOCK_M,
                                      PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, k_idx, k_seg, q_base, do_base, LSE + bh * T, DELTA + bh * T,
                                      SEG + b * T, stride_qt, stride_qd, stride_dot, stride_dod, offs_d, d_ok,
                                      tl.maximum(diag_end, full_end), hi, T, qk_scale, CAUSAL, HAS_SEG, True,
                                      MASK_D, BLOCK_M, PRECISION)

    out_mask = k_ok[:, None] & d_ok[None, :]
    dk_ptrs = DK + b * stride_dkb + kvh * stride_dkh + k_idx[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + kvh * stride_dvh + k_idx[:, None] * stride_dvt + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


@_jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, q_idx, q_seg, k_base, v_base, kseg_base,
                       stride_kt, stride_kd, stride_vt, stride_vd, offs_d, d_ok, lo, hi, T, qk_scale,
                       CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, MASK: tl.constexpr, MASK_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k_idx = start_n + offs_n
        k_ok = k_idx < T
        k = _load_tile(k_base + k_idx[:, None] * stride_kt + offs_d[None, :] * stride_kd, k_ok, d_ok, MASK, MASK_D)
        v = _load_tile(v_base + k_idx[:, None] * stride_vt + offs_d[None, :] * stride_vd, k_ok, d_ok, MASK, MASK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            visible = k_ok[None, :]
            if CAUSAL:
                visible = visible & (k_idx[None, :] <= q_idx[:, None])
            if HAS_SEG:
                k_seg = tl.load(kseg_base + k_idx, mask=k_ok, other=0)
                visible = visible & (q_seg[:, None] == k_seg[None, :])
            p = tl.where(visible, p, 0.0)
        elif HAS_SEG:
            k_seg = tl.load(kseg_base + k_idx)
            p = tl.where(q_seg[:, None] == k_seg[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@_jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, SEG, SEG_FIRST, SEG_LAST,
                 stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
                 stride_vb, stride_vt, stride_vh, stride_vd, stride_dob, stride_dot, stride_doh, stride_dod,
                 stride_dqb, stride_dqt, stride_dqh, stride_dqd,
                 T, H, GROUP, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = h // GROUP
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM

    q_idx = start_m + tl.arange(0, BLOCK_M)
    q_ok = q_idx < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + h * stride_qh + q_idx[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   q_ok, d_ok, True, MASK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + q_idx[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                    q_ok, d_ok, True, MASK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * T + q_idx, mask=q_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * T + q_idx, mask=q_ok, other=0.0)

    q_seg, seg_first, seg_last = _query_segments(SEG, SEG_FIRST, SEG_LAST, b, T, q_idx, q_ok, HAS_SEG)
    lo, full_end, hi = _key_range(start_m, T, seg_first, seg_last, q_ok, CAUSAL, HAS_SEG, BLOCK_M, BLOCK_N)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, q_idx, q_seg, k_base, v_base, SEG + b * T,
                            stride_kt, stride_kd, stride_vt, stride_vd, offs_d, d_ok, lo, full_end, T, qk_scale,
                            CAUSAL, HAS_SEG, False, MASK_D, BLOCK_N, PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, q_idx, q_seg, k_base, v_base, SEG + b * T,
                            stride_kt, stride_kd, stride_vt, stride_vd, offs_d, d_ok, tl.maximum(lo, full_end), hi,
                            T, qk_scale, CAUSAL, HAS_SEG, True, MASK_D, BLOCK_N, PRECISION)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + q_idx[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------- launch
def _tiles(head_dim: int, dtype: torch.dtype, device: torch.device):
    """BLOCK_D and, per kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages).

    On CUDA: FlashAttention-2 shapes (128-query forward and dQ tiles, wide key tiles for dK/dV), picked so
    that ptxas reports no register spills for bf16/fp16 and head dims up to 128 when compiled for sm_90, and
    fit sm_80's shared memory (checked by compiling without a GPU; speed is for kernels/bench.py on one).
    In the interpreter: small tiles, so tiny test shapes still cross several blocks and every loop phase runs."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return block_d, dict(fwd=(32, 16, 1, 1), dkdv=(16, 32, 1, 1), dq=(32, 16, 1, 1))
    if dtype == torch.float32:  # fp32 tiles need twice the registers; fp32 is for checking, not for speed
        return block_d, dict(fwd=(32, 16, 4, 2), dkdv=(16, 32, 8, 2), dq=(32, 16, 4, 2))
    if block_d <= 64:
        return block_d, dict(fwd=(128, 64, 4, 3), dkdv=(32, 128, 8, 2), dq=(128, 32, 4, 3))
    if block_d <= 128:
        return block_d, dict(fwd=(128, 64, 8, 3), dkdv=(16, 64, 8, 2), dq=(128, 32, 8, 3))
    return block_d, dict(fwd=(64, 32, 8, 2), dkdv=(16, 32, 4, 2), dq=(64, 32, 8, 2))


def segment_bounds(segment_ids: torch.Tensor):
    """First and last index (B, T) int32 of each token's segment, so a kernel can skip key blocks outside a
    query block's segments. Works for any ids (a segment need not be one contiguous run) and without a
    device sync: a stable sort groups equal ids with their positions in order."""
    B, T = segment_ids.shape
    ids, order = torch.sort(segment_ids, dim=1, stable=True)  # (B, T)
    pos = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    group_start = torch.where(starts, pos, 0).cummax(dim=1).values  # sorted position where each group starts
    group_end = torch.where(ends, pos, T - 1).flip(1).cummin(dim=1).values.flip(1)
    first = torch.empty_like(order).scatter_(1, order, order.gather(1, group_start))
    last = torch.empty_like(order).scatter_(1, order, order.gather(1, group_end))
    return first.to(torch.int32), last.to(torch.int32)


def _segments(segment_ids, device):
    """(ids, first, last) int32 tensors for the kernels; dummies when there are no segments."""
    if segment_ids is None:
        dummy = torch.empty(1, dtype=torch.int32, device=device)
        return dummy, dummy, dummy
    first, last = segment_bounds(segment_ids)
    return segment_ids.to(torch.int32).contiguous(), first, last


def _precision(dtype) -> str:
    # fp32 inputs get true fp32 products (like torch's fp32 attention); tf32 would cost ~3 decimal digits.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, causal, seg, has_seg):
    B, T, H, D = q.shape
    H_kv = k.shape[2]
    block_d, tiles = _tiles(D, q.dtype, q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, T, H, D)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = tiles["fwd"]
    grid = (triton.cdiv(T, block_m), B * H)
    _attn_fwd[grid](q, k, v, o, lse, *seg, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                    T, H, H // H_kv, LOG2E / math.sqrt(D),
                    HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                    HAS_SEG=has_seg, PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)
    return o, lse


def _backward(do, q, k, v, o, lse, causal, seg, has_seg):
    B, T, H, D = q.shape
    H_kv = k.shape[2]
    block_d, tiles = _tiles(D, q.dtype, q.device)
    sm_scale = 1.0 / math.sqrt(D)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, HAS_SEG=has_seg, PRECISION=_precision(q.dtype))
    delta = torch.empty_like(lse)  # (B, H, T)
    _attn_bwd_delta[(triton.cdiv(T, 64), B * H)](o, do, delta, *o.stride(), *do.stride(), T, H,
                                                 HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=64)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    block_m, block_n, warps, stages = tiles["dkdv"]
    _attn_bwd_dkdv[(triton.cdiv(T, block_n), B * H_kv)](
        q, k, v, do, lse, delta, dk, dv, *seg, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dk.stride(), *dv.stride(), T, H, H_kv, H // H_kv, LOG2E * sm_scale, sm_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
    block_m, block_n, warps, stages = tiles["dq"]
    _attn_bwd_dq[(triton.cdiv(T, block_m), B * H)](
        q, k, v, do, lse, delta, dq, *seg, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        T, H, H // H_kv, LOG2E * sm_scale, sm_scale, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        num_stages=stages, **common)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, segment_ids):
        seg = _segments(segment_ids, q.device)
        has_seg = segment_ids is not None
        o, lse = _forward(q, k, v, causal, seg, has_seg)
        # Only the output and the per-row log-sum-exp are kept: the backward recomputes P from them.
        ctx.save_for_backward(q, k, v, o, lse, *seg)
        ctx.causal, ctx.has_seg = causal, has_seg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *seg = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, seg, ctx.has_seg)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------------------------------------- public
def _check(q, k, v, segment_ids):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention expects q (B, T, H, D) and k, v (B, T, H_kv, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={B}, T={T}, "
                         f"H_kv, D={D}) to match q {tuple(q.shape)}")
    if H % k.shape[2]:
        raise ValueError(f"flash_attention: q has {H} heads, not a multiple of the {k.shape[2]} key/value heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention: q, k, v must share one of float32/float16/bfloat16; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if segment_ids is not None:
        if segment_ids.shape != (B, T) or segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise ValueError(f"flash_attention: segment_ids must be integers of shape (B={B}, T={T}); got "
                             f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
        if segment_ids.device != q.device:
            raise ValueError(f"flash_attention: segment_ids are on {segment_ids.device}, q on {q.device}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for q (B, T, H, D), k, v (B, T, H_kv, D) -> (B, T, H, D).

    causal: a token sees only itself and earlier tokens. segment_ids (B, T) integers: a token sees only
    tokens with its own id (packed examples). Inputs may be strided views (e.g. of a fused qkv projection);
    the kernels read them through their strides. Triton on CUDA (and on CPU under TRITON_INTERPRET=1, which
    cannot read bfloat16, so bf16 CPU tensors take the reference), attention_reference otherwise.
    """
    _check(q, k, v, segment_ids)
    if runs_triton(q):  # not bf16 in the interpreter, which would write zeros
        if q.shape[3] > 256:
            raise ValueError(f"flash_attention: head dim {q.shape[3]} is past the kernels' 256; use kernels='torch'")
        return _FlashAttention.apply(q, k, v, causal, segment_ids)
    return attention_reference(q, k, v, causal, segment_ids)


# ---------------------------------------------------------------------------------------------- reference
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What the kernels compute, in PyTorch: scaled_dot_product_attention with the same masks as the model."""
    B, T, H, D = q.shape
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
        if causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = mask.unsqueeze(1)  # (B, 1, T, T)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H or H_kv, T, D)
        attn_mask=mask, is_causal=causal and mask is None, enable_gqa=k.shape[2] != H,
    )
    return out.transpose(1, 2)  # (B, T, H, D)
