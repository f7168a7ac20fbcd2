"""Attention hooks: capture changes nothing, simulated LeanK reduces to dense, pruning only touches decode queries."""

import pytest
import torch

from leank_ref.attention import (
    ATTN_NAME,
    QKCapture,
    SimulatedLeanK,
    SimulatedLeanKRows,
    middle_key_mask,
    use_hook,
)
from leank_ref.data import continuation_example
from leank_ref.masks import zero_head_rule
from leank_ref.models import model_facts

CONTEXT, ANSWER, SINK, RECENT = 160, 32, 4, 16


@pytest.fixture(scope="module")
def example(tokenizer):
    return continuation_example(tokenizer, CONTEXT, answer_length=ANSWER, seed=0)


@pytest.fixture(scope="module")
def dense_logits(model, example):
    with torch.no_grad():
        return model(input_ids=example.input_ids[None]).logits[0]  # [T, V]


def _logits(model, ids, hook):
    with torch.no_grad(), use_hook(model, hook):
        return model(input_ids=ids[None]).logits[0]


def test_capture_keeps_logits_and_shapes(model, example, dense_logits):
    facts = model_facts(model)
    capture = QKCapture()
    logits = _logits(model, example.input_ids, capture)
    assert torch.equal(logits, dense_logits)
    t = len(example.input_ids)
    assert sorted(capture.queries) == sorted(capture.keys) == list(range(facts.num_layers))
    assert capture.queries[0].shape == (1, facts.num_heads, t, facts.head_dim)
    assert capture.keys[facts.num_layers - 1].shape == (1, facts.num_kv_heads, t, facts.head_dim)
    assert capture.queries[3].dtype == torch.float32


def test_capture_only_chosen_layers_and_restores_attention(model, example):
    before = model.config._attn_implementation
    capture = QKCapture(layers=[2, 7], num_layers=model_facts(model).num_layers)
    _logits(model, example.input_ids[:40], capture)
    assert sorted(capture.queries) == [2, 7]
    assert model.config._attn_implementation == before != ATTN_NAME


@pytest.mark.parametrize("layers", [[30], [-1], [0, 45]])
def test_capture_layer_out_of_range(layers):
    with pytest.raises(IndexError, match=r"out of range: the model has layers 0\.\.29"):
        QKCapture(layers=layers, num_layers=30)


def test_simulated_all_ones_equals_dense(model, example, dense_logits):
    ones = torch.ones(model_facts(model).mask_shape)
    hook = SimulatedLeanK(ones, sink=SINK, recent=RECENT, decode_start=CONTEXT)
    logits = _logits(model, example.input_ids, hook)
    assert torch.allclose(logits, dense_logits, atol=2e-4), (logits - dense_logits).abs().max()


@pytest.mark.parametrize("exclude_zero_heads", [True, False])
def test_simulated_zeros_change_only_decode_positions(model, example, dense_logits, exclude_zero_heads):
    zeros = torch.zeros(model_facts(model).mask_shape)
    hook = SimulatedLeanK(zeros, sink=SINK, recent=RECENT, decode_start=CONTEXT, exclude_zero_heads=exclude_zero_heads)
    diff = (_logits(model, example.input_ids, hook) - dense_logits).abs().amax(dim=-1)  # [T]
    assert diff[:CONTEXT].max() < 2e-4, diff[:CONTEXT].max()
    assert (diff[CONTEXT:] > 1e-2).all(), diff[CONTEXT:]


def test_middle_key_mask_known_answer():
    # 6 keys, queries at positions 4 and 5, decode from 5, sink 1, recent 2: query 5 prunes keys 1..3.
    mask = middle_key_mask(torch.tensor([4, 5]), n_keys=6, sink=1, recent=2, decode_start=5)
    expected = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_zero_head_rule():
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])  # [L=2, G=2, D=2]
    assert zero_head_rule(mask).tolist() == [[False, True], [True, False]]
    assert not zero_head_rule(mask, deployed=False).any()


def test_simulated_rejects_bad_window():
    with pytest.raises(ValueError, match="recent=0.*need sink >= 0, recent >= 1"):
        SimulatedLeanK(torch.ones(1, 1, 2), sink=4, recent=0)
    with pytest.raises(ValueError, match="sink=-1"):
        SimulatedLeanKRows(QKCapture(values=True), torch.ones(1, 1, 1, 2), sink=-1, recent=4)
    with pytest.raises(ValueError, match="values=True"):
        SimulatedLeanKRows(QKCapture(), torch.ones(1, 1, 1, 2), sink=4, recent=4)
