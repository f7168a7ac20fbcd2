"""Channel selectors: every one keeps exactly the budget with aligned counts, ThinK scores the channels its paper
says, random is seeded, RoPE picks the slowest pairs, and the equal-budget rule reads the learned mask's counts."""

from types import SimpleNamespace

import pytest
import torch

from leank_ref.attention import capture_prefill
from leank_ref.baselines import (
    SELECTORS,
    Dense,
    KNorm,
    LeanKFactors,
    LeanKLearned,
    RandomChannels,
    RopeLowFrequency,
    StaticImportance,
    ThinK,
    check_counts,
    equal_budget,
    learned_mask_path,
    uniform_counts,
)
from leank_ref.data import continuation_example
from leank_ref.masks import binarize, kept_counts, save_mask, top_count_mask, validate_mask
from leank_ref.models import model_facts
from leank_ref.sparsity import rope_frequencies

SHAPE, ALIGN = (30, 3, 64), 16


@pytest.fixture(scope="module")
def capture(model, tokenizer):
    return capture_prefill(model, continuation_example(tokenizer, 96, seed=5).context_ids)[0]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A stand-in 'shipped' r=0.7 mask with zero-count heads and mixed counts, in a temporary masks folder."""
    g = torch.Generator().manual_seed(1)
    factors = torch.rand(SHAPE, generator=g) * torch.rand(30, 3, 1, generator=g) ** 2
    folder = tmp_path_factory.mktemp("masks")
    mask = binarize(factors, 0.7, ALIGN)
    save_mask(mask, learned_mask_path(0.7, folder))
    return folder, mask, factors


def budgets(learned_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "uniform_0.5": uniform_counts(SHAPE, 0.5, ALIGN),
        "uniform_0.8": uniform_counts(SHAPE, 0.8, ALIGN),
        "learned_0.7": kept_counts(learned_mask),
    }


def test_uniform_counts_are_aligned_even_and_hit_the_ratio():
    for ratio in (0.5, 0.7, 0.8):
        counts = uniform_counts(SHAPE, ratio, ALIGN)
        assert counts.shape == (30, 3) and bool((counts % ALIGN == 0).all())
        assert counts.max() - counts.min() <= ALIGN  # as even as the alignment allows
        assert abs(1 - counts.sum().item() / (90 * 64) - ratio) <= ALIGN / 2 / 64  # within half a block per head
    assert bool((uniform_counts(SHAPE, 0.5, ALIGN) == 32).all())
    counts = uniform_counts(SHAPE, 0.7, ALIGN)
    assert int((counts == 32).sum()) == 18 and int((counts == 16).sum()) == 72


def test_every_selector_keeps_exactly_the_budget(model, tokenizer, capture, learned):
    static = StaticImportance.calibrate(model, tokenizer, num_prompts=1, length=128)
    selectors = [ThinK(), KNorm(), RandomChannels(3), RopeLowFrequency(), static, LeanKFactors(learned[2])]
    assert {s.name for s in selectors} | {"dense", "leank"} == set(SELECTORS)
    for name, counts in budgets(learned[1]).items():
        for selector in selectors:
            mask = selector.select(model, counts, ALIGN, capture=capture)
            assert mask.shape == SHAPE, (selector.name, name)
            assert torch.equal(kept_counts(validate_mask(mask, SHAPE, ALIGN)), counts), (selector.name, name)
    assert bool((Dense().select(model) == 1).all())


def test_learned_selector_returns_the_shipped_mask_and_refuses_another_budget(model, learned):
    folder, mask, _ = learned
    selector = LeanKLearned.for_ratio(0.7, folder)
    assert torch.equal(selector.select(model, kept_counts(mask), ALIGN), mask)
    with pytest.raises(ValueError, match="other per-head counts"):
        selector.select(model, uniform_counts(SHAPE, 0.7, ALIGN), ALIGN)
    with pytest.raises(FileNotFoundError, match="train"):
        LeanKLearned.for_ratio(0.5, folder)


def test_equal_budget_uses_the_learned_counts_where_a_mask_exists(model, learned):
    folder, mask, _ = learned
    counts, source = equal_budget(model, 0.7, ALIGN, folder)
    assert source == "leank" and torch.equal(counts, kept_counts(mask))
    counts, source = equal_budget(model, 0.8, ALIGN, folder)
    assert source == "uniform" and torch.equal(counts, uniform_counts(SHAPE, 0.8, ALIGN))


def hand_capture(q: torch.Tensor, k: torch.Tensor) -> SimpleNamespace:
    """A one-layer capture: queries [1, H, T, D], keys [1, G, T, D]."""
    return SimpleNamespace(queries={0: q}, keys={0: k})


def test_think_score_picks_the_channels_with_large_query_times_key():
    # 1 layer, 2 KV heads, 4 query heads (GQA 2:1), D = 8, T = 10 tokens, window 4.
    h, g, t, d = 4, 2, 10, 8
    q = torch.full((1, h, t, d), 0.1)
    k = torch.full((1, g, t, d), 0.1)
    q[:, :, -4:, 2] = 3.0  # channel 2: large q in the window and large k -> top
    k[:, :, :, 2] = 2.0
    k[:, :, :, 5] = 5.0  # channel 5: the largest keys but queries near 0 -> ThinK must not pick it
    q[:, :, :, 5] = 0.0
    q[:, :, :-4, 7] = 50.0  # channel 7: huge queries only *before* the window -> ignored by ThinK
    q[:, :, -4:, 6] = 1.0  # channel 6: moderate q and k -> second
    k[:, :, :, 6] = 1.0
    scores = ThinK(window=4).scores(None, hand_capture(q, k))  # [1, G, D]
    assert scores.shape == (1, g, d)
    expected = (q[0, :, -4:].pow(2).sum(1).reshape(g, 2, d).sum(1) * k[0].pow(2).sum(1)).sqrt()
    torch.testing.assert_close(scores[0], expected)
    mask = top_count_mask(scores, torch.full((1, g), 2))
    assert mask[0].nonzero()[:, 1].tolist() == [2, 6, 2, 6]
    knorm = top_count_mask(KNorm().scores(None, hand_capture(q, k)), torch.full((1, g), 2))
    assert knorm[0].nonzero()[:, 1].tolist() == [2, 5, 2, 5]  # key norm alone prefers channel 5


def test_think_adds_the_query_heads_of_a_kv_head():
    # KV head 0 serves query heads 0, 1; only query head 1 uses channel 3, so KV head 0 (not 1) must keep it.
    q = torch.zeros(1, 4, 6, 8)
    q[:, 1, :, 3] = 1.0
    q[:, :, :, 0] = 0.5
    k = torch.ones(1, 2, 6, 8)
    mask = top_count_mask(ThinK(window=6).scores(None, hand_capture(q, k)), torch.full((1, 2), 1))
    assert mask[0, 0].nonzero().flatten().tolist() == [3]
    assert mask[0, 1].nonzero().flatten().tolist() == [0]


def test_random_is_seeded_and_the_same_for_every_prompt(model, capture):
    counts = uniform_counts(SHAPE, 0.7, ALIGN)
    a = RandomChannels(7).select(model, counts, ALIGN)
    assert torch.equal(a, RandomChannels(7).select(model, counts, ALIGN, capture=capture))
    assert not torch.equal(a, RandomChannels(8).select(model, counts, ALIGN))


def test_rope_selector_keeps_whole_slowest_pairs(model):
    mask = RopeLowFrequency().select(model, uniform_counts(SHAPE, 0.5, ALIGN), ALIGN)
    freq = rope_frequencies(64, model_facts(model).rope_theta)
    kept = mask[0, 0].bool()
    assert freq[kept].max() < freq[~kept].min()  # every kept channel rotates slower than every pruned one
    assert torch.equal(kept[:32], kept[32:])  # both halves of each rotating pair
    assert torch.equal(mask, mask[:1, :1].expand(SHAPE))


def test_per_prompt_selectors_differ_between_prompts(model, tokenizer, capture):
    other, _ = capture_prefill(model, continuation_example(tokenizer, 96, seed=6).context_ids)
    counts = uniform_counts(SHAPE, 0.7, ALIGN)
    assert not torch.equal(
        ThinK().select(model, counts, ALIGN, capture=capture), ThinK().select(model, counts, ALIGN, capture=other)
    )


def test_bad_budgets_and_missing_prompts_give_clear_errors(model):
    with pytest.raises(ValueError, match=r"\[30, 3\]"):
        check_counts(torch.full((30, 2), 16), SHAPE, ALIGN)
    with pytest.raises(ValueError, match="multiple of align=16"):
        check_counts(torch.full((30, 3), 24), SHAPE, ALIGN)
    with pytest.raises(ValueError, match="pass prompt_ids"):
        ThinK().select(model, uniform_counts(SHAPE, 0.5, ALIGN), ALIGN)
    with pytest.raises(ValueError, match="must divide"):
        uniform_counts(SHAPE, 0.5, 24)
    with pytest.raises(ValueError, match="model needs"):
        LeanKFactors(torch.ones(2, 3, 64)).select(model, uniform_counts(SHAPE, 0.5, ALIGN), ALIGN)
