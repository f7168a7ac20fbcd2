"""Two-stage training on the real SmolLM2: the shared-prefill shortcut, STE, deploy-exact stage 2, schedule, resume,
masks, CLI, errors."""

import json

import pytest
import torch

from leank_ref.attention import SimulatedLeanK, use_hook
from leank_ref.masks import binarize, kept_counts, load_mask, validate_mask
from leank_ref.models import masks_dir
from leank_ref.train.checkpoint import load_factors, save_factors
from leank_ref.train.data import held_out_examples, training_example
from leank_ref.train.loss import (
    answer_hidden_states,
    distillation_loss,
    evaluate_scales,
    prefill_context,
    straight_through,
    student_hook,
)
from leank_ref.train.schedule import TrapezoidSchedule
from leank_ref.train.settings import TrainSettings
from leank_ref.train.trainer import Trainer

SHAPE = (30, 3, 64)
SHORT = {"context_min": 256, "context_max": 256}  # short contexts keep each step well under a second


def random_factors(seed: int = 0) -> torch.Tensor:
    """Factors [L, G, D] spread over (0, 1), as a stage-1 run might leave them."""
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_straight_through_passes_gradient_unchanged():
    factors = torch.rand(SHAPE, requires_grad=True)
    mask = (torch.rand(SHAPE) < 0.3).float()
    upstream = torch.randn(SHAPE)
    masked = straight_through(factors, mask)
    assert torch.equal(masked, torch.where(mask == 1, factors, torch.zeros_like(factors)))
    (masked * upstream).sum().backward()
    assert torch.equal(factors.grad, upstream)  # pruned channels get the gradient too (plain masking would zero it)


def test_hard_straight_through_forwards_the_mask_and_passes_gradient_unchanged():
    factors = torch.rand(SHAPE, requires_grad=True)
    mask = (torch.rand(SHAPE) < 0.3).float()
    upstream = torch.randn(SHAPE)
    scale = straight_through(factors, mask, hard=True)
    assert torch.equal(scale, mask)  # kept channels unscaled: exactly the deployed 0/1 mask
    (scale * upstream).sum().backward()
    assert torch.equal(factors.grad, upstream)


