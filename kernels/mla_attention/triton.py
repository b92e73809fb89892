"""Triton kernels for MLA training attention (causal, forward and backward).

Shapes (B batch, T queries, S keys, H heads, Ha active heads):

- q (B, T, H, dn+dr), rope part last; k_nope (B, S, H, dn); k_pe (B, S, dr) is the ONE
  rope key of every head and is read through its own pointer, never broadcast;
  v (B, S, H, dv); out (B, T, H, dv); lse (B, Ha, T) fp32, base 2;
  lengths (B,) int32, optional: request b's keys are 0 .. lengths[b]-1 (a padded batch).

Scores are split as q_nope.k_nope + q_pe.k_pe so the shared key never needs a per-head
copy. Softmax is online (FlashAttention-2) with fp32 statistics and accumulators.
Masked heads are simply not in the launch grid: they cost no work, their outputs and
gradients stay zero. The backward computes dk_nope, dv and the shared dk_pe in one
kernel that walks all active heads of a key block, so dk_pe is summed over heads in
registers (no atomics, no per-head buffer); dq has its own kernel.

Non-power-of-two head dims use a power-of-two ``tl.arange`` block with masked loads.
``UPCAST`` computes dots in fp32: always in the interpreter (whose bf16 ``tl.dot`` is
wrong) and for fp32 inputs; on a GPU bf16/fp16 dots run natively with fp32 accumulation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import block_dim, check_triton_device, interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _mla_attn_fwd_kernel(
    Q, KN, KP, V, O, LSE, HEADS, LENS,
    sq_b, sq_t, sq_h, skn_b, skn_s, skn_h, skp_b, skp_s, sv_b, sv_s, sv_h, so_b, so_t, so_h,
    T, S, H_ACT, DN, DR, DV, OFFSET, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DN_P: tl.constexpr, DR_P: tl.constexpr, DV_P: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_HEADS: tl.constexpr, HAS_LENS: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_ACT
    hi = pid_bh % H_ACT
    if HAS_HEADS:
        h = tl.load(HEADS + hi)
    else:
        h = hi
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dn = tl.arange(0, DN_P)
    offs_dr = tl.arange(0, DR_P)
    offs_dv = tl.arange(0, DV_P)
    m_ok = offs_m < T
    s_len = S  # keys of this request: S, or its own length in a padded batch
    if HAS_LENS:
        s_len = tl.load(LENS + b)

    q_base = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t
    qn = tl.load(q_base + offs_dn[None, :], mask=m_ok[:, None] & (offs_dn[None, :] < DN), other=0.0)
    qp = tl.load(q_base + DN + offs_dr[None, :], mask=m_ok[:, None] & (offs_dr[None, :] < DR), other=0.0)
    if UPCAST:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_P], tl.float32)

    end_n = s_len
    if CAUSAL:
        end_n = tl.minimum(s_len, (pid_m + 1) * BLOCK_M + OFFSET)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < s_len
        knT = tl.load(KN + b * skn_b + h * skn_h + offs_n[None, :] * skn_s + offs_dn[:, None],
                      mask=n_ok[None, :] & (offs_dn[:, None] < DN), other=0.0)
        kpT = tl.load(KP + b * skp_b + offs_n[None, :] * skp_s + offs_dr[:, None],
                      mask=n_ok[None, :] & (offs_dr[:, None] < DR), other=0.0)
        vb = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_s + offs_dv[None, :],
                     mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if UPCAST:
            knT = knT.to(tl.float32)
            kpT = kpT.to(tl.float32)
            vb = vb.to(tl.float32)
        s = tl.dot(qn, knT) + tl.dot(qp, kpT)
        s = s * qk_scale
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + OFFSET)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; use 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if UPCAST:
            acc += tl.dot(p, vb)
        else:
            acc += tl.dot(p.to(vb.dtype), vb)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # Rows that saw no key (only when S < T): output 0 and lse = +inf so backward gives p = 0.
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + pid_bh * T + offs_m, lse, mask=m_ok)


@triton.jit
def _mla_attn_bwd_dkv_kernel(
    Q, KN, KP, V, DO, LSE, DELTA, DKN, DKP, DV_OUT, HEADS, LENS,
    sq_b, sq_t, sq_h, skn_b, skn_s, skn_h, skp_b, skp_s, sv_b, sv_s, sv_h, sdo_b, sdo_t, sdo_h,
    T, S, H_ACT, DN, DR, DV, OFFSET, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DN_P: tl.constexpr, DR_P: tl.constexpr, DV_P: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_HEADS: tl.constexpr, HAS_LENS: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key block of one batch row, all active heads: dk_nope and dv per head, and dk_pe
    summed over the heads in a single accumulator (the key is shared)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    s_len = S
    if HAS_LENS:
        s_len = tl.load(LENS + b)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dn = tl.arange(0, DN_P)
    offs_dr = tl.arange(0, DR_P)
    offs_dv = tl.arange(0, DV_P)
    n_ok = offs_n < s_len
    n_out = offs_n < S  # stores cover the padding too: its gradients are written as zeros
    kp = tl.load(KP + b * skp_b + offs_n[:, None] * skp_s + offs_dr[None, :],
                 mask=n_ok[:, None] & (offs_dr[None, :] < DR), other=0.0)
    if UPCAST:
        kp = kp.to(tl.float32)
    dkp = tl.zeros([BLOCK_N, DR_P], tl.float32)
    # First query that can see this key block.
    start_m = 0
    if CAUSAL:
        start_m = tl.maximum(pid_n * BLOCK_N - OFFSET, 0) // BLOCK_M * BLOCK_M
    if HAS_LENS:
        # A key block wholly past this request's length: skip the work, store zero gradients.
        start_m = tl.where(pid_n * BLOCK_N >= s_len, T, start_m)
    for hi in range(0, H_ACT):
        if HAS_HEADS:
            h = tl.load(HEADS + hi)
        else:
            h = hi
        kn = tl.load(KN + b * skn_b + h * skn_h + offs_n[:, None] * skn_s + offs_dn[None, :],
                     mask=n_ok[:, None] & (offs_dn[None, :] < DN), other=0.0)
        vb = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_s + offs_dv[None, :],
                     mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if UPCAST:
            kn = kn.to(tl.float32)
            vb = vb.to(tl.float32)
        dkn = tl.zeros([BLOCK_N, DN_P], tl.float32)
        dvb = tl.zeros([BLOCK_N, DV_P], tl.float32)
        row = (b * H_ACT + hi) * T
        for start_m_i in range(start_m, T, BLOCK_M):
            offs_m = start_m_i + tl.arange(0, BLOCK_M)
            m_ok = offs_m < T
            q_base = Q + b * sq_b + h * sq_h + offs_m[None, :] * sq_t
            qnT = tl.load(q_base + offs_dn[:, None], mask=m_ok[None, :] & (offs_dn[:, None] < DN), other=0.0)
            qpT = tl.load(q_base + DN + offs_dr[:, None], mask=m_ok[None, :] & (offs_dr[:, None] < DR), other=0.0)
            doT = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[None, :] * sdo_t + offs_dv[:, None],
                          mask=m_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
            if UPCAST:
                qnT = qnT.to(tl.float32)
                qpT = qpT.to(tl.float32)
                doT = doT.to(tl.float32)
            lse = tl.load(LSE + row + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
            sT = (tl.dot(kn, qnT) + tl.dot(kp, qpT)) * qk_scale  # (BLOCK_N, BLOCK_M)
            valid = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :] + OFFSET)
            pT = tl.where(valid, tl.exp2(sT - lse[None, :]), 0.0)
            dpT = tl.dot(vb, doT)
            dsT = pT * (dpT - delta[None, :])
            if UPCAST:
                dvb += tl.dot(pT, tl.trans(doT))
                dkn += tl.dot(dsT, tl.trans(qnT))
                dkp += tl.dot(dsT, tl.trans(qpT))
            else:
                dvb += tl.dot(pT.to(doT.dtype), tl.trans(doT))
                dkn += tl.dot(dsT.to(qnT.dtype), tl.trans(qnT))
                dkp += tl.dot(dsT.to(qpT.dtype), tl.trans(qpT))
        tl.store(DKN + b * skn_b + h * skn_h + offs_n[:, None] * skn_s + offs_dn[None, :],
                 (dkn * sm_scale).to(DKN.dtype.element_ty), mask=n_out[:, None] & (offs_dn[None, :] < DN))
        tl.store(DV_OUT + b * sv_b + h * sv_h + offs_n[:, None] * sv_s + offs_dv[None, :],
                 dvb.to(DV_OUT.dtype.element_ty), mask=n_out[:, None] & (offs_dv[None, :] < DV))
    tl.store(DKP + b * skp_b + offs_n[:, None] * skp_s + offs_dr[None, :],
             (dkp * sm_scale).to(DKP.dtype.element_ty), mask=n_out[:, None] & (offs_dr[None, :] < DR))


@triton.jit
def _mla_attn_bwd_dq_kernel(
    Q, KN, KP, V, DO, LSE, DELTA, DQ, HEADS, LENS,
    sq_b, sq_t, sq_h, skn_b, skn_s, skn_h, skp_b, skp_s, sv_b, sv_s, sv_h, sdo_b, sdo_t, sdo_h,
    T, S, H_ACT, DN, DR, DV, OFFSET, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DN_P: tl.constexpr, DR_P: tl.constexpr, DV_P: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_HEADS: tl.constexpr, HAS_LENS: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_ACT
    hi = pid_bh % H_ACT
    if HAS_HEADS:
        h = tl.load(HEADS + hi)
    else:
        h = hi
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dn = tl.arange(0, DN_P)
    offs_dr = tl.arange(0, DR_P)
    offs_dv = tl.arange(0, DV_P)
    m_ok = offs_m < T
    s_len = S
    if HAS_LENS:
        s_len = tl.load(LENS + b)
    q_base = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t
    qn = tl.load(q_base + offs_dn[None, :], mask=m_ok[:, None] & (offs_dn[None, :] < DN), other=0.0)
    qp = tl.load(q_base + DN + offs_dr[None, :], mask=m_ok[:, None] & (offs_dr[None, :] < DR), other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)
        do = do.to(tl.float32)
    row = pid_bh * T
    lse = tl.load(LSE + row + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
    dqn = tl.zeros([BLOCK_M, DN_P], tl.float32)
    dqp = tl.zeros([BLOCK_M, DR_P], tl.float32)
    end_n = s_len
    if CAUSAL:
        end_n = tl.minimum(s_len, (pid_m + 1) * BLOCK_M + OFFSET)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < s_len
        kn = tl.load(KN + b * skn_b + h * skn_h + offs_n[:, None] * skn_s + offs_dn[None, :],
                     mask=n_ok[:, None] & (offs_dn[None, :] < DN), other=0.0)
        kp = tl.load(KP + b * skp_b + offs_n[:, None] * skp_s + offs_dr[None, :],
                     mask=n_ok[:, None] & (offs_dr[None, :] < DR), other=0.0)
        vT = tl.load(V + b * sv_b + h * sv_h + offs_n[None, :] * sv_s + offs_dv[:, None],
                     mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        if UPCAST:
            kn = kn.to(tl.float32)
            kp = kp.to(tl.float32)
            vT = vT.to(tl.float32)
        s = (tl.dot(qn, tl.trans(kn)) + tl.dot(qp, tl.trans(kp))) * qk_scale
        valid = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + OFFSET)
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vT)
        ds = p * (dp - delta[:, None])
        if UPCAST:
            dqn += tl.dot(ds, kn)
            dqp += tl.dot(ds, kp)
        else:
            dqn += tl.dot(ds.to(kn.dtype), kn)
            dqp += tl.dot(ds.to(kp.dtype), kp)
    tl.store(DQ + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_dn[None, :],
             (dqn * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_dn[None, :] < DN))
    tl.store(DQ + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + DN + offs_dr[None, :],
             (dqp * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_dr[None, :] < DR))


# ---- launchers ------------------------------------------------------------------------

def _blocks(dn: int, dr: int, dv: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). One config: multi-config autotune needs a GPU driver,
    and the interpreter runs fastest with few, large blocks."""
    if device.type != "cuda":
        return 32, 32, 4
    widest = max(block_dim(dn) + block_dim(dr), block_dim(dv))
    return (64, 64, 4) if widest <= 128 else (64, 32, 8)


