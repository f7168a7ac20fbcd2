"""The one memory formula equals what a real LeanK cache holds: after a prefill and a few decode steps on SmolLM2,
``memory_formula(mask, tokens, windows)`` gives the bytes of ``LeanKCache.memory_report()`` exactly, at lengths
before, inside and past the first compaction, in fp32 and bf16, for a mask with emptied heads (no middle V)."""

import pytest
import torch

from leank_ref.cache import apply_leank
from leank_ref.masks import binarize, kept_counts
from leank_ref.memory import mask_stats, memory_formula
from leank_ref.models import load_model
from leank_ref.windows import Windows

WINDOWS = Windows(sink=8, recent=24, block=8)
NEW_TOKENS = 5

pytestmark = pytest.mark.usefixtures("one_thread")


def emptied_mask() -> torch.Tensor:
    """A SmolLM2 [30, 3, 64] mask at r=0.8 (align 16) from seeded factors with a per-head scale: several heads keep
    nothing, and one whole layer is emptied on top."""
    g = torch.Generator().manual_seed(0)
    mask = binarize(torch.rand(30, 3, 64, generator=g) * torch.rand(30, 3, 1, generator=g) ** 2, 0.8, 16)
    mask[5] = 0.0
    assert (kept_counts(mask) == 0).sum() >= 4 and (kept_counts(mask) > 0).any()
    return mask


@pytest.fixture(scope="module")
def bf16_model():
    model, _ = load_model(dtype=torch.bfloat16)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prompt_len", [20, 37, 100])  # no middle yet, just past sink + recent, several blocks
def test_formula_equals_the_bytes_a_real_cache_holds(model, bf16_model, dtype, prompt_len):
    lm = model if dtype == torch.float32 else bf16_model
    mask = emptied_mask()
    ids = torch.randint(100, 10_000, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    with apply_leank(lm, mask, WINDOWS, backend="torch") as press:  # the press makes the cache and binds its attention
        lm.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    cache = press.cache
    tokens = prompt_len + NEW_TOKENS - 1  # the last new token is returned, not cached
    report = cache.memory_report()
    expected = memory_formula(mask, tokens, WINDOWS, bytes_per_value=torch.finfo(dtype).bits // 8)
    assert report == expected
    assert report.tokens == tokens and report.middle_tokens == WINDOWS.middle_length(tokens)
    if report.middle_tokens:  # the emptied heads store no middle V; the kept ones store their kept K channels
        assert 0 < report.middle_v < report.dense_middle_v and 0 < report.middle_k < report.dense_middle_k
    stats = mask_stats(mask, tokens, WINDOWS)
    assert (stats.k_saved, stats.v_saved) == (report.k_saved, report.v_saved)
