"""Tiny Hugging Face DeepSeek checkpoints and tokenizers made inside the tests (nothing is
downloaded): transformers builds and saves the model, `tokenizers` trains the tokenizer."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"          # before transformers is imported anywhere
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, first_k_dense_replace=2, max_position_embeddings=128)

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
        "        self.y = y\n\n# The quick brown fox jumps over the lazy dog.\nfor i in range(10):\n"
        "    print(i, i * i)\n") * 4


def hf_model(model_type: str = "deepseek_v3", seed: int = 0, std: float = 0.1, **overrides):
    """A random dense transformers DeepSeek model (eval mode, fp32). ``std`` is larger than
    transformers' 0.02 init so that every part of the network (rope included) moves the logits."""
    cls = {"deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
           "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM)}[model_type]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**{**TINY, **overrides})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def train_tokenizer(vocab_size: int = 300, text: str = TEXT):
    """A byte-level BPE tokenizer trained on ``text`` (every byte is in its alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    return tok


def save_checkpoint(path: Path, model_type: str = "deepseek_v3", dtype: torch.dtype = torch.float32,
                    tokenizer: bool = False, shard: bool = False, **overrides):
    """Save a tiny checkpoint folder with transformers; returns the (fp32) model saved."""
    model = hf_model(model_type, **overrides)
    to_save = model if dtype == torch.float32 else hf_model(model_type, **overrides).to(dtype)
    to_save.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
    if tokenizer:
        train_tokenizer(TINY["vocab_size"] if "vocab_size" not in overrides else overrides["vocab_size"]).save(
            str(Path(path) / "tokenizer.json"))
    return model


def safetensors_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's *.safetensors files, by name."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
