"""The laptop recipe: presets fill unset options, a pooled step is an ordinary step, the short recipe learns."""

import argparse
import json
from dataclasses import replace

import pytest
import torch

from leank_ref.masks import validate_mask
from leank_ref.models import masks_dir
from leank_ref.presets import PRESETS, PooledTrainer, Preset, apply_preset
from leank_ref.training import TrainConfig, Trainer, evaluate_scales, load_factors, training_example

SHAPE = (30, 3, 64)
SHORT = {"context_min": 256, "context_max": 256}


@pytest.fixture
def keep_threads():
    """apply_preset sets torch's thread count for the process: put it back after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_preset_fills_only_unset_options_and_sets_threads(keep_threads):
    args = argparse.Namespace(recipe="laptop", stage=2, steps=None, lr=None, context_min=512, context_max=None)
    preset = apply_preset(args)
    laptop = PRESETS["laptop"]
    assert preset is laptop and args.steps == laptop.stage2["steps"] and args.context_min == 512
    assert args.context_max == laptop.stage2["context_max"] and args.lr is None  # the stage's own default stays
    assert torch.get_num_threads() == laptop.threads
    assert apply_preset(argparse.Namespace(recipe=None, stage=1)) is None
    with pytest.raises(ValueError, match="choose one of"):
        apply_preset(argparse.Namespace(recipe="phone", stage=1))
    with pytest.raises(ValueError, match="a preset may set"):
        Preset("bad", stage1={"warp": 9})


def test_pooled_step_reuses_the_prefill_exactly(model, tokenizer):
    config = TrainConfig.for_stage(1, steps=3, **SHORT)
    factors = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    pooled, plain = PooledTrainer(model, tokenizer, config, factors, pool=2), Trainer(model, tokenizer, config, factors)
    for step in range(3):  # step 2 reuses the cache of step 0
        example = pooled._entry(step % 2)[0]
        a, b = pooled.step(), plain.step(example)
        assert a["task"] == b["task"] and a["distill_loss"] == pytest.approx(b["distill_loss"], rel=1e-4, abs=1e-9)
        assert torch.allclose(pooled.factors, plain.factors, atol=1e-6)
    assert len(pooled._prepared) == 2


def test_short_laptop_recipe_lowers_the_loss_and_moves_the_mask(model, tokenizer):
    short = replace(PRESETS["laptop"], pool=2)
    # stage 1: six steps over two pooled examples lower the objective on them and shrink every factor's mean
    config = short.config(1, steps=6, **SHORT)
    trainer = short.trainer(model, tokenizer, config)
    result = trainer.run(progress=False)
    pool = [training_example(tokenizer, config, i) for i in range(2)]
    start = torch.ones(SHAPE)
    losses = evaluate_scales(model, pool, {"start": start, "end": result.factors}, config)
    objective = {
        k: sum(v) / len(v) + config.reg_weight * float(f.mean())
        for (k, v), f in zip(losses.items(), (start, result.factors))
    }
    assert objective["end"] < objective["start"]
    assert result.log[-1]["mean_factor"] < result.log[0]["mean_factor"] < 1.0

    # stage 2 from the shipped factors: the mask changes, keeps the target ratio, and the deployed loss falls
    config = short.config(2, steps=6, ratio=0.7, lr=0.02, **SHORT)
    trainer = short.trainer(model, tokenizer, config, load_factors(masks_dir() / "smollm2-135m_stage1_factors.pth"))
    first = trainer.current_mask()
    result = trainer.run(progress=False)
    mask = validate_mask(result.mask, SHAPE, align=config.align)
    assert not torch.equal(mask, first) and abs(1 - float(mask.mean()) - 0.7) < 0.05
    losses = evaluate_scales(model, pool, {"start": first, "end": mask}, config, deployed=True)
    assert sum(losses["end"]) < sum(losses["start"])


def test_command_line_recipe_records_the_preset(tmp_path, keep_threads):
    from leank_ref.__main__ import main

    out = tmp_path / "f.pth"
    argv = ["train", "--recipe", "laptop", "--stage", "1", "--out", str(out), "--steps", "2", "--no-progress"]
    assert main([*argv, "--context-min", "256", "--context-max", "256", "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "f.json").read_text())
    assert meta["recipe"]["name"] == "laptop" and meta["recipe"]["pool"] == PRESETS["laptop"].pool
    assert meta["steps"] == 2 and meta["config"]["context_max"] == 256  # options given on the command line win
    assert meta["config"]["lr"] == TrainConfig().lr
