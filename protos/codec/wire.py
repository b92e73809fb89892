"""Tensors of one update <-> the repeated ``LowRankFactor`` / ``DenseUpdate`` fields of a
``fedmla.v1.ModelUpdate``, with validation of everything received.

The same :class:`TensorCodec` encodes and decodes both directions:

- uplink (worker -> coordinator): rank ``cfg.rank``, ``cfg.factor_bits`` / ``cfg.dense_bits``,
  per-head rows/columns restricted to the round's active heads;
- downlink (coordinator -> workers): rank ``cfg.down_rank``, ``cfg.downlink_bits``, no head
  restriction.

The encoder reconstructs what it sent through exactly the code the decoder runs, so the
error-feedback residual is exactly "input minus what the receiver will see".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fedmla.mla_model import MLAConfig
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.limits import clip
from fedmla.protos.tensors import (TensorDecodeError, decode_array, encode_int_rows, encode_tensor, int_rows_message,
                                   int_rows_payload, unpack_codes)

from . import sparse
from .config import VOCAB_TENSORS, CodecConfig
from .layout import RoundPlan, Selection, compress, effective_basis, is_lowrank, reconstruct, selection_for
from .quant import (FINITE_SCALE_BOUND, code_range, container_bits, dequantize_rows, dequantize_rows_into,
                    quantize_pack_rows, quantize_rows, scales_are_half)


_FLOAT32_ONLY = frozenset({pb.FLOAT32})



def _all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity in ``a`` (two reductions, no temporary: min/max propagate NaN)."""
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


class UpdateDecodeError(ValueError):
    """A received update does not match the model, the round plan or the codec config."""


