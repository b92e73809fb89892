"""ClientCodec.encode gives main's bits: the same serialized messages and residuals over
three rounds, for both models the simulate and bench commands use and configs covering
every encode path (bit widths, float32, scheduled ranks, unrotated factors, top-k,
PowerSGD, dense, stochastic rounding, fitted scales, held-back dense tensors, no head
selection, no error feedback), with the compiled quantiser and with the numpy one.

The digests were pinned from the code of main at 10aa94d (before the compiled quantiser)
by running :func:`_digest` there, on the development machine (torch 2.13 with MKL, AMD
EPYC). Float64 LAPACK/BLAS may round differently on another CPU or library build, and
then every digest differs for reasons of the machine, not of the code: the test checks
that first (:func:`_platform`, raw torch and zlib calls only) and skips with the reason.
"""

import functools
import hashlib

import numpy as np
import pytest
import torch

from fedmla.mla_model import MLAConfig
from fedmla.protos.codec import ClientCodec, CodecConfig, RoundPlan, ServerCodec, SharedState
from fedmla.protos.codec import quant
from fedmla.protos.tensors import deflate
from fedmla.worker.trainer import init_global_state

MODELS = {"tiny": MLAConfig.preset("tiny"),                   # fedmla simulate's model
          "d256": MLAConfig.preset("tiny").model_copy(update={"dim": 256, "inter_dim": 1024})}   # bench comm's
CONFIGS = {
    "default": {}, "bits4": dict(factor_bits=4), "int8": dict(factor_bits=8, dense_bits=8),
    "bits2": dict(factor_bits=2, dense_bits=4, half_scales=False), "fp32": dict(factor_bits=0, dense_bits=0),
    "late": dict(late_from=1, late_rank=6), "norot": dict(rotate_factors=False),
    "topk": dict(method="topk"), "powersgd": dict(method="powersgd"), "dense": dict(method="dense"),
    "stoch": dict(stochastic_rounding=True), "fit": dict(fit_scales=True), "every2": dict(dense_every=2),
    "noentropy": dict(entropy_coding=False, factor_bits=4), "ranks": dict(ffn_rank=7, embed_rank=9, embed_factor_bits=8),
    "noheads": dict(head_selection=False), "noef": dict(error_feedback=False, residual_decay=0.5),
    "pow0": dict(svd_power_iters=0, svd_oversample=0),
}
MAIN = {
    "tiny/default": "20c735c695e0e7ed8db99141476f134b87e39171f36b73b92a9c1e04a0b2cf46",
    "tiny/bits4": "924bd23de92005525a2e6f04fda68ea462d17ee73d85e350f07976b27ccbf913",
    "tiny/int8": "df5d86e805191de6b315c74f8f438f935bfc7bdbe24e5712ca2d88e278aca1cd",
    "tiny/bits2": "97cd40b7ae4dbd19f3a991952c44782f4729ba28fcf40970cefa8d8e838c5c20",
    "tiny/fp32": "87cee811b40029938f278675fea76ccd33722e093b7cb786e9bbf71fa0141187",
    "tiny/late": "8609e941d0440f535b459eca32f6434ed7c4e1d74b7b54ebcd5a51c1f53ab692",
    "tiny/norot": "2a84e0f4575ad85a7fc887eea33a79e084921b5821b17ab8f7bf520ae046060a",
    "tiny/topk": "b47bf74749c3180d3c16a38b49cf4532b0aa84ff75df7f63a3b358d3d471e702",
    "tiny/powersgd": "f993718009fff23fd5b3fd1d32cf51991cf14310fe51f3f284e892cbdd66d8f5",
    "tiny/dense": "484aa59b342f129379783ac0b6e51f4e680e95862b2e930e91d976debb03ef5c",
    "tiny/stoch": "61f945953dc986356fd62a26d165b31bdf683331d0984c3089e91aac1f0edaea",
    "tiny/fit": "d2c3809ab2787afb090c5231c6530755776957004f96dc4c3c2942450641ac0f",
    "tiny/every2": "f4bb0fb432a2e5f72f7faff6e6e1bc99a0aacacdabdef5746b7d3c5cc5f538f6",
    "tiny/noentropy": "225116f3f2715357ad73247e33a94d7039a78073a9f288463ac7671fc13c4838",
    "tiny/ranks": "634ab61d6a47ba9362cbf3999e9f0bd41c592dcec4aa7a7f81e3fc82f5186a9e",
    "tiny/noheads": "7300fead4a32368cc2ffe0c24a6c902c29ec979b68034089a9b68842b45e7e4c",
    "tiny/noef": "68777849b67a4323d74a388bde156156db9607dbe5ed65bbf7eda6d583f47b56",
    "tiny/pow0": "d41cf915ab794cf5f473491dacf184a968b1f3790fce57b529436ed6a693c6d5",
    "d256/default": "007ff527d5b24f6ffa273fb00e18cd573ea38b814432d12ab9a4d485ebe1cc73",
    "d256/bits4": "0979c340dbf089b2e5d1968c3e3e75925dcc4163ab62b48487eea94a50a3fc39",
    "d256/int8": "0c8421e2a049955517ea80d19fa688345e81dfd3ff1975778050c12ab5c36cec",
    "d256/bits2": "7c1047e2542bf51ae06bae5613d7904fff8ac6fbd071cbdbd2ac925029b996e8",
    "d256/late": "2af0b879340671d4c9e101eb398847265aa41e5f08205fad4eb31496ba5e4058",
    "d256/norot": "ba6d982089b0739f0be71007dea949a49347b757be23b360bc4e79ea9114a5ca",
    "d256/topk": "64fcbe426cd0d85f55d4b81a65235382dfde52e15bf176c0054b5c553daa81ea",
    "d256/powersgd": "f975dbb4ad8a608de1b2b64ab040e888b0c8564c0c089b5b1104b821d796f09d",
}
# _platform() on the machine the digests were pinned on
PINNED_PLATFORM = "763c585c1dd7eb6f168a9682766e2b49b27aa1efdbef84dbd0f2485a5e6766be"


