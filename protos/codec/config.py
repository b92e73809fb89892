"""Typed configuration of the update codec, shared by the coordinator and every worker.

Both sides must use the same :class:`CodecConfig` (the coordinator sends it with the
task); every field that changes bytes or numbers is here, so a run is reproducible
from its config and seed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CodecConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- low-rank compression of 2-D pseudo-gradients --------------------------------------
    method: Literal["powersgd", "svd", "topk", "dense"] = Field(
        "svd",
        description="powersgd: one factor per client in a basis shared by all and warm-started across "
                    "rounds (alternating sides: one power-iteration step per round); svd: per-client "
                    "randomised SVD, both factors sent; topk: chunked top-k (SparseLoCo; see topk_*); "
                    "dense: no low-rank step (quantisation/heads only)")
    powersgd_warmup_rounds: int = Field(1, ge=0, description=(
        "powersgd: first rounds run as svd (both factors); the shared basis then starts from the downlink's "
        "factor instead of a random one, which otherwise costs several rounds of quality"))
    rank: int = Field(12, ge=1, description="uplink rank r of each compressed 2-D tensor")
    downlink_rank: int | None = Field(None, ge=1, description="rank of the downlink; None = rank")
    ffn_rank: int | None = Field(None, ge=1, description=(
        "uplink rank of the feed-forward matrices (layers.i.ffn.w1/w2/w3); None = rank. On bench comm --quick "
        "they are 6 of the 2-D tensors and ~2/3 of the uplink's bytes, and their rank-12 truncation was the "
        "uplink's remaining round-0 cost (validation loss 2.841, 2.728 with the FFN sent exactly). Measured at 24 "
        "(seed 2): ~0.02 lower loss per round for 33% more bytes per round, fewer rounds per byte; not the default"))
    ffn_downlink_rank: int | None = Field(None, ge=1, description=(
        "downlink rank of the feed-forward matrices; None = downlink_rank (or rank)"))
    embed_rank: int | None = Field(None, ge=1, description=(
        "uplink rank of the token embedding and the LM head (embed.weight, lm_head.weight); None = rank. A "
        "(vocab, d) matrix, cheap per rank component next to the FFN's (d, 4d); at round 6 of bench comm --quick "
        "seed 0 its rank-12 uplink was most of the uplink's loss (2.237, 2.214 with the embedding exact). Measured "
        "at 32: DiLoCo's +2% in 14 rounds instead of 15 on seed 0 (124.3x), far behind on seed 1; not the default"))
    embed_downlink_rank: int | None = Field(None, ge=1, description=(
        "downlink rank of the token embedding and the LM head; None = downlink_rank (or rank)"))
    early_rounds: int = Field(0, ge=0, description=(
        "rounds 0 .. early_rounds-1 use early_rank / early_downlink_rank for every low-rank tensor: the local "
        "learning rate is highest in the first rounds, where what the rank leaves out costs the most. Measured "
        "(rank 24 both ways in rounds 0-1): DiLoCo's +2% in 16 rounds instead of 21 on seed 2, no gain on seeds 0 "
        "and 1 for ~0.55 MB more; the uplink's part alone was worse than none"))
    early_rank: int | None = Field(None, ge=1, description=(
        "uplink rank of every low-rank tensor in the first early_rounds rounds; None = the usual uplink rank"))
    early_downlink_rank: int | None = Field(None, ge=1, description=(
        "downlink rank of every low-rank tensor in the first early_rounds rounds; None = the usual downlink rank"))
    late_from: int | None = Field(None, ge=1, description=(
        "rounds late_from, late_from+1, ... use late_rank / late_downlink_rank for every low-rank tensor; None = "
        "no late ranks. Meant for the rounds after the local trainer's schedule has decayed (bench comm --quick: "
        "cosine over R=10 rounds, the 10% floor from round 10), whose smaller updates need fewer components. "
        "Measured (rank 8 both ways from round 10), seeds 0/1/2: 124.9x / 113.6x / not reached vs DiLoCo's +2% "
        "(defaults 119.5x / 99.2x / not reached), FedAvg's unchanged or better. Not the default: the round is "
        "the trainer's schedule, which the codec does not know"))
    late_rank: int | None = Field(None, ge=1, description=(
        "uplink rank of every low-rank tensor from round late_from on; None = the usual uplink rank"))
    late_downlink_rank: int | None = Field(None, ge=1, description=(
        "downlink rank of every low-rank tensor from round late_from on; None = the usual downlink rank"))
    min_lowrank_dim: int = Field(16, ge=1, description="2-D tensors with a side shorter than this go dense")
    svd_oversample: int = Field(8, ge=0, description="randomised SVD: extra probe vectors")
    svd_power_iters: int = Field(2, ge=0, description="randomised SVD: subspace iterations")
    rotate_factors: bool = Field(True, description=(
        "randomised SVD (uplink and downlink): mix the r singular components of both factors by one seeded "
        "random orthogonal (r, r) matrix before quantisation; the product is unchanged, but each quantised row "
        "is then a mix of r peaky singular vectors, closer to Gaussian, so one row scale covering its maximum "
        "wastes fewer levels. bench comm --quick, first round: validation loss 3.20 -> 2.98 (the uplink alone: "
        "3.08 -> 2.84, as with fp32 factors) for 1.6-2% more bytes"))

    # ---- chunked top-k (method "topk") ---------------------------------------------------------
    topk_chunk: int = Field(4096, ge=1, le=1 << 14, description=(
        "topk: elements per chunk of the flattened (head-selected) 2-D tensor; each chunk keeps topk_k entries"))
    topk_k: int = Field(64, ge=1, description=(
        "topk: entries kept per chunk (density topk_k / topk_chunk). About 9.3 bits per kept entry on the quick "
        "benchmark's model (7.8 for the position, 1.5 for the 2-bit value and its chunk's fp16 scale). Measured "
        "there (seed 0) against svd rank 12 at the same bytes per round: behind at every round (val 2.41 at "
        "2.66 MB against svd's 2.20 at 2.5 MB) and still 2.31 after 20 rounds, short of FedAvg's final loss + 2% "
        "(2.14) that svd reaches in 13; residual_decay 0.95 and k = 256 did not close it. svd stays the default"))
    topk_bits: Literal[0, 2, 3, 4, 8] = Field(2, description=(
        "topk: bits per kept value, one scale per chunk (2 = sign and one magnitude bit); 0 = fp32"))
    topk_downlink: Literal["svd", "topk"] = Field("svd", description=(
        "topk: how the coordinator sends the aggregated delta of 2-D tensors: svd (rank downlink_rank, "
        "downlink_bits, as the svd method) or chunked top-k with downlink_topk_k per chunk"))
    downlink_topk_k: int | None = Field(None, ge=1, description="topk downlink: entries per chunk; None = topk_k")

    # ---- quantisation ------------------------------------------------------------------------
    factor_bits: Literal[0, 2, 3, 4, 8] = Field(3, description=(
        "bits per factor entry (per-row scale); 0 = fp32; 3 = seven levels in 4-bit slots (pair it with "
        "entropy_coding); 2 = four levels +-s/2, +-3s/2"))
    embed_factor_bits: Literal[0, 2, 3, 4, 8] | None = Field(None, description=(
        "uplink: bits per factor entry of the token embedding and the LM head (embed.weight, lm_head.weight; "
        "tied by default); None = factor_bits"))
    dense_bits: Literal[0, 2, 3, 4, 8] = Field(8, description="bits per entry of dense (1-D / small) updates; 0 = fp32")
    fit_scales: bool = Field(False, description=(
        "refit each row's scale by least squares (clipping the largest entries) instead of covering the "
        "row's maximum: lower squared error per bit; error feedback keeps what is clipped"))
    entropy_coding: bool = Field(True, description=(
        "DEFLATE (Huffman) the packed integer codes of every quantised tensor when that is smaller: "
        "lossless, the receiver gets the same codes"))
    half_scales: bool = Field(True, description="send row scales as float16 (exactly what the sender quantised with)")
    stochastic_rounding: bool = Field(False, description="unbiased stochastic rounding (seeded) instead of nearest")
    dense_every: int = Field(1, ge=1, description=(
        "send dense tensors every k rounds; in between they accumulate in the error-feedback residual. They "
        "are ~3% of a round's bytes, and the held-back burst every k-th round made the loss jump (measured: "
        "k = 1 reached the quick benchmark's target in 8 rounds, 61.3x, against 10 rounds, 50.1x, for k = 4)"))

    # ---- error feedback ------------------------------------------------------------------------
    error_feedback: bool = Field(True, description="keep what was not sent (worker and server side) for later rounds")
    residual_decay: float = Field(0.7, ge=0, le=1, description=(
        "worker residual multiplier per round. A pseudo-gradient from many local steps is 'local optimum minus "
        "global', so directions the global still lacks reappear in the next delta; a full residual (1.0) then "
        "counts them twice. < 1 forgets stale residual geometrically (also what piles up for heads left "
        "out of the mask for many rounds). 0.7 measured best of 0.5/0.7/0.85/1.0 on the quick benchmark"))
    server_residual_decay: float = Field(0.85, ge=0, le=1, description=(
        "same, for the coordinator's downlink residual. 0.85 (was 0.7), measured with rotate_factors: bench comm "
        "--quick seed 0 (every client every round) reached DiLoCo's final loss +2% in 18 rounds instead of 19 "
        "(100.3x against 95.1x fewer bytes) and FedAvg's +0.5% in 14 instead of 15, FedAvg's +2% in 13 as before; "
        "fedmla simulate (4 clients, 2 per round, 6 rounds) seeds 0/1/2 ended at 2.4967 / 2.4633 / 2.5127 "
        "against 2.5329 / 2.4668 / 2.5322 with 0.7. 1.0 (all of what the downlink left out) was worse on bench "
        "comm: FedAvg's +2% in 15 rounds instead of 13, DiLoCo's in 23 instead of 19"))

    # ---- head selection ------------------------------------------------------------------------
    head_selection: bool = Field(True, description="send only active heads' rows/columns of wq_b/wkv_b/wo")
    keep_ratio: float = Field(0.5, gt=0, le=1, description="top-k heads per layer, k = ceil(keep_ratio * H)")
    explore_heads: int = Field(1, ge=0, description="extra random inactive heads per layer, so a head can return")
    importance_ema: float = Field(0.5, ge=0, lt=1, description="weight of the past in the importance moving average")

    # ---- outer optimiser (coordinator) ---------------------------------------------------------
    outer: Literal["fedavg", "nesterov"] = Field("nesterov", description="fedavg: theta += lr * mean delta; "
                                                 "nesterov: DiLoCo's outer Nesterov momentum")
    outer_lr: float = Field(1.0, gt=0)
    outer_momentum: float = Field(0.5, ge=0, lt=1)
    replicate_momentum: bool = Field(True, description=(
        "nesterov: every worker keeps the same outer momentum as the coordinator (it is a function of "
        "the downlinks), so the downlink carries only the compressed aggregated delta and each party "
        "takes the outer step itself; False: the coordinator compresses and sends the whole step, "
        "spending downlink rank on momentum directions the workers were already sent"))

    # ---- downlink --------------------------------------------------------------------------------
    downlink_bits: Literal[0, 2, 3, 4, 8] = Field(3, description=(
        "bits per downlink factor/dense entry; 0 = fp32. 3 (was 4): with every byte counted the downlink is what "
        "clients pay most (each returning client replays every downlink it missed); on bench comm --quick 3-bit "
        "beat 4-bit in 9 of 10 seed x corpus x participation comparisons (e.g. 16 clients, 4 per round: 62.4x "
        "against 50.8x vs FedAvg fp32; 4 clients seed 1: 131.7x against 135.7x, three rounds more)"))

    embed_downlink_bits: Literal[0, 2, 3, 4, 8] | None = Field(4, description=(
        "downlink: bits per factor entry of the token embedding and the LM head; None = downlink_bits. 4 "
        "(session 7): the 3-bit downlink's whole round-0 cost on bench comm --quick seed 0 was the embedding, "
        "which the tied LM head turns into logit noise (validation loss 2.982; fp32 downlink 2.863; fp32 for the "
        "embedding alone 2.856, for attention, FFN or dense tensors alone 2.98; the embedding at 4 bits 2.857) "
        "for +1 kB (2.5%) per downlink. Full runs, seeds 0/1/2: FedAvg's +2% in 10 / 9 / 12 rounds instead of "
        "13 / 13 / 13 (182x / 204x / 151x against 140x / 141x), DiLoCo's in 15 / 18 / not reached"))

    seed: int = Field(0, description="seeds shared bases, exploration heads and stochastic rounding")

    @model_validator(mode="after")
    def _check(self) -> "CodecConfig":
        if self.method == "powersgd" and self.downlink_rank not in (None, self.rank):
            raise ValueError("with method 'powersgd' the downlink shares the uplink's basis, so downlink_rank "
                             f"must be unset or equal to rank ({self.rank}), got {self.downlink_rank}")
        per_tensor = {k: getattr(self, k) for k in _PER_TENSOR_RANKS if getattr(self, k) is not None}
        if self.method == "powersgd" and per_tensor:
            raise ValueError("with method 'powersgd' every tensor's rank is its shared basis's, so "
                             f"{', '.join(per_tensor)} must be unset, got {per_tensor}")
        late = self.late_rank is not None or self.late_downlink_rank is not None
        if late != (self.late_from is not None):
            raise ValueError("late_from and late_rank / late_downlink_rank go together: set late_from and at least "
                             f"one late rank, or neither (late_from={self.late_from}, late_rank={self.late_rank}, "
                             f"late_downlink_rank={self.late_downlink_rank})")
        if self.late_from is not None and self.late_from < self.early_rounds:
            raise ValueError(f"late_from ({self.late_from}) must not be below early_rounds ({self.early_rounds}): "
                             "a round is early or late, not both")
        early = self.early_rank is not None or self.early_downlink_rank is not None
        if early != (self.early_rounds > 0):
            raise ValueError("early_rounds and early_rank / early_downlink_rank go together: set early_rounds > 0 "
                             f"and at least one early rank, or neither (early_rounds={self.early_rounds}, "
                             f"early_rank={self.early_rank}, early_downlink_rank={self.early_downlink_rank})")
        if self.topk_k > self.topk_chunk or (self.downlink_topk_k or 0) > self.topk_chunk:
            raise ValueError(f"topk_k ({self.topk_k}) and downlink_topk_k ({self.downlink_topk_k}) must not exceed "
                             f"topk_chunk ({self.topk_chunk})")
        return self

    @classmethod
    def fedavg(cls, **overrides) -> "CodecConfig":
        """Plain FedAvg as a configuration of the codec: every tensor dense in fp32 both ways,
        all heads, no error feedback, outer step theta += mean delta."""
        return cls(**{**_UNCOMPRESSED, "outer": "fedavg", "outer_lr": 1.0, **overrides})

    @classmethod
    def diloco(cls, **overrides) -> "CodecConfig":
        """DiLoCo: FedAvg's uncompressed pseudo-gradients with the outer Nesterov step. The
        momentum stays on the coordinator, which sends the whole fp32 step down (as many
        bytes as the mean delta): a DiLoCo client never needs the momentum, so its full
        state, what a new or far-behind client downloads, is the weights alone, as FedAvg's."""
        return cls(**{**_UNCOMPRESSED, "outer": "nesterov", "replicate_momentum": False, **overrides})

    @property
    def uncompressed(self) -> bool:
        """True when every value travels as fp32 and nothing is left out (the baselines)."""
        return (self.method == "dense" and self.factor_bits == 0 and self.dense_bits == 0 and self.downlink_bits == 0
                and not self.head_selection and self.dense_every == 1)

    def sparse(self, uplink: bool) -> bool:
        """True when 2-D (low-rank-sized) tensors travel as chunked top-k in this direction."""
        return self.method == "topk" and (uplink or self.topk_downlink == "topk")

    def topk_k_for(self, uplink: bool) -> int:
        return self.topk_k if uplink else (self.downlink_topk_k or self.topk_k)

    @property
    def down_rank(self) -> int:
        return self.downlink_rank or self.rank

    def rank_for(self, name: str, round: int, uplink: bool) -> int:
        """The rank (before clipping to the tensor's sides) of low-rank tensor ``name`` in ``round``,
        one direction. Both sides compute it from the config and the plan's round, so the decoder
        bounds every factor by it."""
        if round < self.early_rounds:
            early = self.early_rank if uplink else self.early_downlink_rank
            if early is not None:
                return early
        if self.late_from is not None and round >= self.late_from:
            late = self.late_rank if uplink else self.late_downlink_rank
            if late is not None:
                return late
        if is_ffn_tensor(name):
            own = self.ffn_rank if uplink else self.ffn_downlink_rank
        elif name in VOCAB_TENSORS:
            own = self.embed_rank if uplink else self.embed_downlink_rank
        else:
            own = None
        if own is not None:
            return own
        return self.rank if uplink else self.down_rank

    @property
    def max_rank(self) -> int:
        """The largest rank any tensor may use in any round or direction."""
        return max(r for r in (self.rank, self.down_rank, *(getattr(self, k) for k in _PER_TENSOR_RANKS))
                   if r is not None)


# The token embedding and the LM head (the same tensor when tied): their factors may use
# their own ranks and bit widths (embed_rank, embed_factor_bits, ...).
VOCAB_TENSORS = frozenset({"embed.weight", "lm_head.weight"})

_PER_TENSOR_RANKS = ("ffn_rank", "ffn_downlink_rank", "embed_rank", "embed_downlink_rank", "early_rank",
                     "early_downlink_rank", "late_rank", "late_downlink_rank")


def is_ffn_tensor(name: str) -> bool:
    """The feed-forward matrices (``layers.i.ffn.w1/w2/w3.weight``)."""
    return name.startswith("ffn.") or ".ffn." in name


# The fields that make the codec send everything in fp32 (see CodecConfig.fedavg / .diloco).
_UNCOMPRESSED = dict(method="dense", factor_bits=0, dense_bits=0, downlink_bits=0, entropy_coding=False,
                     half_scales=False, error_feedback=False, head_selection=False, dense_every=1)
