import torch

from fedmla.protos.codec.heads import (combine_importance, head_index, heads_to_keep, select_heads,
                                     update_importance)


def test_combine_importance_weights_by_examples():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # weights 1 and 3: (1*a + 3*b) / 4
    got = combine_importance([a, b], [1, 3])
    assert torch.allclose(got, torch.tensor([[0.25, 0.75], [0.875, 0.125]], dtype=torch.float64))


def test_update_importance_moving_average():
    prev = torch.tensor([[1.0, 0.0]])
    cur = torch.tensor([[0.0, 1.0]])
    assert torch.equal(update_importance(None, cur, 0.5), cur.double())
    assert torch.allclose(update_importance(prev, cur, 0.75), torch.tensor([[0.75, 0.25]], dtype=torch.float64))


def test_keep_count():
    assert heads_to_keep(4, 0.5) == 2
    assert heads_to_keep(4, 0.6) == 3
    assert heads_to_keep(8, 0.01) == 1
    assert heads_to_keep(4, 1.0) == 4


def test_topk_mask_without_exploration():
    imp = torch.tensor([[0.1, 0.5, 0.3, 0.2], [0.4, 0.4, 0.1, 0.9]])
    mask = select_heads(imp, 0.5, 0, torch.Generator().manual_seed(0))
    # layer 0: heads 1 (0.5) and 2 (0.3); layer 1: head 3 (0.9) then the tie 0/1 goes to the lower index
    assert mask.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_exploration_adds_inactive_heads_and_all_can_return():
    imp = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.0, 0.0]])
    seen = set()
    for r in range(40):
        mask = select_heads(imp, 0.34, 1, torch.Generator().manual_seed(r))
        assert mask[0, 0] and mask[0, 1]              # top-2 always kept (ceil(0.34*6)=3 -> + head 2)
        assert int(mask.sum()) == 4                    # 3 top + 1 explorer
        seen |= set(mask[0].nonzero().flatten().tolist())
    assert seen == set(range(6))                       # every low-importance head came back at some round
    # same generator seed -> same mask
    a = select_heads(imp, 0.34, 1, torch.Generator().manual_seed(7))
    b = select_heads(imp, 0.34, 1, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_no_importance_means_all_heads():
    assert select_heads(None, 0.5, 1, torch.Generator(), 2, 3).all()


def test_head_index_blocks():
    assert head_index([2, 0], 3).tolist() == [0, 1, 2, 6, 7, 8]