def _meta(q, k_nope, k_pe, v, heads, causal, lengths):
    B, T, H, dqk = q.shape
    S, dn, dr, dv = k_nope.size(1), k_nope.size(-1), k_pe.size(-1), v.size(-1)
    h_act = H if heads is None else heads.numel()
    bm, bn, warps = _blocks(dn, dr, dv, q.device)
    upcast = interpreting() or q.device.type != "cuda" or q.dtype == torch.float32
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, DN_P=block_dim(dn), DR_P=block_dim(dr), DV_P=block_dim(dv),
                CAUSAL=bool(causal), HAS_HEADS=heads is not None, HAS_LENS=lengths is not None, UPCAST=upcast, num_warps=warps)
    return B, T, H, S, dn, dr, dv, h_act, meta


def _strides(q, k_nope, k_pe, v, o):
    return (q.stride(0), q.stride(1), q.stride(2), k_nope.stride(0), k_nope.stride(1), k_nope.stride(2),
            k_pe.stride(0), k_pe.stride(1), v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2))


def mla_attention_fwd(q, k_nope, k_pe, v, scale: float, causal: bool, heads: torch.Tensor | None,
                      lengths: torch.Tensor | None = None):
    """Launch the forward kernel on contiguous inputs. Returns (out (B,T,H,dv), lse (B,Ha,T))."""
    check_triton_device(q, _mla_attn_fwd_kernel)
    B, T, H, S, dn, dr, dv, h_act, meta = _meta(q, k_nope, k_pe, v, heads, causal, lengths)
    out = (torch.zeros if heads is not None else torch.empty)(B, T, H, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, h_act, T, dtype=torch.float32, device=q.device)
    if B * T * h_act == 0:
        return out, lse
    grid = (triton.cdiv(T, meta["BLOCK_M"]), B * h_act)
    _mla_attn_fwd_kernel[grid](
        q, k_nope, k_pe, v, out, lse, heads if heads is not None else lse, lengths if lengths is not None else lse,
        *_strides(q, k_nope, k_pe, v, out),
        T, S, h_act, dn, dr, dv, S - T, scale * LOG2E, **meta,
    )
    return out, lse


