"""binarize_kv: stage 2's budget in K and V bytes (an emptied head's middle V is saved too)."""

from __future__ import annotations

import itertools

import pytest
import torch

from leank_ref.masks import binarize, binarize_kv, kept_counts, kv_pruned_ratio, top_count_mask
from leank_ref.memory import memory_formula
from leank_ref.models import masks_dir
from leank_ref.train.settings import TrainSettings
from leank_ref.windows import Windows


def test_kv_pruned_ratio_counts_v_only_for_heads_that_keep_a_channel():
    mask = torch.zeros(1, 2, 8)
    mask[0, 0, :4] = 1  # 4 K values + 8 V values stored per middle token; head 1 stores nothing
    assert kv_pruned_ratio(mask) == pytest.approx(1 - 12 / 32)
    # the same share as the memory formula's middle bytes
    report = memory_formula(mask, 1000, Windows(4, 8, 1))
    assert kv_pruned_ratio(mask) == pytest.approx(1 - (report.middle_k + report.middle_v) / (2 * report.dense_middle_k))


@pytest.mark.parametrize("ratio", [0.3, 0.475, 0.6, 0.8])
def test_the_budget_is_met_and_counts_are_aligned(ratio):
    factors = torch.load(masks_dir() / "laptop" / "smollm2-135m_stage1_factors.pth", weights_only=True)
    mask = binarize_kv(factors, ratio, 16)
    counts = kept_counts(mask)
    assert bool((counts % 16 == 0).all())
    assert kv_pruned_ratio(mask) >= ratio - 1e-9  # never over the budget
    assert kv_pruned_ratio(mask) < ratio + (64 + 16) / (2 * 64 * 90)  # and within one head's step of it
    # each head keeps its largest factors
    assert torch.equal(mask, binarize_kv(factors, ratio, 16))
    for layer, head in [(0, 0), (7, 2), (29, 1)]:
        c = int(counts[layer, head])
        assert torch.equal(mask[layer, head], top_count_mask(factors[layer, head], torch.tensor(c)))


def test_the_chosen_counts_are_optimal_for_the_bytes_they_use():
    """Brute force on a small case: no other choice of counts stores as few values and keeps more factor mass."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        factors = torch.rand(1, 4, 8, generator=gen) ** 3
        ratio = 0.3 + 0.5 * torch.rand((), generator=gen).item()
        mask = binarize_kv(factors, ratio, 4)
        counts = kept_counts(mask)[0]
        top = factors[0].sort(-1, descending=True).values.cumsum(-1)

        def value(cs, top=top):
            return sum(float(top[h, c - 1]) if c else 0.0 for h, c in enumerate(cs))

        def stored(cs):
            return sum(c + 8 * (c > 0) for c in cs)

        best = value(counts.tolist())
        for cs in itertools.product((0, 4, 8), repeat=4):
            if stored(cs) <= stored(counts.tolist()):
                assert value(cs) <= best + 1e-6, (trial, cs, counts.tolist())


def test_charging_v_empties_more_heads_at_the_same_bytes():
    factors = torch.load(masks_dir() / "laptop" / "smollm2-135m_stage1_factors.pth", weights_only=True)
    plain = binarize(factors, 0.7, 16)
    charged = binarize_kv(factors, kv_pruned_ratio(plain), 16)
    assert kv_pruned_ratio(charged) >= kv_pruned_ratio(plain)
    assert int((kept_counts(charged) == 0).sum()) > int((kept_counts(plain) == 0).sum())


def test_settings_pick_the_rule():
    factors = torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(1))
    k = TrainSettings.for_stage(2, ratio=0.6, align=4)
    assert torch.equal(k.binarize(factors), binarize(factors, 0.6, 4))
    assert torch.equal(k.replace(budget="kv").binarize(factors), binarize_kv(factors, 0.6, 4))
    with pytest.raises(ValueError, match="budget="):
        k.replace(budget="v").check(16)
