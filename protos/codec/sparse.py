"""Chunked top-k of a 2-D update (``method='topk'``, SparseLoCo, arXiv 2508.15706).

A tensor (its head-selected sub-tensor), flattened row-major to N elements, is cut into
C = max(1, N // chunk) chunks of ``chunk`` elements, the last one taking the remainder, so
every chunk holds at least min(chunk, N) and fewer than 2 * chunk elements. Each chunk
keeps its k = min(k, N) largest magnitudes. On the wire (``fedmla.v1.SparseChunks``):

- positions: within-chunk, sorted, as gaps (first position, then difference - 1), uint16,
  planar (low bytes, then high bytes: the high bytes are nearly all zero), DEFLATEd when
  that is smaller; about 7-8 bits per kept entry at k/chunk = 1/64 instead of 12;
- values: a (C, k) row-quantised tensor, one scale per chunk (2 bits by default: the
  quantiser's four levels +-s/2, +-3s/2, i.e. sign plus one magnitude bit).

Everything else (what is not kept, quantisation error) stays in the sender's
error-feedback residual, as for the low-rank methods.
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np
import torch

from fedmla.protos.fedmla.v1 import types_pb2 as pb

MAX_CHUNK = 1 << 14   # chunks hold < 2 * chunk elements: positions and gaps fit uint16


class SparseDecodeError(ValueError):
    """A received SparseChunks message does not fit its tensor or the codec config."""


def layout(n: int, chunk: int, k: int) -> tuple[int, int]:
    """(number of chunks C, entries kept per chunk) of an n-element tensor."""
    if n <= 0:
        raise ValueError("a sparse tensor needs at least one element")
    if not 1 <= chunk <= MAX_CHUNK or k < 1:
        raise ValueError(f"chunk must be in [1, {MAX_CHUNK}] and k >= 1, got chunk {chunk}, k {k}")
    return max(1, n // chunk), min(k, n)


def _starts_and_lengths(n: int, chunk: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(c, dtype=torch.int64) * chunk
    lengths = torch.full((c,), chunk, dtype=torch.int64)
    lengths[-1] = n - (c - 1) * chunk
    return starts, lengths


def select(flat: torch.Tensor, chunk: int, k: int) -> torch.Tensor:
    """Sorted within-chunk positions (C, k) int64 of each chunk's k largest |flat|."""
    n = flat.numel()
    c, k = layout(n, chunk, k)
    a = flat.abs()
    body = (c - 1) * chunk
    parts = []
    if c > 1:
        parts.append(torch.topk(a[:body].view(c - 1, chunk), k, dim=1, sorted=False).indices)
    parts.append(torch.topk(a[body:], k, sorted=False).indices.view(1, k))
    return torch.cat(parts).sort(dim=1).values


def _deflate(data: bytes) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return co.compress(data) + co.flush()


def encode_positions(pos: torch.Tensor) -> tuple[bytes, int]:
    """(bytes, pb.Compression) of sorted within-chunk positions (C, k)."""
    gaps = pos.clone()
    gaps[:, 1:] = pos[:, 1:] - pos[:, :-1] - 1
    raw = np.ascontiguousarray(gaps.numpy().astype("<u2").reshape(-1).view(np.uint8).reshape(-1, 2).T).tobytes()
    packed = _deflate(raw)
    return (packed, pb.DEFLATE) if len(packed) < len(raw) else (raw, pb.COMPRESSION_NONE)


def decode_positions(data: bytes, compression: int, c: int, k: int, what: str) -> torch.Tensor:
    """Within-chunk positions (C, k) int64 from their wire form; at most 2*C*k bytes are inflated."""
    expected = 2 * c * k
    if compression == pb.DEFLATE:
        d = zlib.decompressobj(-15)
        try:
            raw = d.decompress(data, expected + 1)
        except zlib.error as e:
            raise SparseDecodeError(f"{what}: corrupt DEFLATE positions ({e})") from None
        if len(raw) != expected or not d.eof or d.unused_data or d.unconsumed_tail:
            raise SparseDecodeError(f"{what}: positions do not inflate to the expected {expected} bytes")
    elif compression == pb.COMPRESSION_NONE:
        raw = data
        if len(raw) != expected:
            raise SparseDecodeError(f"{what}: {len(raw)} position bytes, expected {expected} ({c} chunks x {k})")
    else:
        raise SparseDecodeError(f"{what}: unknown positions compression {compression}")
    b = np.frombuffer(raw, dtype=np.uint8).reshape(2, c * k).astype(np.int64)
    gaps = torch.from_numpy(b[0] | (b[1] << 8)).view(c, k)
    return torch.cumsum(gaps + 1, dim=1) - 1


def encode(x: torch.Tensor, chunk: int, k: int, quant_encode: Callable[[torch.Tensor], tuple[pb.Tensor, torch.Tensor]]
           ) -> tuple[pb.SparseChunks, torch.Tensor]:
    """(message, what the receiver will decode, float32 of x's shape) for a float tensor x.

    ``quant_encode(values (C, k)) -> (Tensor message, dequantised values)``."""
    flat = x.detach().float().reshape(-1)
    n = flat.numel()
    pos = select(flat, chunk, k)
    c, kk = pos.shape
    starts, _ = _starts_and_lengths(n, chunk, c)
    idx = (starts.view(c, 1) + pos).view(-1)
    vmsg, deq = quant_encode(flat[idx].view(c, kk).contiguous())
    data, comp = encode_positions(pos)
    out = torch.zeros(n)
    out[idx] = deq.reshape(-1).float()
    return pb.SparseChunks(chunk=chunk, k=kk, positions=data, positions_compression=comp, values=vmsg), out.view(x.shape)


def decode(msg: pb.SparseChunks, what: str, shape: tuple[int, ...], chunk: int, k: int,
           decode_values: Callable[[pb.Tensor, str, tuple[int, int]], torch.Tensor]) -> torch.Tensor:
    """The float32 tensor of ``shape`` a SparseChunks message stands for. Its chunk and k
    must be the ones this codec uses for ``shape``; positions are bounded by the chunk
    layout before anything is inflated. ``decode_values(message, what, (C, k))`` decodes
    and validates the values."""
    n = 1
    for s in shape:
        n *= int(s)
    c, kk = layout(n, chunk, k)
    if msg.chunk != chunk or msg.k != kk:
        raise SparseDecodeError(f"{what}: chunk {msg.chunk}, k {msg.k}; this tensor is sent with chunk {chunk}, "
                                f"k {kk}")
    pos = decode_positions(msg.positions, msg.positions_compression, c, kk, what)
    starts, lengths = _starts_and_lengths(n, chunk, c)
    if bool((pos[:, -1] >= lengths).any()):
        bad = int((pos[:, -1] >= lengths).nonzero()[0, 0])
        raise SparseDecodeError(f"{what}: position {int(pos[bad, -1])} beyond chunk {bad} of "
                                f"{int(lengths[bad])} elements")
    if not msg.HasField("values"):
        raise SparseDecodeError(f"{what}: no values")
    values = decode_values(msg.values, f"{what}.values", (c, kk))
    out = torch.zeros(n)
    out[(starts.view(c, 1) + pos).view(-1)] = values.reshape(-1).float()
    return out.view(shape)


def max_bytes(n: int, chunk: int, k: int, value_bytes: Callable[[int, int], int]) -> int:
    """Largest encoding of an n-element tensor: raw positions (DEFLATE only when smaller),
    ``value_bytes(C, k)`` of values, and framing."""
    c, kk = layout(n, chunk, k)
    return 2 * c * kk + value_bytes(c, kk) + 48