def mla_attention_bwd(do, q, k_nope, k_pe, v, out, lse, scale: float, causal: bool, heads: torch.Tensor | None,
                      lengths: torch.Tensor | None = None):
    """Launch the two backward kernels. Returns (dq, dk_nope, dk_pe, dv) in the input dtype."""
    B, T, H, S, dn, dr, dv, h_act, meta = _meta(q, k_nope, k_pe, v, heads, causal, lengths)
    do = do.contiguous()
    zeros_or_empty = torch.zeros if heads is not None else torch.empty
    dq = zeros_or_empty(q.shape, dtype=q.dtype, device=q.device)
    dkn = zeros_or_empty(k_nope.shape, dtype=k_nope.dtype, device=q.device)
    dvv = zeros_or_empty(v.shape, dtype=v.dtype, device=q.device)
    dkp = torch.zeros(k_pe.shape, dtype=k_pe.dtype, device=q.device)
    if B * T * S * h_act == 0:
        return dq, dkn, dkp, dvv
    # delta_i = sum_d dO_i,d * O_i,d: the softmax-backward row term, only for active heads.
    o_act, do_act = (out, do) if heads is None else (out.index_select(2, heads), do.index_select(2, heads))
    delta = (o_act.float() * do_act.float()).sum(-1).transpose(1, 2).contiguous()  # (B, Ha, T)
    strides = (q.stride(0), q.stride(1), q.stride(2), k_nope.stride(0), k_nope.stride(1), k_nope.stride(2),
               k_pe.stride(0), k_pe.stride(1), v.stride(0), v.stride(1), v.stride(2),
               do.stride(0), do.stride(1), do.stride(2))
    heads_arg = heads if heads is not None else lse
    lens_arg = lengths if lengths is not None else lse
    common = (T, S, h_act, dn, dr, dv, S - T, scale * LOG2E, scale)
    _mla_attn_bwd_dkv_kernel[(triton.cdiv(S, meta["BLOCK_N"]), B)](
        q, k_nope, k_pe, v, do, lse, delta, dkn, dkp, dvv, heads_arg, lens_arg, *strides, *common, **meta)
    _mla_attn_bwd_dq_kernel[(triton.cdiv(T, meta["BLOCK_M"]), B * h_act)](
        q, k_nope, k_pe, v, do, lse, delta, dq, heads_arg, lens_arg, *strides, *common, **meta)
    return dq, dkn, dkp, dvv


class MLAAttentionTriton(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k_nope, k_pe, v, out, lse); backward recomputes
    probabilities block by block from lse (no T x S matrix is ever stored)."""

    @staticmethod
    def forward(ctx, q, k_nope, k_pe, v, scale, causal, heads, lengths=None):
        q, k_nope, k_pe, v = (t.contiguous() for t in (q, k_nope, k_pe, v))
        out, lse = mla_attention_fwd(q, k_nope, k_pe, v, scale, causal, heads, lengths)
        ctx.save_for_backward(q, k_nope, k_pe, v, out, lse)
        ctx.scale, ctx.causal, ctx.heads, ctx.lengths = scale, causal, heads, lengths
        return out

    @staticmethod
    def backward(ctx, do):
        q, k_nope, k_pe, v, out, lse = ctx.saved_tensors
        dq, dkn, dkp, dv = mla_attention_bwd(do, q, k_nope, k_pe, v, out, lse, ctx.scale, ctx.causal, ctx.heads,
                                             ctx.lengths)
        return dq, dkn, dkp, dv, None, None, None, None
