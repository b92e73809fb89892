"""FedAvg by hand, head-block expansion, and the interface contract."""

import pytest
import torch

from fedmla.coordinator.aggregation import Aggregator, DecodedUpdate, DenseUpdate, FedAvg, LowRankUpdate, RoundContext, dense_delta

BLOCKS = {"attn.wo.weight": (1, 2), "attn.wkv_b.weight": (0, 3)}


def ctx(lr=1.0):
    return RoundContext(round_id=1, model_version=0, head_blocks=BLOCKS, server_lr=lr)


def test_fedavg_weighted_by_examples_reconstructs_products():
    g = {"w": torch.zeros(2, 2), "b": torch.ones(3)}
    agg = FedAvg()
    assert isinstance(agg, Aggregator)
    agg.begin_round(g, ctx())
    # client a: delta = [[1],[2]] @ [[1, 1]] = [[1,1],[2,2]], weight 1
    agg.add("a", DecodedUpdate(factors={"w": LowRankUpdate(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 1.0]]))}), 1)
    # client b: delta w = [[4,0],[0,4]] dense, b += 3, weight 3
    agg.add("b", DecodedUpdate(dense={"w": DenseUpdate(torch.tensor([[4.0, 0.0], [0.0, 4.0]])),
                                      "b": DenseUpdate(torch.full((3,), 3.0))}), 3)
    out = agg.finish()
    # w = (1*[[1,1],[2,2]] + 3*[[4,0],[0,4]]) / 4 = [[13/4, 1/4], [2/4, 14/4]]
    assert torch.equal(out["w"], torch.tensor([[3.25, 0.25], [0.5, 3.5]]))
    # b: only b sent it; the sum is still divided by all examples: 1 + 3*3/4
    assert torch.allclose(out["b"], torch.full((3,), 1 + 9 / 4))


def test_average_of_products_not_product_of_averages():
    g = {"w": torch.zeros(1, 1)}
    agg = FedAvg()
    agg.begin_round(g, ctx())
    agg.add("a", DecodedUpdate(factors={"w": LowRankUpdate(torch.tensor([[2.0]]), torch.tensor([[0.0]]))}), 1)
    agg.add("b", DecodedUpdate(factors={"w": LowRankUpdate(torch.tensor([[0.0]]), torch.tensor([[2.0]]))}), 1)
    assert agg.finish()["w"].item() == 0.0  # mean(B) @ mean(A) would give 1


def test_server_lr_scales_the_step():
    agg = FedAvg()
    agg.begin_round({"b": torch.zeros(2)}, ctx(lr=0.5))
    agg.add("a", DecodedUpdate(dense={"b": DenseUpdate(torch.tensor([2.0, 4.0]))}), 5)
    assert torch.equal(agg.finish()["b"], torch.tensor([1.0, 2.0]))


def test_dense_delta_places_head_columns_and_rows():
    # wo: (dim=3, H*dv = 3 heads * 2); heads (0, 2) -> columns 0,1 and 4,5
    part = DenseUpdate(torch.arange(12.0).reshape(3, 4), heads=(0, 2))
    d = dense_delta("layers.0.attn.wo.weight", (3, 6), part, BLOCKS)
    assert torch.equal(d[:, 2:4], torch.zeros(3, 2))
    assert torch.equal(d[:, [0, 1, 4, 5]], torch.arange(12.0).reshape(3, 4))
    lr = LowRankUpdate(torch.ones(3, 1), torch.ones(1, 2), heads=(1,))
    d = dense_delta("layers.1.attn.wkv_b.weight", (6, 2), lr, BLOCKS)
    assert torch.equal(d[3:], torch.ones(3, 2)) and torch.equal(d[:3], torch.zeros(3, 2))


def test_finish_before_begin_is_an_error():
    with pytest.raises(RuntimeError):
        FedAvg().finish()