def test_trapezoid_schedule_matches_the_authors_formula():
    schedule = TrapezoidSchedule(2000)
    authors = lambda i: min(1, max((i + 1) / (2000 // 5), 0.1), max((2000 - i) / (2000 // 5), 0.1))  # noqa: E731
    for i in (0, 39, 40, 199, 399, 400, 1000, 1600, 1700, 1961, 1999):
        assert schedule(i) == pytest.approx(authors(i))
    assert schedule(0) == pytest.approx(0.1) and schedule(1000) == 1.0 and schedule(1800) == pytest.approx(0.5)


def test_shared_prefill_equals_two_full_passes(model, tokenizer):
    config = TrainSettings.for_stage(1, context_min=300, context_max=300)
    example = training_example(tokenizer, config, 0)
    n = example.length_context
    factors = random_factors(1).requires_grad_(True)

    shortcut = distillation_loss(model, example, factors, config)
    shortcut.backward()
    grad_shortcut, factors.grad = factors.grad.clone(), None

    ids = example.input_ids[None]  # [1, T]
    with torch.no_grad():
        teacher = model.base_model(input_ids=ids).last_hidden_state[0, n:]
    hook = SimulatedLeanK(factors, config.windows.sink, config.windows.recent, decode_start=n, exclude_zero_heads=False)
    with use_hook(model, hook):
        student = model.base_model(input_ids=ids).last_hidden_state[0, n:]
    full = (student - teacher).pow(2).mean(-1).mean()
    full.backward()

    assert shortcut.item() > 0.05  # random factors really change the answer's hidden states
    assert shortcut.item() == pytest.approx(full.item(), rel=1e-4)
    torch.testing.assert_close(grad_shortcut, factors.grad, rtol=1e-3, atol=1e-6)


def test_five_stage1_steps_lower_the_loss_and_the_mean_factor(model, tokenizer):
    config = TrainSettings.for_stage(1, steps=5, **SHORT)
    trainer = Trainer(model, tokenizer, config)
    start = trainer.factors.detach().cpu().clone()
    result = trainer.run(progress=False)

    means = [rec["mean_factor"] for rec in result.log]
    assert len(result.log) == 5 and all(a > b for a, b in zip([1.0] + means, means))
    assert float(result.factors.min()) >= 0 and float(result.factors.max()) <= 1
    assert {"distill_loss", "reg_loss", "lr", "mean_factor", "share_below_0.1"} <= set(result.log[0])

    examples = held_out_examples(tokenizer, config, 2)
    losses = evaluate_scales(model, examples, {"start": start, "end": result.factors}, config)
    objective = {
        k: sum(v) / len(v) + config.reg_weight * float(f.mean())
        for (k, v), f in zip(losses.items(), (start, result.factors))
    }
    assert objective["end"] < objective["start"]


def test_stage2_recomputes_an_aligned_mask_and_pruned_channels_still_learn(model, tokenizer):
    config = TrainSettings.for_stage(2, steps=2, ratio=0.7, align=16, **SHORT)
    trainer = Trainer(model, tokenizer, config, random_factors(2))
    first_mask = trainer.current_mask()
    before = trainer.factors.detach().clone()
    trainer.step()
    moved = trainer.factors.detach() != before
    assert bool(moved[first_mask == 0].any())  # the STE lets pruned channels move (and re-enter)
    result = trainer.run(progress=False)

    mask = validate_mask(result.mask, SHAPE, align=16)
    assert bool((kept_counts(mask) % 16 == 0).all())
    assert torch.equal(mask, trainer.current_mask())  # shipped mask = binarize(final factors)
    for rec in result.log:
        assert abs(rec["pruned_ratio"] - 0.7) < 0.1 and rec["reg_loss"] > 0 and rec["lr"] > 0
    assert result.log[0]["pruned_ratio"] == pytest.approx(1 - float(first_mask.mean()))


def test_resumed_run_equals_an_uninterrupted_one(model, tokenizer, tmp_path):
    config = TrainSettings.for_stage(2, steps=4, ratio=0.5, **SHORT)
    whole = Trainer(model, tokenizer, config, random_factors(3)).run(progress=False)

    path = tmp_path / "run.ckpt"
    Trainer(model, tokenizer, config, random_factors(3)).run(checkpoint=path, until=2, progress=False)
    resumed_trainer = Trainer(model, tokenizer, config, random_factors(3))
    resumed = resumed_trainer.run(checkpoint=path, resume=True, progress=False)

    assert resumed_trainer.next_step == 4 and len(resumed.log) == 4
    assert torch.equal(whole.factors, resumed.factors) and torch.equal(whole.mask, resumed.mask)
    drop = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]  # noqa: E731
    assert drop(whole.log) == drop(resumed.log)


def test_bad_inputs_raise_errors_that_name_the_fix(model, tokenizer, tmp_path):
    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            Trainer(model, tokenizer, TrainSettings.for_stage(2, ratio=ratio), random_factors())
    with pytest.raises(ValueError, match="must divide head_dim=64"):
        Trainer(model, tokenizer, TrainSettings.for_stage(1, align=12))
    with pytest.raises(ValueError, match="stage 2 needs ratio"):
        Trainer(model, tokenizer, TrainSettings.for_stage(2), random_factors())
    with pytest.raises(ValueError, match="pass factors="):
        Trainer(model, tokenizer, TrainSettings.for_stage(2, ratio=0.5))
    with pytest.raises(ValueError, match=r"shape \[30, 3, 128\] but the model needs \[30, 3, 64\]"):
        Trainer(model, tokenizer, TrainSettings.for_stage(1), torch.ones(30, 3, 128))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        Trainer(model, tokenizer, TrainSettings.for_stage(1), random_factors() * 3)

    factors_path = tmp_path / "factors.pth"
    save_factors(random_factors(), factors_path)
    with pytest.raises(ValueError, match="only 0 and 1.*Binarize factors first"):
        load_mask(factors_path)  # factors handed over where a mask is expected
    with pytest.raises(ValueError, match="the model needs"):
        load_factors(factors_path, (32, 8, 128))

    config = TrainSettings.for_stage(1, steps=3, **SHORT)
    checkpoint = tmp_path / "run.ckpt"
    Trainer(model, tokenizer, config).save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="other settings .*lr: 0.02 -> 0.05"):
        Trainer(model, tokenizer, TrainSettings.for_stage(1, steps=3, lr=0.05, **SHORT)).load_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["mask_shape"] = [32, 8, 128]
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="made for another model"):
        Trainer(model, tokenizer, config).load_checkpoint(checkpoint)


