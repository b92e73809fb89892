"""The fedmla update codec, shared by workers and the coordinator (pure torch + protobuf,
no server imports).

Worker side: :class:`ClientCodec` (``encode``), :func:`apply_downlink`; the model hash is
:func:`fedmla.protos.weights.model_hash`.
Coordinator side: :class:`ServerCodec` (``plan``, ``decode``, ``aggregator``,
``finish_round``), :class:`ExactAggregator`, :class:`OuterOptimizer`.
Pure pieces: :mod:`.heads` (importance and masks), :mod:`.quant`, :mod:`.lowrank`.
"""

from .client import ClientCodec, encode_importance
from .config import CodecConfig
from .heads import combine_importance, select_heads, update_importance
from .layout import Basis, RoundPlan, SharedState
from .quant import dequantize_rows, quantize_rows
from .server import (DecodedUpdate, DecodeLimits, ExactAggregator, OuterOptimizer, ServerCodec, apply_downlink,
                     decode_importance)
from .wire import TensorCodec, UpdateDecodeError

__all__ = [
    "CodecConfig", "ClientCodec", "ServerCodec", "ExactAggregator", "OuterOptimizer", "DecodedUpdate", "DecodeLimits",
    "RoundPlan", "SharedState", "Basis", "TensorCodec", "UpdateDecodeError", "apply_downlink",
    "combine_importance", "update_importance", "select_heads", "quantize_rows", "dequantize_rows",
    "encode_importance", "decode_importance",
]
