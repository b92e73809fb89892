import pytest
import torch

from fedmla.mla_model import MLAConfig, MLATransformer

TEXT = (b"def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
        b"        self.x = x\n        self.y = y\n") * 4


@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_loss_halves_within_200_steps(q_lora_rank):
    torch.manual_seed(0)
    model = MLATransformer(MLAConfig.preset("tiny", q_lora_rank=q_lora_rank))
    data = torch.tensor(list(TEXT[:4 * 65]), dtype=torch.long).view(4, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for step in range(200):
        loss = model.loss(data)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() <= first / 2:
            break
    assert loss.item() <= first / 2, f"loss went {first:.3f} -> {loss.item():.3f} in 200 steps"
