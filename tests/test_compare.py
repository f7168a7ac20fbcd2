"""compare_masks: a mask against the authors' released masks (overlap per head, counts, chance level)."""

import pytest
import torch

from leank_ref.compare import compare_masks
from leank_ref.masks import kept_counts, load_mask, top_count_mask
from leank_ref.models import masks_dir

REFERENCES = ("llama3.1-8b-instruct", "qwen2.5-7b-instruct")


@pytest.mark.parametrize("name", REFERENCES)
def test_a_released_mask_against_itself_overlaps_fully(name):
    ref = load_mask(masks_dir() / "reference" / f"{name}.pth")
    out = compare_masks(ref, ref)
    assert torch.equal(out.jaccard, torch.ones_like(out.jaccard))
    assert torch.equal(out.count_difference, torch.zeros_like(out.count_difference))
    s = out.summary()
    assert s["mean_jaccard"] == 1.0 and s["channel_jaccard"] == 1.0
    assert s["same_count_heads"] == s["heads"] == ref.shape[0] * ref.shape[1]
    assert s["empty_in_both"] == s["empty_heads"] == int((kept_counts(ref) == 0).sum())
    assert s["kept_share"] == pytest.approx(float(ref.mean()))


@pytest.mark.parametrize("name", REFERENCES)
def test_random_channels_at_the_same_counts_overlap_at_chance(name):
    ref = load_mask(masks_dir() / "reference" / f"{name}.pth")
    counts = kept_counts(ref)
    scores = torch.rand(ref.shape, generator=torch.Generator().manual_seed(0))
    shuffled = top_count_mask(scores, counts)  # each head keeps as many channels as the reference, chosen at random
    out = compare_masks(shuffled, ref)
    assert torch.equal(out.count_difference, torch.zeros_like(out.counts))
    nonempty = counts > 0
    # per head the expected overlap is E|A and B| / E|A or B| with E|A and B| = a*b/D; averaged over many heads the
    # measured Jaccard must sit near it and far below a learned mask's agreement with itself
    measured, chance = out.jaccard[nonempty].mean(), out.chance_jaccard[nonempty].mean()
    assert 0.15 < float(chance) < 0.4
    assert float(measured) == pytest.approx(float(chance), abs=0.03)
    assert out.summary()["mean_jaccard"] < 0.6


def test_count_differences_and_a_known_overlap():
    a = torch.zeros(1, 2, 8)
    b = torch.zeros(1, 2, 8)
    a[0, 0, :4] = 1  # head 0: a keeps 0-3, b keeps 2-5: overlap 2 of 6
    b[0, 0, 2:6] = 1
    b[0, 1, :2] = 1  # head 1: a keeps nothing, b keeps 2
    out = compare_masks(a, b)
    assert out.jaccard.tolist() == [[pytest.approx(2 / 6), 0.0]]
    assert out.count_difference.tolist() == [[0, -2]]
    assert out.chance_jaccard[0, 0] == pytest.approx((4 * 4 / 8) / (8 - 4 * 4 / 8))
    s = out.summary()
    assert s["channel_jaccard"] == pytest.approx(2 / 8)
    assert s["empty_heads"] == 1 and s["reference_empty_heads"] == 0 and s["empty_in_both"] == 0


def test_masks_of_different_models_are_refused():
    llama = load_mask(masks_dir() / "reference" / "llama3.1-8b-instruct.pth")
    qwen = load_mask(masks_dir() / "reference" / "qwen2.5-7b-instruct.pth")
    with pytest.raises(ValueError, match="different shapes"):
        compare_masks(llama, qwen)