@functools.cache
def _platform() -> str:
    """A digest of what the pinned bits depend on besides the code: float64 products (one
    through MKL's transposed-operand path), QR and SVD, the seeded normal sampler, a
    float32 product and raw DEFLATE."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(96, 40, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(x @ torch.randn(40, 12, generator=g, dtype=torch.float64))
    u, s, vh = torch.linalg.svd(q.t() @ x, full_matrices=False)
    f = torch.randn(12, 96, generator=g) * 1e-3
    codes = np.random.default_rng(3).integers(0, 16, 4096, dtype=np.uint8).tobytes()
    h = hashlib.sha256()
    for t in (x.t() @ q, r, u, s, vh, f.t() @ f):
        h.update(t.contiguous().numpy().tobytes())
    h.update(deflate(codes))
    return h.hexdigest()


def _digest(model: str, config: str) -> str:
    """sha256 of three rounds of one client's serialized updates and residuals: the
    server's first plan, then a random head mask (layer 0 all active), the same mask object
    again, then that mask changed in place; local weights at three scales. On one torch
    thread, as a worker encodes (the bits are the same on two; the time, on a busy
    machine, several times less)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _encode_rounds(model, config)
    finally:
        torch.set_num_threads(threads)


def _encode_rounds(model: str, config: str) -> str:
    mcfg, cfg = MODELS[model], CodecConfig(**CONFIGS[config])
    state = init_global_state(mcfg, 0)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    server = ServerCodec(mcfg, cfg, state)
    g = torch.Generator().manual_seed(1)
    L, H = mcfg.n_layers, mcfg.n_heads
    client = ClientCodec(mcfg, cfg, shapes, "client-7")
    mask = torch.rand(L, H, generator=g) < 0.5
    mask[0] = True
    plans = [server.plan()] + [RoundPlan(round=r, mask=mask, shared=SharedState(r, server.shared.bases),
                                         send_dense=r % cfg.dense_every == 0) for r in (1, 2)]
    h = hashlib.sha256()
    for i, plan in enumerate(plans):
        local = {n: t + torch.randn(t.shape, generator=g) * 10.0 ** (-1 - i) for n, t in state.items()}
        msg = client.encode(state, local, plan, torch.rand(L, H, generator=g), 10 + i, {"loss": 1.5})
        h.update(msg.SerializeToString(deterministic=True))
        for n in sorted(client.residual):
            h.update(n.encode())
            h.update(client.residual[n].contiguous().numpy().tobytes())
        if i == 1:
            mask[1, 0] = ~mask[1, 0]
    return h.hexdigest()


# every case with the compiled quantiser; with the numpy one (what a process that never
# called quant.warm_up runs) the cheaper tiny cases and the d=256 default
CASES = [("compiled", c) for c in MAIN] + [("numpy", c) for c in MAIN if c.startswith("tiny/") or c == "d256/default"]


@pytest.mark.parametrize("quantiser,case", CASES, ids=[f"{q}-{c}" for q, c in CASES])
def test_encode_gives_mains_bits(monkeypatch, quantiser, case):
    monkeypatch.setattr(quant, "_compiled", [])
    if quantiser == "compiled" and not quant.warm_up():
        pytest.skip("numba not installed or FEDMLA_EXACT_KERNELS=numpy")
    if _platform() != PINNED_PLATFORM:
        pytest.skip("this machine's float64 linear algebra, sampler or DEFLATE gives other bits than the "
                    "machine the digests were pinned on")
    assert _digest(*case.split("/")) == MAIN[case]


@pytest.mark.parametrize("config", ["default", "bits2", "int8", "topk"])
def test_compiled_and_numpy_quantisers_encode_the_same_bits(monkeypatch, config):
    """Machine-independent: both quantisers on the same machine give the same encodes."""
    monkeypatch.setattr(quant, "_compiled", [])
    numpy_digest = _digest("tiny", config)
    if not quant.warm_up():
        pytest.skip("numba not installed or FEDMLA_EXACT_KERNELS=numpy")
    assert _digest("tiny", config) == numpy_digest
