"""Masks: binarization known answers, the released masks round-trip, bad masks are refused with the fix."""

from pathlib import Path

import pytest
import torch

from leank_ref.masks import binarize, kept_counts, load_mask, save_mask, top_count_mask, validate_mask
from leank_ref.memory import mask_stats
from leank_ref.windows import Windows

REFERENCE = Path(__file__).resolve().parent.parent / "masks" / "reference"
RELEASED = {
    "llama3.1-8b-instruct.pth": ((32, 8, 128), {0: 47, 32: 120, 64: 67, 96: 22}),
    "qwen2.5-7b-instruct.pth": ((28, 4, 128), {0: 35, 32: 34, 64: 33, 96: 10}),
}

# Four heads of 8 channels; 16 "high" factors above every "low" one, so ratio 0.5 puts the threshold between them.
# Heads hold 2, 6, 1 and 7 highs; head 0's lows are tied (0.1).
HALVES = torch.tensor(
    [
        [
            [0.1, 0.9, 0.1, 0.1, 0.8, 0.1, 0.1, 0.1],
            [0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.2, 0.3],
            [0.05, 0.05, 0.95, 0.05, 0.05, 0.05, 0.05, 0.05],
            [0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.0],
        ]
    ]
)  # [L=1, G=4, D=8]

# A permutation of 0..39 as [1, 5, 8]: the 0.5-quantile is 19.5, the 0.7-quantile 27.3.
PERM = torch.tensor(
    [
        [
            [4, 16, 21, 5, 11, 14, 39, 29],
            [17, 26, 2, 6, 20, 25, 24, 1],
            [15, 32, 28, 18, 9, 0, 10, 19],
            [8, 36, 27, 7, 37, 38, 31, 30],
            [35, 12, 3, 34, 33, 22, 23, 13],
        ]
    ]
).float()


def test_binarize_rounds_halves_up_and_small_heads_to_zero():
    mask = binarize(HALVES, 0.5, align=4)
    # counts 2 -> 4 (exact half, up), 6 -> 8 (exact half, up), 1 -> 0, 7 -> 8
    assert kept_counts(mask).tolist() == [[4, 8, 0, 8]]
    # head 0 keeps its two highs (channels 1, 4) and the tied lows with the lowest indices (0, 2)
    assert mask[0, 0].tolist() == [1, 1, 1, 0, 1, 0, 0, 0]
    assert mask[0, 2].sum() == 0
    assert mask.dtype == torch.float32


def test_binarize_align_one_keeps_raw_counts():
    assert kept_counts(binarize(HALVES, 0.5, align=1)).tolist() == [[2, 6, 1, 7]]


def test_binarize_all_equal_factors_keeps_everything():
    # every factor equals the quantile, so every factor is >= the threshold (the authors' rule)
    assert torch.equal(binarize(torch.full((2, 3, 8), 0.5), 0.7, align=4), torch.ones(2, 3, 8))


def test_binarize_ratio_05_align_4():
    mask = binarize(PERM, 0.5, align=4)
    # counts >= 19.5 per head: 3, 4, 2, 6, 5 -> rounded to 4, 4, 4, 8, 4
    expected = torch.tensor(
        [
            [
                [0, 1, 1, 0, 0, 0, 1, 1],
                [0, 1, 0, 0, 1, 1, 1, 0],
                [0, 1, 1, 1, 0, 0, 0, 1],
                [1, 1, 1, 1, 1, 1, 1, 1],
                [1, 0, 0, 1, 1, 0, 1, 0],
            ]
        ]
    ).float()
    assert torch.equal(mask, expected)


def test_binarize_ratio_07_align_2():
    mask = binarize(PERM, 0.7, align=2)
    # counts >= 27.3 per head: 2, 0, 2, 5, 3 -> rounded to 2, 0, 2, 6, 4; realised pruned ratio 26/40, not 0.7
    expected = torch.tensor(
        [
            [
                [0, 0, 0, 0, 0, 0, 1, 1],
                [0, 0, 0, 0, 0, 0, 0, 0],
                [0, 1, 1, 0, 0, 0, 0, 0],
                [0, 1, 1, 0, 1, 1, 1, 1],
                [1, 0, 0, 1, 1, 0, 1, 0],
            ]
        ]
    ).float()
    assert torch.equal(mask, expected)
    assert mask_stats(mask, 100, Windows(0, 1, 1)).pruned_ratio == pytest.approx(26 / 40)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_masks_round_trip(name, tmp_path):
    shape, histogram = RELEASED[name]
    mask = load_mask(REFERENCE / name, shape=shape, align=32)
    assert mask.dtype == torch.float32 and tuple(mask.shape) == shape
    stats = mask_stats(mask, 8192, Windows(128, 768, 128))
    assert stats.count_histogram == histogram
    assert stats.zero_heads == histogram[0]
    save_mask(mask, tmp_path / "sub" / name)
    again = load_mask(tmp_path / "sub" / name, shape=shape, align=32)
    assert torch.equal(again, mask)


