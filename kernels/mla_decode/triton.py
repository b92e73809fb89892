"""Triton kernels for absorbed MLA decode over the latent cache (FlashMLA / FlashDecoding style).

Shapes: q_latent (B, H, c), q_pe (B, H, dr), kv_cache (B, Tmax, c), pe_cache (B, Tmax, dr),
lengths (B,) int32; out (B, H, c).

Stage 1 (``_mla_decode_split_kernel``), grid (B, splits): a program owns one request and
one slice of its valid cache, loads the query of ALL heads as an (H, c) tile and streams
the slice's latent and rope rows once for all heads, with an online softmax in fp32.
It writes a normalised partial output and its log-sum-exp (base 2) per head.
Stage 2 (``_mla_decode_merge_kernel``), grid (B, H): merges the splits by log-sum-exp.
Splitting along T keeps the GPU busy when B is small and contexts are long; each
request splits its own length, so requests of different lengths share one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import block_dim, check_triton_device, interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _mla_decode_split_kernel(
    QL, QP, KV, PE, LENS, PO, PLSE,
    sql_b, sql_h, sqp_b, sqp_h, skv_b, skv_t, spe_b, spe_t,
    H, C, DR, NUM_SPLITS, qk_scale,
    BLOCK_N: tl.constexpr, H_P: tl.constexpr, C_P: tl.constexpr, DR_P: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(LENS + b)
    # Each split covers a whole number of key blocks of this request's own length.
    per_split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)

    offs_h = tl.arange(0, H_P)
    offs_c = tl.arange(0, C_P)
    offs_r = tl.arange(0, DR_P)
    h_ok = offs_h < H
    c_ok = offs_c < C
    r_ok = offs_r < DR
    ql = tl.load(QL + b * sql_b + offs_h[:, None] * sql_h + offs_c[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)
    qp = tl.load(QP + b * sqp_b + offs_h[:, None] * sqp_h + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    if UPCAST:
        ql = ql.to(tl.float32)
        qp = qp.to(tl.float32)

    m_i = tl.full([H_P], float("-inf"), tl.float32)
    l_i = tl.zeros([H_P], tl.float32)
    acc = tl.zeros([H_P, C_P], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        # One read of the latent and rope rows serves every head.
        kv = tl.load(KV + b * skv_b + offs_n[:, None] * skv_t + offs_c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        pe = tl.load(PE + b * spe_b + offs_n[:, None] * spe_t + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            kv = kv.to(tl.float32)
            pe = pe.to(tl.float32)
        s = (tl.dot(ql, tl.trans(kv)) + tl.dot(qp, tl.trans(pe))) * qk_scale  # (H_P, BLOCK_N)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, kv)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    row = b * NUM_SPLITS + split
    tl.store(PO + (row * H + offs_h[:, None]) * C + offs_c[None, :], out, mask=h_ok[:, None] & c_ok[None, :])
    tl.store(PLSE + row * H + offs_h, lse, mask=h_ok)


@triton.jit
def _mla_decode_merge_kernel(
    PO, PLSE, OUT, so_b, so_h, H, C, NUM_SPLITS,
    C_P: tl.constexpr, SPLITS_P: tl.constexpr,
):
    """out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse); empty splits have
    lse = -inf and weigh nothing."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_c = tl.arange(0, C_P)
    offs_s = tl.arange(0, SPLITS_P)
    s_ok = offs_s < NUM_SPLITS
    rows = (b * NUM_SPLITS + offs_s) * H + h
    lse = tl.load(PLSE + rows, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(PO + rows[:, None] * C + offs_c[None, :], mask=s_ok[:, None] & (offs_c[None, :] < C), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + b * so_b + h * so_h + offs_c, out.to(OUT.dtype.element_ty), mask=offs_c < C)


def default_num_splits(batch: int, max_len: int, device: torch.device) -> int:
    """Enough splits to give a GPU about 64 programs, each at least 256 keys long."""
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(max_len, 256)))
    return max(1, min(triton.cdiv(64, max(batch, 1)), triton.cdiv(max_len, 256), 32))


def mla_decode_triton(q_latent, q_pe, kv_cache, pe_cache, lengths, scale: float, num_splits: int | None = None):
    """Launch both stages. lengths: (B,) int32 on the cache's device. Returns (B, H, c)."""
    check_triton_device(q_latent, _mla_decode_split_kernel)
    B, H, C = q_latent.shape
    Tmax, DR = kv_cache.size(1), pe_cache.size(-1)
    q_latent, q_pe = q_latent.contiguous(), q_pe.contiguous()
    if kv_cache.stride(-1) != 1:
        kv_cache = kv_cache.contiguous()
    if pe_cache.stride(-1) != 1:
        pe_cache = pe_cache.contiguous()
    out = torch.empty(B, H, C, dtype=q_latent.dtype, device=q_latent.device)
    if B * H == 0:
        return out
    splits = num_splits or default_num_splits(B, Tmax, q_latent.device)
    part_o = torch.empty(B, splits, H, C, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(B, splits, H, dtype=torch.float32, device=q_latent.device)
    C_P, DR_P, H_P = block_dim(C), block_dim(DR), block_dim(H)
    upcast = interpreting() or q_latent.device.type != "cuda" or q_latent.dtype == torch.float32
    block_n = 32 if C_P <= 256 else 16
    _mla_decode_split_kernel[(B, splits)](
        q_latent, q_pe, kv_cache, pe_cache, lengths, part_o, part_lse,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1),
        H, C, DR, splits, scale * LOG2E,
        BLOCK_N=block_n, H_P=H_P, C_P=C_P, DR_P=DR_P, UPCAST=upcast, num_warps=8 if C_P >= 512 else 4,
    )
    _mla_decode_merge_kernel[(B, H)](part_o, part_lse, out, out.stride(0), out.stride(1), H, C, splits,
                                       C_P=C_P, SPLITS_P=block_dim(splits, 2))
    return out
