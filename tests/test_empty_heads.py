"""The equal-K-bytes surgeries of the empty-head experiment (leank_ref.evaluate.empty_heads)."""

from __future__ import annotations

import pytest
import torch

from leank_ref.evaluate.empty_heads import (
    all_moves,
    bytes_of,
    combined_moves,
    emptied_only,
    empty_head,
    empty_heads_configs,
    restore_head,
)
from leank_ref.masks import kept_counts, load_mask, top_count_mask
from leank_ref.models import masks_dir

ALIGN = 16


def small_case():
    """One layer, three heads of D=64: head 0 keeps 16, head 1 keeps 32, head 2 keeps nothing."""
    factors = torch.rand(1, 3, 64, generator=torch.Generator().manual_seed(0))
    mask = top_count_mask(factors, torch.tensor([[16, 32, 0]]))
    return mask, factors


def test_a_swap_empties_the_head_and_gives_its_channels_to_the_best_recipient():
    mask, factors = small_case()
    new, move = empty_head(mask, factors, 0, 0, ALIGN)
    assert kept_counts(new).tolist() == [[0, 48, 0]]  # total K unchanged, counts aligned
    assert int(new.sum()) == int(mask.sum())
    assert move.partner == 1  # the only non-empty, not-full head (an empty head never receives)
    pruned = (mask[0, 1] == 0).nonzero()[:, 0]
    best = set(pruned[factors[0, 1, pruned].topk(ALIGN).indices].tolist())
    assert set(move.partner_channels) == best == set((new[0, 1] - mask[0, 1]).nonzero()[:, 0].tolist())
    assert torch.equal(new[0, 2], mask[0, 2])


def test_a_restore_takes_the_donors_weakest_channels_and_gives_the_heads_best():
    mask, factors = small_case()
    new, move = restore_head(mask, factors, 0, 2, ALIGN)
    assert kept_counts(new).tolist() == [[16, 16, 16]]
    assert move.partner == 1  # head 0 keeps only 16 and would empty: not a donor
    kept = mask[0, 1].nonzero()[:, 0]
    weakest = set(kept[(-factors[0, 1, kept]).topk(ALIGN).indices].tolist())
    assert set(move.partner_channels) == weakest
    assert set(move.head_channels) == set(factors[0, 2].topk(ALIGN).indices.tolist())


def test_recipient_is_chosen_by_its_best_pruned_factors():
    factors = torch.full((1, 3, 64), 0.1)
    mask = top_count_mask(torch.arange(64.0).expand(1, 3, 64), torch.tensor([[16, 32, 16]]))
    factors[0, 2, :16] = 0.9  # head 2's best pruned channels (0-15, not kept) are the strongest
    _, move = empty_head(mask, factors, 0, 0, ALIGN)
    assert move.partner == 2
    factors[0, 1, :16] = 0.95
    _, move = empty_head(mask, factors, 0, 0, ALIGN)
    assert move.partner == 1


def test_wrong_heads_and_no_partner():
    mask, factors = small_case()
    with pytest.raises(ValueError, match="empties a head of 16"):
        empty_head(mask, factors, 0, 1, ALIGN)
    with pytest.raises(ValueError, match="needs an empty head"):
        restore_head(mask, factors, 0, 0, ALIGN)
    lonely = top_count_mask(factors, torch.tensor([[16, 0, 0]]))
    assert empty_head(lonely, factors, 0, 0, ALIGN) is None
    assert restore_head(lonely, factors, 0, 1, ALIGN) is None


def test_on_the_shipped_mask_every_surgery_keeps_k_bytes_and_alignment():
    mask = load_mask(masks_dir() / "smollm2-135m_r0.7.pth", align=ALIGN)
    factors = torch.load(masks_dir() / "smollm2-135m_stage1_factors.pth", weights_only=True)
    counts = kept_counts(mask)
    for kind, delta in (("swap", 1), ("restore", -1)):
        moves = all_moves(mask, factors, ALIGN, kind)
        assert moves
        for new, move in moves:
            c = kept_counts(new)
            assert int(c.sum()) == int(counts.sum()) and bool((c % ALIGN == 0).all())
            assert int((c == 0).sum()) == int((counts == 0).sum()) + delta
            changed = (c != counts).nonzero().tolist()
            assert sorted(changed) == sorted([[move.layer, move.head], [move.layer, move.partner]])
        combined, done = combined_moves(mask, factors, ALIGN, kind)
        c = kept_counts(combined)
        assert int(c.sum()) == int(counts.sum()) and bool((c % ALIGN == 0).all())
        assert int((c == 0).sum()) == int((counts == 0).sum()) + delta * len(done)
    assert int(kept_counts(emptied_only(mask, ALIGN)).eq(0).sum()) == int((counts <= ALIGN).sum())


def test_configs_and_bytes():
    mask = load_mask(masks_dir() / "smollm2-135m_r0.7.pth", align=ALIGN)
    factors = torch.load(masks_dir() / "smollm2-135m_stage1_factors.pth", weights_only=True)
    configs, moves = empty_heads_configs(mask, factors, 0.7, ALIGN)
    assert [c.method for c in configs[:5]] == ["dense", "leank", "swap_all", "restore_all", "empty_only"]
    assert len(configs) == 5 + len(moves)
    table = bytes_of(configs, 2048)
    assert table["swap_all"]["k_bytes"] == table["leank"]["k_bytes"] == table["restore_all"]["k_bytes"]
    assert table["swap_all"]["v_bytes"] < table["leank"]["v_bytes"] < table["restore_all"]["v_bytes"]
    assert table["empty_only"]["k_bytes"] < table["leank"]["k_bytes"]
    with pytest.raises(ValueError, match="own mask"):
        configs[2].selector.select(None, kept_counts(mask), ALIGN)
