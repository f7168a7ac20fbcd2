"""The surrogate gradient for emptied heads (TrainSettings.empty_head_gradient="top"): the deployed stage 2's
forward pass and every other gradient unchanged, the emptied heads' factors no longer frozen."""

from __future__ import annotations

import argparse

import pytest
import torch

from leank_ref.data import IGNORE_INDEX, Example
from leank_ref.masks import binarize, kept_counts
from leank_ref.train.cli import add_arguments, settings_from_args
from leank_ref.train.loss import distillation_loss, straight_through
from leank_ref.train.settings import TrainSettings
from leank_ref.train.surrogate import surrogate_channels
from leank_ref.train.trainer import Trainer
from leank_ref.windows import Windows

WINDOWS = Windows(sink=4, recent=8, block=1)
SHAPE = (2, 2, 16)  # layers, KV heads, head_dim


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def random_example(context: int = 40, answer: int = 10) -> Example:
    ids = torch.randint(0, 128, (context + answer,), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[: context + 1] = IGNORE_INDEX
    return Example(ids, context, labels, answer="", task="random")


def settings(gradient: str) -> TrainSettings:
    return TrainSettings.for_stage(2, ratio=0.7, align=4, windows=WINDOWS, empty_head_gradient=gradient)


def loss_and_grad(model, example, factors, mask, gradient):
    leaf = factors.clone().requires_grad_(True)
    loss = distillation_loss(model, example, straight_through(leaf, mask, hard=True), settings(gradient), leaf.detach())
    loss.backward()
    return loss.item(), leaf.grad


def test_surrogate_changes_only_the_emptied_heads_gradients():
    model, example = tiny_llama(), random_example()
    factors = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))
    mask = (factors > 0.5).float()
    mask[0, 1] = 0  # an emptied head: deployed, it skips its middle tokens
    mask[1, 0] = 0
    plain = loss_and_grad(model, example, factors, mask, "none")
    top = loss_and_grad(model, example, factors, mask, "top")
    assert top[0] == plain[0]  # the forward pass is the deployed one, bit for bit
    empty = kept_counts(mask) == 0  # [L, G]
    assert int(empty.sum()) == 2
    torch.testing.assert_close(top[1][~empty], plain[1][~empty], rtol=1e-5, atol=1e-7)
    assert float(plain[1][empty].abs().max()) == 0.0  # without the surrogate an emptied head is frozen
    assert float(top[1][empty].abs().amin(-1).max()) > 0  # with it, its factors get a gradient
    assert float(top[1][empty].abs().max()) > 1e-3 * float(plain[1].abs().max())


def test_surrogate_reads_the_heads_best_channels():
    factors = torch.rand(SHAPE, generator=torch.Generator().manual_seed(2))
    chosen = surrogate_channels(factors, 4)
    assert kept_counts(chosen).eq(4).all()
    for layer in range(SHAPE[0]):
        for head in range(SHAPE[1]):
            top = set(torch.topk(factors[layer, head], 4).indices.tolist())
            assert set(chosen[layer, head].nonzero()[:, 0].tolist()) == top


def test_emptied_heads_move_in_a_training_step_only_with_the_surrogate():
    model, example = tiny_llama(), random_example()
    factors = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3))
    factors[0, 1] = 0.01  # far below the 70% quantile: binarization empties this head
    assert kept_counts(binarize(factors, 0.7, 4))[0, 1] == 0
    moved = {}
    for gradient in ("none", "top"):
        trainer = Trainer(model, None, settings(gradient).replace(steps=3), factors)
        trainer.step(example)
        moved[gradient] = float((trainer.factors.detach()[0, 1] - factors[0, 1]).abs().max())
    assert moved["none"] == 0.0
    assert moved["top"] > 1e-4


def test_the_option_is_checked_and_reaches_the_command_line():
    with pytest.raises(ValueError, match="choose one of"):
        settings("logit0").check(16)
    with pytest.raises(ValueError, match="deployed variant"):
        TrainSettings.for_stage(1, empty_head_gradient="top").check(16)
    with pytest.raises(ValueError, match="deployed variant"):
        settings("top").replace(variant="authors").check(16)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--stage", "2", "--out", "m.pth", "--ratio", "0.7", "--empty-head-gradient", "top"])
    parsed = settings_from_args(args)
    assert parsed.empty_head_gradient == "top"
    assert ["--empty-head-gradient", "top"] == parsed.argv("model", "m.pth", "f.pth")[-2:]
    assert TrainSettings.for_stage(2, ratio=0.7).empty_head_gradient == "none"  # default off
