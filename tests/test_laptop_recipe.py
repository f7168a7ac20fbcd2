"""The laptop preset: it fills unset options, a pooled step is an ordinary step, the short recipe learns."""

import argparse
import json
from dataclasses import replace

import pytest
import torch

from leank_ref.masks import validate_mask
from leank_ref.models import masks_dir
from leank_ref.train.checkpoint import load_factors
from leank_ref.train.cli import settings_from_args
from leank_ref.train.data import training_example
from leank_ref.train.loss import evaluate_scales
from leank_ref.train.settings import PRESETS, TrainSettings, preset_settings
from leank_ref.train.trainer import Trainer

SHAPE = (30, 3, 64)
SHORT = {"context_min": 256, "context_max": 256}


@pytest.fixture
def keep_threads():
    """The train command sets torch's thread count for the process: put it back after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_preset_fills_only_unset_options_and_sets_threads():
    args = argparse.Namespace(preset="laptop", stage=2, steps=None, lr=None, context_min=512, context_max=None)
    settings = settings_from_args(args)
    laptop = PRESETS["laptop"][2]
    assert settings.steps == laptop.steps and settings.context_min == 512
    assert settings.context_max == laptop.context_max and settings.lr == TrainSettings.for_stage(2).lr
    assert settings.threads == laptop.threads == 1  # the train command sets torch's threads from it
    assert settings_from_args(argparse.Namespace(preset=None, stage=1)) == TrainSettings.for_stage(1)
    with pytest.raises(ValueError, match="choose one of"):
        settings_from_args(argparse.Namespace(preset="phone", stage=1))
    with pytest.raises(ValueError, match="unknown setting"):
        preset_settings("laptop", 1, warp=9)


def test_pooled_step_reuses_the_prefill_exactly(model, tokenizer):
    config = TrainSettings.for_stage(1, steps=3, **SHORT)
    factors = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    pooled = Trainer(model, tokenizer, replace(config, pool=2), factors)
    plain = Trainer(model, tokenizer, config, factors)
    for step in range(3):  # step 2 reuses the cache of step 0
        example = pooled.prefilled(step % 2).example
        a, b = pooled.step(), plain.step(example)
        assert a["task"] == b["task"] and a["distill_loss"] == pytest.approx(b["distill_loss"], rel=1e-4, abs=1e-9)
        assert torch.allclose(pooled.factors, plain.factors, atol=1e-6)
    assert len(pooled.pooled) == 2


def test_short_laptop_recipe_lowers_the_loss_and_moves_the_mask(model, tokenizer):
    # stage 1: six steps over two pooled examples lower the objective on them and shrink every factor's mean
    config = preset_settings("laptop", 1, pool=2, steps=6, **SHORT)
    trainer = Trainer(model, tokenizer, config)
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
    config = preset_settings("laptop", 2, pool=2, steps=6, ratio=0.7, lr=0.02, **SHORT)
    trainer = Trainer(model, tokenizer, config, load_factors(masks_dir() / "smollm2-135m_stage1_factors.pth"))
    first = trainer.current_mask()
    result = trainer.run(progress=False)
    mask = validate_mask(result.mask, SHAPE, align=config.align)
    assert not torch.equal(mask, first) and abs(1 - float(mask.mean()) - 0.7) < 0.05
    losses = evaluate_scales(model, pool, {"start": first, "end": mask}, config, deployed=True)
    assert sum(losses["end"]) < sum(losses["start"])


def test_command_line_recipe_records_the_preset(tmp_path, keep_threads):
    from leank_ref.__main__ import main

    out = tmp_path / "f.pth"
    argv = ["train", "--preset", "laptop", "--stage", "1", "--out", str(out), "--steps", "2", "--no-progress"]
    assert main([*argv, "--context-min", "256", "--context-max", "256", "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "f.json").read_text())
    assert meta["preset"] == "laptop" and meta["settings"]["pool"] == PRESETS["laptop"][1].pool
    assert meta["steps"] == 2 and meta["settings"]["context_max"] == 256  # options given on the command line win
    assert meta["settings"]["lr"] == TrainSettings().lr
    assert torch.get_num_threads() == PRESETS["laptop"][1].threads
