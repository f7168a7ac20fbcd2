"""Sparsity metrics: known answers on hand-built q/k, the exact factorisation, RoPE layout, bad input."""

import pytest
import torch

from leank_ref.attention import QKCapture, use_hook
from leank_ref.sparsity import (
    capture_importance,
    channel_importance,
    concentration_curve,
    importance_share,
    mass_in_top,
    rope_frequencies,
    top_channels,
    top_count,
    topk_overlap,
)


def test_importance_of_constant_q_and_k():
    # B=1, H=4 query heads, G=2 KV heads (query heads 0,1 -> KV head 0; 2,3 -> KV head 1), D=3.
    qv = torch.tensor([[1.0, -2.0, 0.0], [3.0, 2.0, 0.0], [0.0, 1.0, 1.0], [0.0, -1.0, 3.0]])  # [H, D]
    kv = torch.tensor([[2.0, 1.0, 5.0], [-1.0, 0.0, 2.0]])  # [G, D]
    q = qv[None, :, None, :].expand(1, 4, 5, 3)  # [B, H, T=5, D]
    k = kv[None, :, None, :].expand(1, 2, 7, 3)  # [B, G, N=7, D]
    imp = channel_importance({4: q}, {4: k})
    expected = torch.tensor([[[2.0 * 2.0, 2.0 * 1.0, 0.0], [0.0 * 1.0, 1.0 * 0.0, 2.0 * 2.0]]])  # mean_h |q| * |k|
    assert imp.shape == (1, 2, 3)
    assert torch.allclose(imp, expected)


def test_factorisation_equals_mean_over_all_pairs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 8, generator=g)  # [B, H, T, D]
    k = torch.randn(2, 3, 9, 8, generator=g)  # [B, G, N, D]
    k_per_head = k.repeat_interleave(2, dim=1)  # [B, H, N, D]
    pairs = q.abs()[:, :, :, None, :] * k_per_head.abs()[:, :, None, :, :]  # [B, H, T, N, D]
    brute = pairs.reshape(2, 3, 2, 5, 9, 8).mean(dim=(0, 2, 3, 4))  # [G, D]
    imp = channel_importance([q], [k])
    assert torch.allclose(imp[0], brute, atol=1e-6)


def test_layers_in_sorted_order():
    q = {l: torch.full((1, 2, 3, 4), float(l + 1)) for l in (5, 1, 3)}
    k = {l: torch.ones(1, 1, 3, 4) for l in (3, 5, 1)}
    assert channel_importance(q, k)[:, 0, 0].tolist() == [2.0, 4.0, 6.0]


def test_share_concentration_and_mass_in_top():
    imp = torch.tensor([[[1.0, 3.0, 0.0, 4.0], [1.0, 1.0, 1.0, 1.0]]])  # [L=1, G=2, D=4]
    assert torch.allclose(importance_share(imp)[0, 0], torch.tensor([0.125, 0.375, 0.0, 0.5]))
    assert torch.allclose(concentration_curve(imp)[0, 0], torch.tensor([0.5, 0.875, 1.0, 1.0]))
    assert torch.allclose(concentration_curve(imp)[0, 1], torch.tensor([0.25, 0.5, 0.75, 1.0]))
    assert torch.allclose(mass_in_top(imp, 0.5), torch.tensor([[0.875, 0.5]]))
    assert torch.allclose(mass_in_top(imp, 0.25), torch.tensor([[0.5, 0.25]]))


def test_top_count():
    assert top_count(64, 0.3) == 19
    assert top_count(64, 0.5) == 32
    assert top_count(64, 0.001) == 1
    assert top_count(128, 1.0) == 128


def test_top_channels_and_overlap():
    a = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])
    assert top_channels(a, 0.5).tolist() == [[[True, True, False, False]]]
    ties = torch.ones(1, 1, 4)
    assert top_channels(ties, 0.5).tolist() == [[[True, True, False, False]]]  # ties -> lower index
    assert topk_overlap(a, a, 0.5).tolist() == [[1.0]]
    assert topk_overlap(a, torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]), 0.5).tolist() == [[0.0]]
    assert topk_overlap(a, torch.tensor([[[4.0, 1.0, 3.0, 2.0]]]), 0.5).tolist() == [[0.5]]
    assert topk_overlap(a, 10 * a, 0.25).tolist() == [[1.0]]  # the scale of importance does not matter


