import math

import pytest
import torch

from fedmla.mla_model import MLAConfig
from fedmla.worker.data import ClientData
from fedmla.worker.trainer import LocalTrainer, TrainerConfig, init_global_state, lr_at

MODEL = MLAConfig.preset("tiny")


def client(name="c", n=3000, seed=0):
    text = ("def f(x):\n    return x + 1\n" * 200).encode()[:n]
    return ClientData(name, torch.frombuffer(bytearray(text), dtype=torch.uint8).clone(),
                      torch.empty(0, dtype=torch.uint8))


def test_lr_schedule_values():
    c = TrainerConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert lr_at(c, 0) == 0.25 and lr_at(c, 3) == 1.0
    assert lr_at(c, 4) == pytest.approx(1.0)
    assert lr_at(c, 9) == pytest.approx(0.1 + 0.9 * 0.5)          # half-way through the cosine
    assert lr_at(c, 14) == pytest.approx(0.1) and lr_at(c, 100) == pytest.approx(0.1)
    assert lr_at(c.model_copy(update={"schedule": "constant"}), 50) == 1.0


def test_training_is_deterministic_and_learns():
    cfg = TrainerConfig(local_steps=12, batch_size=4, seq_len=32, lr=5e-3, warmup_steps=2, total_steps=12)
    g0 = init_global_state(MODEL, 0)
    data = client()
    windows = data.train[:33 * 8].view(8, 33).long()
    a = LocalTrainer(MODEL, cfg).train(g0, data, round_idx=0)
    b = LocalTrainer(MODEL, cfg).train(g0, data, round_idx=0)
    for n in a.state:
        assert torch.equal(a.state[n], b.state[n]), n
    assert torch.equal(a.importance, b.importance)
    assert a.importance.shape == (MODEL.n_layers, MODEL.n_heads)
    assert torch.allclose(a.importance.norm(dim=1), torch.ones(MODEL.n_layers))
    assert a.num_examples == 48
    t = LocalTrainer(MODEL, cfg)
    before, after = t.evaluate(g0, windows), t.evaluate(a.state, windows)
    assert after["loss"] < before["loss"] - 0.5
    assert after["bits_per_byte"] == pytest.approx(after["loss"] / math.log(2))
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    # the global weights handed in are not modified
    assert torch.equal(g0["embed.weight"], init_global_state(MODEL, 0)["embed.weight"])
    # another round index draws other batches
    c = LocalTrainer(MODEL, cfg).train(g0, data, round_idx=1)
    assert not torch.equal(c.state["embed.weight"], a.state["embed.weight"])


def test_seq_len_must_fit_model():
    with pytest.raises(ValueError, match="max_seq_len"):
        LocalTrainer(MODEL, TrainerConfig(seq_len=1000))
