"""The own-model path end to end on tiny randomly initialised Llama and Qwen2 checkpoints saved to a folder.

Observe (channel importance), train both stages through the command line with settings scaled for the model
(``TrainSettings.for_model``), binarize, generate with the pruned cache, measure its memory: the steps of notebook 07.
"""

from __future__ import annotations

import json

import pytest
import torch

from leank_ref.__main__ import main
from leank_ref.cache import apply_leank
from leank_ref.data import passkey_example
from leank_ref.masks import binarize, kept_counts, load_mask
from leank_ref.memory import mask_stats, memory_formula
from leank_ref.models import default_model_path, load_model, model_facts
from leank_ref.sparsity import capture_importance
from leank_ref.train.checkpoint import load_factors
from leank_ref.train.settings import TrainSettings

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def save_tiny_model(folder, model_type: str) -> None:
    """Save a randomly initialised 2-layer ``model_type`` model (head_dim 16) and SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if model_type == "llama":
        config = LlamaConfig(**TINY, **ids, max_position_embeddings=1024, tie_word_embeddings=True)
        model_class = LlamaForCausalLM
    else:
        config = Qwen2Config(**TINY, **ids, max_position_embeddings=1024, tie_word_embeddings=True)
        model_class = Qwen2ForCausalLM
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    save_tiny_model(folder, request.param)
    return folder


def tiny_recipe(model) -> tuple[TrainSettings, TrainSettings]:
    """The smallest settings the data templates allow (160-256-token contexts), a few steps per stage."""
    stage1 = TrainSettings.for_model(model, context_max=256, context_min=160, steps=3)
    return stage1, stage1.with_stage(2, ratio=0.5, steps=2)


def test_recipe_for_smollm2_is_the_shipped_default():
    """The scaling rule reproduces the defaults the shipped SmolLM2 masks were trained with."""
    config = {"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    recipe = TrainSettings.for_model(_Config(num_hidden_layers=30, max_position_embeddings=8192, **config))
    shipped = TrainSettings()
    assert (recipe.align, recipe.windows.sink, recipe.windows.recent) == (16, 16, 64)
    assert (recipe.align, recipe.windows) == (shipped.align, shipped.windows)
    assert (recipe.context_min, recipe.context_max) == (shipped.context_min, shipped.context_max)
    assert recipe.windows.block == 32
    assert recipe == shipped  # every other field at its default too


def test_recipe_rejects_settings_that_cannot_work():
    config = _Config(model_type="llama", num_attention_heads=4, hidden_size=64, num_hidden_layers=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TrainSettings.for_model(config, context_max=4096)
    with pytest.raises(ValueError, match="no middle tokens"):
        TrainSettings.for_model(config, context_max=64, context_min=12)
    with pytest.raises(ValueError, match="pass factors="):
        TrainSettings.for_model(config, stage=2, ratio=0.7).argv("model", "out.pth")


def test_own_model_end_to_end(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    facts = model_facts(model)
    assert facts.head_dim == 16 and facts.num_kv_heads == 2

    # Observe: one importance per (layer, KV head, channel).
    prompt = passkey_example(tokenizer, 200, depth=0.5).context_ids
    importance = capture_importance(model, prompt)
    assert importance.shape == facts.mask_shape and bool((importance >= 0).all())

    # Train both stages through the command line.
    stage1, recipe = tiny_recipe(model)
    factors_path, mask_path = tmp_path / "factors.pth", tmp_path / "mask.pth"
    assert main(stage1.argv(tiny_model_dir, factors_path) + ["--no-progress", "--device", "cpu"]) == 0
    argv = recipe.argv(tiny_model_dir, mask_path, factors=factors_path) + ["--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    meta = json.loads(mask_path.with_suffix(".json").read_text())
    assert TrainSettings(**meta["settings"]) == recipe  # the command line ran exactly these settings
    factors = load_factors(factors_path, facts.mask_shape)
    mask = load_mask(mask_path, facts.mask_shape, recipe.align)

    # Binarize: counts are multiples of align and about `ratio` of the channels are pruned.
    assert bool((kept_counts(mask) % recipe.align == 0).all())
    realised = mask_stats(mask, 1024, recipe.windows).pruned_ratio
    assert abs(realised - recipe.ratio) <= recipe.align / facts.head_dim
    assert binarize(factors, recipe.ratio, recipe.align).shape == mask.shape

    # Generate: an all-ones mask through the LeanK cache gives the dense tokens; the pruned mask generates too.
    new = 6
    dense = model.generate(prompt[None], max_new_tokens=new, do_sample=False)
    with apply_leank(model, torch.ones(facts.mask_shape), **recipe.cache_settings()) as lk:
        assert torch.equal(model.generate(prompt[None], max_new_tokens=new, do_sample=False), dense)
    with apply_leank(model, mask, **recipe.cache_settings()) as lk:
        pruned = model.generate(prompt[None], max_new_tokens=new, do_sample=False)
        report = lk.cache.memory_report()
    assert pruned.shape == dense.shape

    # Memory: the cache holds what the mask's counts predict, and saves K.
    tokens = prompt.numel() + new - 1  # the last generated token is never cached
    expected = memory_formula(mask, tokens, recipe.windows, bytes_per_value=4)
    assert (report.tokens, report.k, report.v) == (expected.tokens, expected.k, expected.v)
    assert report.middle_tokens > 0 and report.k_saved > 0.2


class _Config:
    """A stand-in config with only the attributes model_facts reads."""

    def __init__(self, max_position_embeddings: int = 1024, **values):
        self.max_position_embeddings = max_position_embeddings
        self.__dict__.update(values)


def test_chapter_07_runs_on_a_tiny_qwen2(tmp_path, monkeypatch):
    """Notebook 07 has nothing SmolLM2-specific: it runs top to bottom on another checkpoint (fast mode)."""
    nbformat = pytest.importorskip("nbformat", reason="needs the notebook extras (pip install -e '.[dev]')")
    NotebookClient = pytest.importorskip("nbclient").NotebookClient

    from leank_ref.checkout import find_checkout

    ROOT = find_checkout(__file__)

    save_tiny_model(tmp_path / "tiny_qwen2", "qwen2")
    monkeypatch.setenv("LEANK_MODEL", str(tmp_path / "tiny_qwen2"))
    monkeypatch.setenv("LEANK_FAST", "1")
    monkeypatch.setenv("LEANK_FIGURES", str(tmp_path / "figures"))
    notebook = nbformat.read(ROOT / "notebooks" / "07_your_own_model.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "model folder: tiny_qwen2 (qwen2)" in printed
    assert "a mask keeping every channel gives the dense tokens: True" in printed
    assert sorted(p.name for p in (tmp_path / "figures").glob("07_*.png")) == [
        "07_importance_concentration.png",
        "07_kept_counts.png",
        "07_memory_vs_length.png",
        "07_training_curves.png",
    ]
