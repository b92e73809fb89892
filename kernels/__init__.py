"""Fused kernels for MLA training and decoding, and for the update codec.

Each op has a pure-torch reference (``naive.py``), a Triton kernel (``triton.py``) and a
public function that dispatches by device (CUDA -> Triton; CPU -> the fastest correct
torch path); ``backend=`` forces one. See ``kernels/_common.py`` for the backends.

- :func:`kernels.mla_attention.mla_attention`: causal training attention, fwd + bwd
- :func:`kernels.mla_decode.mla_decode`: absorbed decode over the latent cache
- :func:`kernels.quant.quantize_rows` / :func:`kernels.quant.dequantize_rows`: int8 / int4 rows

Submodules are imported on use so that ``TRITON_INTERPRET`` can still be set before a
Triton kernel is decorated.
"""