def test_llama_mask_kept_share():
    mask = load_mask(REFERENCE / "llama3.1-8b-instruct.pth")
    assert mask.mean().item() == pytest.approx(0.3125)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.3])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="must lie strictly between 0 and 1"):
        binarize(PERM, ratio, align=2)


@pytest.mark.parametrize("align", [3, 0, 16])
def test_align_not_dividing_head_dim(align):
    with pytest.raises(ValueError, match=r"must divide head_dim=8; choose one of \[1, 2, 4, 8\]"):
        binarize(PERM, 0.5, align=align)


def test_wrong_shape():
    mask = load_mask(REFERENCE / "llama3.1-8b-instruct.pth")
    with pytest.raises(ValueError, match=r"has shape \[32, 8, 128\] but the model needs \[30, 3, 64\]"):
        validate_mask(mask, shape=(30, 3, 64))
    with pytest.raises(ValueError, match=r"must be \[layers, kv_heads, head_dim\]; got a 2-D tensor"):
        validate_mask(torch.ones(4, 8))


def test_values_other_than_zero_one(tmp_path):
    bad = torch.ones(2, 2, 8)
    bad[1, 0, 3] = 0.5
    with pytest.raises(ValueError, match="only 0 and 1.*Binarize factors first"):
        validate_mask(bad)
    with pytest.raises(ValueError, match="only 0 and 1"):
        save_mask(bad, tmp_path / "bad.pth")
    assert not (tmp_path / "bad.pth").exists()


def test_counts_not_multiple_of_align():
    mask = torch.ones(2, 2, 8)
    mask[0, 1, :5] = 0  # keeps 3
    with pytest.raises(
        ValueError, match=r"not a multiple of align=4 \(e.g. layer 0 head 1 keeps 3\); binarize with align=4"
    ):
        validate_mask(mask, align=4)


def test_load_non_tensor(tmp_path):
    torch.save({"mask": torch.ones(1, 1, 8)}, tmp_path / "dict.pth")
    with pytest.raises(ValueError, match=r"holds a dict, not a \[L, G, D\] tensor"):
        load_mask(tmp_path / "dict.pth")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_factors_and_masks_are_refused(bad, tmp_path):
    factors = torch.rand(2, 3, 16)
    factors[1, 2, 5] = bad
    with pytest.raises(ValueError, match=r"NaN/inf.*torch.nan_to_num"):
        binarize(factors, 0.5, 4)
    mask = torch.ones(2, 3, 16)
    mask[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"NaN/inf.*binarize finite factors"):
        validate_mask(mask)
    torch.save(mask, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="NaN/inf"):
        load_mask(tmp_path / "bad.pth")


def test_top_count_mask_is_the_ranking_binarize_uses():
    scores = torch.tensor([[[0.3, 0.9, 0.3, 0.1]]])
    assert top_count_mask(scores, torch.tensor([[2]])).tolist() == [[[1.0, 1.0, 0.0, 0.0]]]  # tie: lower index
    assert torch.equal(binarize(scores, 0.5, 1), top_count_mask(scores, torch.tensor([[3]])))  # 3 scores >= 0.3


PAPER = Path(__file__).resolve().parent.parent / "masks" / "paper"


@pytest.mark.parametrize("windows", [Windows(128, 768, 128), Windows(64, 256, 64)], ids=str)
def test_paper_window_masks_are_what_their_commands_make(windows):
    """The masks trained for the paper's windows: each file's metadata holds the settings of the command that makes
    it (the windows grid's own training commands), stage 2 started from the committed stage-1 factors, and the
    committed mask has the kept counts its metadata recorded."""
    import hashlib
    import json

    from leank_ref.baselines import learned_mask_path, stage1_factors_path
    from leank_ref.evaluate.windows_grid import RATIOS, TRAIN_RECENT, training_commands

    factors = stage1_factors_path(PAPER.parent, windows=windows)
    stage1 = json.loads(factors.with_suffix(".json").read_text())["settings"]
    recent = TRAIN_RECENT[windows.recent]
    assert stage1["windows"] == {"sink": windows.sink, "recent": recent, "block": windows.block}
    assert (stage1["steps"], stage1["context_min"], stage1["context_max"]) == (2000, 2048, 8192)
    commands = training_commands(windows, RATIOS, PAPER.parent)
    assert f"--sink {windows.sink} --recent {recent} --block {windows.block} " in commands[0]
    assert "--context-min 2048 --context-max 8192 --pool 32" in commands[0]
    for ratio in RATIOS:
        path = learned_mask_path(ratio, PAPER.parent, windows=windows)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["settings"]["ratio"] == ratio and meta["settings"]["steps"] == 200
        assert meta["settings"]["windows"] == stage1["windows"] and meta["settings"]["context_max"] == 8192
        assert meta["input_factors"]["sha256"] == hashlib.sha256(factors.read_bytes()).hexdigest()
        counts = kept_counts(load_mask(path, (30, 3, 64), meta["settings"]["align"]))
        assert {int(k): v for k, v in meta["mask"]["count_histogram"].items()} == {
            int(c): int((counts == c).sum()) for c in counts.unique()
        }