@dataclass
class Part:
    """One received tensor, still compact: factors (or a dense sub-tensor) and where it goes."""

    sel: Selection
    side: str | None = None            # None: both factors (svd); "left"/"right": shared basis
    basis: torch.Tensor | None = None  # effective basis (shared, not owned)
    left: torch.Tensor | None = None   # (r, m') float32
    right: torch.Tensor | None = None  # (r, n') float32
    value: torch.Tensor | None = None  # dense sub-tensor, float32

    def product(self) -> torch.Tensor:
        """The float32 sub-tensor this part stands for, on the selection's rows/columns only."""
        sub = self.value if self.value is not None else reconstruct(self.left, self.right, self.side, self.basis)
        return sub.float()

    def dense(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The full-shape float32 tensor this part stands for (zeros outside the selection)."""
        return self.sel.scatter(self.product(), shape)


@dataclass
class DecodedTensors:
    parts: dict[str, Part] = field(default_factory=dict)


def _quant_encode(x: torch.Tensor, bits: int, cfg: CodecConfig, gen: torch.Generator) -> tuple[pb.Tensor, torch.Tensor]:
    """(message, what the receiver will decode) for a 2-D float tensor."""
    if bits == 0:
        x32 = x.float().contiguous()
        return encode_tensor(x32), x32
    if not cfg.stochastic_rounding and not cfg.fit_scales:
        # numpy / numba: the same codes, message and dequantised values (tests/codec/test_quant_encode_np.py)
        x32 = x.detach().float().contiguous()
        deq = torch.empty(x32.shape, dtype=torch.float32)
        raw, sn, half = quantize_pack_rows(x32.numpy(), bits, cfg.half_scales, deq.numpy())
        return int_rows_message(raw, x32.shape, sn, container_bits(bits), half, cfg.entropy_coding), deq
    q, scales = quantize_rows(x, bits, cfg.stochastic_rounding, gen, fit=cfg.fit_scales, half_scales=cfg.half_scales)
    half = cfg.half_scales and scales_are_half(scales)
    msg = encode_int_rows(q, scales, container_bits(bits), cfg.stochastic_rounding, half_scales=half,
                          compress=cfg.entropy_coding)
    return msg, dequantize_rows(q, scales, bits)


class TensorCodec:
    """Encode/decode the tensor fields of a ModelUpdate for one model and codec config."""

    def __init__(self, model_cfg: MLAConfig, cfg: CodecConfig, shapes: dict[str, tuple[int, ...]]):
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self._basis_cache: dict = {}
        # name -> Selection, for no mask and for the last mask seen (kept with its version
        # counter: a mask changed in place is a new key); selection_for costs ~10 torch calls
        self._sels_all: dict[str, Selection] = {}
        self._sels_mask: tuple = (None, -1, {})
        # the fast decode's table of the last plan decoded against (batch_decode.PlanTable)
        self._plan_table = None

    def _selection(self, name: str, mask: torch.Tensor | None) -> Selection:
        if mask is None:
            sels = self._sels_all
        else:
            held, version, sels = self._sels_mask
            if held is not mask or version != mask._version:
                sels = {}
                self._sels_mask = (mask, mask._version, sels)
        sel = sels.get(name)
        if sel is None:
            sel = sels[name] = selection_for(name, self.shapes[name], self.model_cfg, self.cfg, mask)
        return sel

    # ---- shared helpers ----------------------------------------------------------------------
    def _layout(self, name: str, plan: RoundPlan, uplink: bool):
        shape = self.shapes[name]
        sel = self._selection(name, plan.mask if uplink else None)
        if not is_lowrank(shape, self.cfg):
            return sel, "dense", None, None
        if self.cfg.sparse(uplink):
            return sel, "sparse", None, None
        if self.cfg.method in ("svd", "topk") or plan.round < self.cfg.powersgd_warmup_rounds:
            return sel, "lowrank", None, None
        basis = plan.shared.bases[name]
        key = (name, basis.side, tuple(sel.heads) if sel.heads is not None else None)
        hit = self._basis_cache.get(key)
        if hit is not None and hit[0] is basis.matrix:   # same shared basis object: reuse
            b = hit[1]
        else:
            b = effective_basis(basis, sel)
            self._basis_cache[key] = (basis.matrix, b)
        return sel, "lowrank", basis.side, b

    def _bits(self, uplink: bool, dense: bool, name: str = "") -> int:
        if not dense and name in VOCAB_TENSORS:
            bits = self.cfg.embed_factor_bits if uplink else self.cfg.embed_downlink_bits
            if bits is not None:
                return bits
        if not uplink:
            return self.cfg.downlink_bits
        return self.cfg.dense_bits if dense else self.cfg.factor_bits

    # ---- encode ------------------------------------------------------------------------------
    def encode(self, tensors: dict[str, torch.Tensor], plan: RoundPlan, uplink: bool, gen: torch.Generator
               ) -> tuple[list[pb.LowRankFactor], list[pb.DenseUpdate], dict[str, torch.Tensor]]:
        """Compress ``tensors`` (full shapes). Returns the factor and dense messages and, per
        name, the full-shape float32 tensor the receiver will reconstruct (absent: not sent)."""
        cfg = self.cfg
        factors, dense, sent = [], [], {}
        for name in sorted(tensors):
            if name not in self.shapes:
                raise KeyError(f"{name!r} is not a parameter of this model")
            x = tensors[name].detach().float()
            shape = self.shapes[name]
            if tuple(x.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(x.shape)}, expected {shape}")
            sel, kind, side, b = self._layout(name, plan, uplink)
            heads = pb.HeadSelection(heads=sel.heads) if sel.heads is not None else None
            xs = sel.take(x)
            if kind == "sparse":
                msg, deq = self._encode_sparse(xs, uplink, gen)
                dense.append(pb.DenseUpdate(name=name, sparse=msg, heads=heads))
                sent[name] = Part(sel=sel, value=deq).dense(shape)
                continue
            if kind == "dense":
                if not plan.send_dense:
                    continue
                bits = self._bits(uplink, True)
                rows = xs.reshape(1, -1) if xs.dim() < 2 else xs
                msg, deq = _quant_encode(rows, bits, cfg, gen)
                dense.append(pb.DenseUpdate(name=name, value=msg, heads=heads))
                sent[name] = Part(sel=sel, value=deq.reshape(xs.shape)).dense(shape)
                continue
            left, right = compress(xs, side, b, cfg.rank_for(name, plan.round, uplink), cfg, gen)
            bits = self._bits(uplink, False, name)
            f = pb.LowRankFactor(name=name, rank=(left if left is not None else right).size(0), heads=heads)
            dl = dr = None
            if left is not None:
                m, dl = _quant_encode(left, bits, cfg, gen)
                f.left.CopyFrom(m)
            if right is not None:
                m, dr = _quant_encode(right, bits, cfg, gen)
                f.right.CopyFrom(m)
            factors.append(f)
            sent[name] = Part(sel=sel, side=side, basis=b, left=dl, right=dr).dense(shape)
        return factors, dense, sent

    # ---- chunked top-k (see sparse.py) ---------------------------------------------------------
    def _encode_sparse(self, xs: torch.Tensor, uplink: bool, gen: torch.Generator):
        bits = self.cfg.topk_bits
        return sparse.encode(xs, self.cfg.topk_chunk, self.cfg.topk_k_for(uplink),
                             lambda v: _quant_encode(v, bits, self.cfg, gen))

    def _decode_sparse(self, msg: pb.SparseChunks, name: str, sub: tuple[int, ...], uplink: bool) -> torch.Tensor:
        bits = self.cfg.topk_bits
        try:
            return sparse.decode(msg, name, sub, self.cfg.topk_chunk, self.cfg.topk_k_for(uplink),
                                 lambda m, what, shape: self._tensor(m, what, shape, bits))
        except sparse.SparseDecodeError as e:
            raise UpdateDecodeError(str(e)) from None

    # ---- decode ------------------------------------------------------------------------------
    def _tensor(self, msg: pb.Tensor, what: str, shape: tuple[int, int], bits: int) -> torch.Tensor:
        """Decode a float tensor that must have logical ``shape``; quantised iff ``bits``.

        numpy throughout (see :mod:`fedmla.protos.tensors`), into a fresh torch tensor: the
        same values, bits and refusals as :func:`decode_int_rows` + :func:`dequantize_rows`
        + ``isfinite``, at a fraction of the per-call cost."""
        n = math.prod(shape)
        try:
            if bits:
                m = int_rows_payload(msg, what, max_elements=n)
                if m.bits != container_bits(bits):
                    raise UpdateDecodeError(f"{what}: {m.bits}-bit payload, this run uses {bits}-bit")
                q = unpack_codes(m.data, m.rows, m.cols, m.bits)
                lo, hi = code_range(bits)
                # Only a bound the container can pass needs a look: int8 reaches -128 (below
                # -127), int4 -8 (below -7; and +-4..7 beyond 3-bit's +-3); every 2-bit code
                # is valid. (abs() of int8 -128 is -128, hence min and max.)
                c_lo, c_hi = -(1 << (m.bits - 1)), (1 << (m.bits - 1)) - 1
                if q.size and ((lo > c_lo and int(np.minimum.reduce(q, axis=None)) < lo)
                               or (hi < c_hi and int(np.maximum.reduce(q, axis=None)) > hi)):
                    span = f"+-{hi}" if lo == -hi else f"[{lo}, {hi}]"
                    raise UpdateDecodeError(f"{what}: integer codes beyond {span}, the range of "
                                            f"{bits}-bit quantisation")
                if m.rows * m.cols != n:
                    raise UpdateDecodeError(f"{what}: shape {[m.rows, m.cols]}, expected {list(shape)}")
                # a fresh torch allocation (aligned as torch aligns), the values written by numpy
                t = torch.empty(shape, dtype=torch.float32)
                # finite codes times finite scales this small cannot overflow (see quant.py)
                if m.scale_max <= FINITE_SCALE_BOUND:
                    dequantize_rows_into(q, m.scales, bits, t.numpy().reshape(m.rows, m.cols))
                    return t
                with np.errstate(over="ignore"):                 # refused below, not warned about
                    dequantize_rows_into(q, m.scales, bits, t.numpy().reshape(m.rows, m.cols))
            else:
                a = decode_array(msg, what, max_elements=n, allowed=_FLOAT32_ONLY)
                if a.size != n:
                    raise UpdateDecodeError(f"{what}: shape {list(a.shape)}, expected {list(shape)}")
                t = torch.empty(shape, dtype=torch.float32)
                t.numpy()[...] = a.reshape(shape)
        except TensorDecodeError as e:
            raise UpdateDecodeError(str(e)) from None
        if n and not _all_finite(t.numpy()):
            raise UpdateDecodeError(f"{what}: non-finite values")
        return t

    def _check_heads(self, name: str, got: pb.HeadSelection | None, sel: Selection) -> None:
        if got is not None and len(got.heads) > self.model_cfg.n_heads:   # before copying the list
            raise UpdateDecodeError(f"{name}: {len(got.heads)} head indices, the model has "
                                    f"{self.model_cfg.n_heads} heads per layer")
        heads = list(got.heads) if got is not None else None
        if (heads or None) != sel.heads:
            raise UpdateDecodeError(f"{name}: covers heads {heads or 'all'}, the round's active heads are "
                                    f"{sel.heads if sel.heads is not None else 'all'}")

    def expected(self, plan: RoundPlan, uplink: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
        """What a complete update of this plan holds: name -> (kind, element counts).

        kind "lowrank": counts (r*m, r*n) of the left/right factors (0 for a factor the
        layout does not send); kind "dense": (elements,). Dense tensors appear only in
        rounds that send them. Every bound on a received update derives from this."""
        out = {}
        for name, shape in self.shapes.items():
            sel, kind, side, b = self._layout(name, plan, uplink)
            sub = sel.sub_shape(shape)
            if kind == "sparse":
                out[name] = ("sparse", (math.prod(sub),))
                continue
            if kind == "dense":
                if plan.send_dense:
                    out[name] = ("dense", (math.prod(sub),))
                continue
            m, n = sub
            r = self.factor_rank(name, plan, uplink, side, b, m, n)
            out[name] = ("lowrank", (r * m if side in (None, "right") else 0, r * n if side in (None, "left") else 0))
        return out

    def factor_rank(self, name: str, plan: RoundPlan, uplink: bool, side: str | None, b: torch.Tensor | None,
                    m: int, n: int) -> int:
        """The rank of ``name``'s (m', n') factors in ``plan``: the config's rank for the
        tensor, round and direction (at most min(m', n')), or the shared basis' width."""
        return min(self.cfg.rank_for(name, plan.round, uplink), m, n) if side is None else b.size(1)

    def _encoded_bytes(self, rows: int, cols: int, bits: int) -> int:
        """Largest encoding of an (rows, cols) tensor at ``bits`` (0: float32): packed codes
        plus float32 scales (DEFLATE is only used when it is smaller)."""
        if rows * cols == 0:
            return 0
        if not bits:
            return 4 * rows * cols
        return rows * math.ceil(cols * container_bits(bits) / 8) + 4 * rows

    def max_update_bytes(self, plan: RoundPlan, uplink: bool = True, metrics_bytes: int = 0) -> int:
        """The largest serialized ModelUpdate a well-formed client can send for ``plan``:
        every tensor at its plan shape and the run's bit widths, plus per-field framing,
        importance and ``metrics_bytes`` of metrics. Anything larger is refused unread."""
        total = 256 + metrics_bytes + 4 * self.model_cfg.n_layers * self.model_cfg.n_heads   # framing, importance
        for name, (kind, counts) in self.expected(plan, uplink).items():
            sub = self._selection(name, plan.mask if uplink else None).sub_shape(self.shapes[name])
            if kind == "sparse":
                total += sparse.max_bytes(counts[0], self.cfg.topk_chunk, self.cfg.topk_k_for(uplink),
                                          lambda r, c: self._encoded_bytes(r, c, self.cfg.topk_bits))
            elif kind == "dense":
                cols = counts[0] if len(sub) < 2 else sub[1]
                total += self._encoded_bytes(counts[0] // max(cols, 1), cols, self._bits(uplink, True))
            else:
                m, n = sub
                for count, width in zip(counts, (m, n)):
                    if count:
                        total += self._encoded_bytes(count // width, width, self._bits(uplink, False, name))
            total += 96 + 2 * len(name) + 6 * self.model_cfg.n_heads    # tags, lengths, header fields, heads
        return total

    def decoded_elements(self, plan: RoundPlan, uplink: bool = True) -> int:
        """Float32 elements a fully decoded update of ``plan`` holds (its memory is 4x this)."""
        return sum(sum(counts) for _, counts in self.expected(plan, uplink).values())

    def _entry(self, name: str, out: DecodedTensors, plan: RoundPlan, uplink: bool, kind: str):
        """(selection, side, basis) of one received entry, refused when its name is unknown,
        repeated, or of the other kind (``lowrank`` factor / ``dense`` value) under the plan."""
        what = {"lowrank": "factor", "dense": "dense update", "sparse": "sparse update"}[kind]
        if name not in self.shapes:
            raise UpdateDecodeError(f"{what} for unknown parameter {clip(name)}")
        if name in out.parts:
            raise UpdateDecodeError(f"{name}: sent twice")
        sel, sent_as, side, b = self._layout(name, plan, uplink)
        if sent_as != kind:
            label = {"lowrank": "low-rank", "dense": "dense", "sparse": "top-k sparse"}
            raise UpdateDecodeError(f"{name}: {label[kind]} update for a tensor this codec sends {label[sent_as]}")
        return sel, side, b

    def decode(self, factors, dense, plan: RoundPlan, uplink: bool) -> DecodedTensors:
        """Validate and dequantise received factor/dense messages against the plan."""
        out = DecodedTensors()
        for f in factors:
            name = f.name
            sel, side, b = self._entry(name, out, plan, uplink, "lowrank")
            self._check_heads(name, f.heads if f.HasField("heads") else None, sel)
            m, n = sel.sub_shape(self.shapes[name])
            r = self.factor_rank(name, plan, uplink, side, b, m, n)
            if f.rank != r:
                raise UpdateDecodeError(f"{name}: rank {f.rank}, expected {r}")
            want_left, want_right = side in (None, "right"), side in (None, "left")
            if f.HasField("left") != want_left or f.HasField("right") != want_right:
                raise UpdateDecodeError(f"{name}: expected {'left ' if want_left else ''}"
                                        f"{'right' if want_right else ''} factor(s) for this round's layout")
            bits = self._bits(uplink, False, name)
            left = self._tensor(f.left, f"{name}.left", (r, m), bits) if want_left else None
            right = self._tensor(f.right, f"{name}.right", (r, n), bits) if want_right else None
            out.parts[name] = Part(sel=sel, side=side, basis=b, left=left, right=right)
        for d in dense:
            name = d.name
            if d.HasField("sparse"):
                sel, _, _ = self._entry(name, out, plan, uplink, "sparse")
                if d.HasField("value"):
                    raise UpdateDecodeError(f"{name}: both a dense value and sparse entries")
                self._check_heads(name, d.heads if d.HasField("heads") else None, sel)
                sub = sel.sub_shape(self.shapes[name])
                out.parts[name] = Part(sel=sel, value=self._decode_sparse(d.sparse, name, sub, uplink))
                continue
            sel, _, _ = self._entry(name, out, plan, uplink, "dense")
            if not plan.send_dense:
                raise UpdateDecodeError(f"{name}: dense tensors are not sent in round {plan.round}")
            self._check_heads(name, d.heads if d.HasField("heads") else None, sel)
            sub = sel.sub_shape(self.shapes[name])
            bits = self._bits(uplink, True)
            rows = (1, math.prod(sub)) if len(sub) < 2 else sub
            value = self._tensor(d.value, name, rows, bits).reshape(sub)
            out.parts[name] = Part(sel=sel, value=value)
        return out