def test_rope_frequencies_known_values():
    assert torch.allclose(rope_frequencies(4, 100.0), torch.tensor([1.0, 0.1, 1.0, 0.1]))
    f = rope_frequencies(64, 1e5)
    assert f.shape == (64,)
    assert torch.equal(f[:32], f[32:])
    assert f[0] == 1.0 and f[31] == pytest.approx(1e5 ** (-62 / 64))


def test_rope_frequencies_match_the_model(model):
    """Same frequencies as the model's rotary embedding, and channel c pairs with c + D/2 at that frequency."""
    rotary = model.model.rotary_emb
    f = rope_frequencies(64, 1e5)
    assert torch.allclose(f[:32], rotary.inv_freq.float(), rtol=1e-6)

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    position = 7
    x = torch.zeros(1, 1, 1, 64)
    cos, sin = rotary(x, torch.tensor([[position]]))  # [1, 1, 64]
    for c in (0, 5, 31):
        unit = torch.zeros(1, 1, 1, 64)
        unit[..., c] = 1.0
        rotated, _ = apply_rotary_pos_emb(unit, unit, cos, sin)
        nonzero = rotated[0, 0, 0].abs() > 1e-6
        assert set(nonzero.nonzero().flatten().tolist()) <= {c, c + 32}
        angle = torch.atan2(rotated[0, 0, 0, c + 32], rotated[0, 0, 0, c])
        assert torch.isclose(
            torch.remainder(angle, 2 * torch.pi), torch.remainder(position * f[c], 2 * torch.pi), atol=1e-4
        )


def test_capture_importance_matches_manual_capture(model, tokenizer):
    ids = torch.tensor(tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"])
    imp = capture_importance(model, ids, layers=[29, 0])
    assert imp.shape == (2, 3, 64)
    capture = QKCapture(layers=[0, 29])
    with torch.no_grad(), use_hook(model, capture):
        model(input_ids=ids[None])
    assert torch.allclose(imp, channel_importance(capture.queries, capture.keys))
    assert torch.allclose(imp, capture_importance(model, ids[None], layers=[0, 29]))
    assert (imp >= 0).all() and (imp.sum(-1) > 0).all()


@pytest.mark.parametrize("layers", [[30], [-1]])
def test_capture_importance_layer_out_of_range(model, layers):
    with pytest.raises(IndexError, match=r"out of range: the model has layers 0\.\.29"):
        capture_importance(model, torch.tensor([1, 2, 3]), layers=layers)


def test_bad_inputs():
    q, k = torch.ones(1, 4, 3, 8), torch.ones(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"queries cover layers \[0\] but keys cover \[1\]"):
        channel_importance({0: q}, {1: k})
    with pytest.raises(ValueError, match="capture queries and keys of at least one layer"):
        channel_importance({}, {})
    with pytest.raises(ValueError, match=r"expected query \[B, H, T, D\]"):
        channel_importance([q[0]], [k])
    with pytest.raises(ValueError, match="must share batch and head_dim"):
        channel_importance([q], [torch.ones(1, 3, 3, 8)])
    with pytest.raises(ValueError, match=r"frac=0 must lie in \(0, 1\]"):
        mass_in_top(torch.ones(1, 1, 8), 0)
    with pytest.raises(ValueError, match=r"frac=1.5 must lie in \(0, 1\]"):
        topk_overlap(torch.ones(1, 1, 8), torch.ones(1, 1, 8), 1.5)
    with pytest.raises(ValueError, match="compare the same layers"):
        topk_overlap(torch.ones(2, 1, 8), torch.ones(1, 1, 8), 0.3)
    with pytest.raises(ValueError, match=r"importance must be \[layers, kv_heads, head_dim\]"):
        concentration_curve(torch.ones(8))
    with pytest.raises(ValueError, match="zero total importance"):
        importance_share(torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="positive even number"):
        rope_frequencies(63, 1e4)
    with pytest.raises(ValueError, match="must be > 1"):
        rope_frequencies(64, 1.0)