def test_command_line_writes_factors_mask_metadata_and_log(tmp_path):
    from leank_ref.__main__ import main

    common = ["--steps", "2", "--context-min", "256", "--context-max", "256", "--device", "cpu", "--no-progress"]
    factors_path = tmp_path / "f.pth"
    assert main(["train", "--stage", "1", "--out", str(factors_path), *common]) == 0
    factors = load_factors(factors_path, SHAPE)
    assert float(factors.max()) < 1.0
    meta = json.loads((tmp_path / "f.json").read_text())
    assert meta["stage"] == 1 and meta["steps"] == 2 and meta["seed"] == 0
    assert {"git_commit", "leank_ref", "torch", "device"} <= set(meta["provenance"])
    assert len((tmp_path / "f.log.jsonl").read_text().splitlines()) == 2

    mask_path = tmp_path / "m.pth"
    argv = ["train", "--stage", "2", "--factors", str(factors_path), "--ratio", "0.5", "--out", str(mask_path)]
    assert main([*argv, *common]) == 0
    mask = load_mask(mask_path, SHAPE, align=16)
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["mask"]["pruned_ratio"] == pytest.approx(1 - float(mask.mean()))
    assert meta["settings"]["lr"] == 0.01 and meta["settings"]["reg_weight"] == 0.0  # the authors' stage-2 values


SHIPPED_FACTORS = masks_dir() / "smollm2-135m_stage1_factors.pth"


def leank_cache_hidden_states(model, example, mask, config) -> torch.Tensor:
    """Final hidden states [n_labels, hidden] of the answer tokens, decoded one token at a time through the real
    LeanK cache (block 1, so the recent window is exactly ``config.recent``), teacher-forced."""
    from leank_ref.cache import apply_leank
    from leank_ref.models import cache_argument
    from leank_ref.windows import Windows

    n = example.length_context
    keyword = cache_argument(model.base_model)
    states = []
    with (
        torch.no_grad(),
        apply_leank(model, mask, Windows(config.windows.sink, config.windows.recent, 1), backend="torch") as lk,
    ):
        cache = lk.new_cache()
        model.base_model(input_ids=example.context_ids[None], use_cache=True, **{keyword: cache})
        for token in example.input_ids[n:]:
            out = model.base_model(input_ids=token.view(1, 1), use_cache=True, **{keyword: cache})
            states.append(out.last_hidden_state[0, -1].float())
    keep = example.labels[n:] != -100
    return torch.stack(states)[keep]  # [n_labels, hidden]


def test_deployed_stage2_forward_equals_the_leank_cache_and_the_authors_one_does_not(model, tokenizer):
    config = TrainSettings.for_stage(2, ratio=0.7, context_min=300, context_max=300, tasks=("passkey",))
    example = training_example(tokenizer, config, 0)
    factors = load_factors(SHIPPED_FACTORS, SHAPE).requires_grad_(True)
    mask = binarize(factors.detach(), 0.7, 16)
    assert int((kept_counts(mask) == 0).sum()) > 0  # the zero-count-head rule is exercised

    cache = prefill_context(model, example)
    deployed = answer_hidden_states(
        model, cache, example, student_hook(straight_through(factors, mask, hard=True), example, config)
    )
    authors_config = TrainSettings.for_stage(2, ratio=0.7, variant="authors")
    authors = answer_hidden_states(
        model, cache, example, student_hook(straight_through(factors, mask), example, authors_config)
    )
    reference = leank_cache_hidden_states(model, example, mask, config)

    torch.testing.assert_close(deployed.detach(), reference, rtol=1e-4, atol=1e-4)
    assert float((authors.detach() - reference).abs().max()) > 1e-2  # the authors' forward is another model
    deployed.pow(2).sum().backward()
    assert bool((factors.grad != 0).any())  # and the hard forward still sends a gradient to the factors


def test_short_deployed_stage2_run_changes_the_mask_and_lowers_the_deployed_loss(model, tokenizer):
    # From random factors (a poor mask) six steps must cut the deployed loss by a wide margin. From the shipped
    # stage-1 factors the change in six steps is a few percent, and its sign flipped between torch builds.
    config = TrainSettings.for_stage(2, steps=6, ratio=0.7, lr=0.02, **SHORT)
    assert config.variant == "deployed"  # the default
    trainer = Trainer(model, tokenizer, config, random_factors(4))
    start = trainer.current_mask()
    result = trainer.run(progress=False)

    assert sum(rec["mask_changes"] for rec in result.log) > 0 and not torch.equal(result.mask, start)
    seen = [training_example(tokenizer, config, i) for i in range(config.steps)]  # the run's own examples
    losses = evaluate_scales(model, seen, {"start": start, "end": result.mask}, config, deployed=True)
    assert sum(losses["end"]) < 0.8 * sum(losses["start"])
