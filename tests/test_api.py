"""The user-facing API: inside ``with apply_leank(model, mask):`` plain ``model.generate`` and new-cache forward passes
are LeanK (never silently dense), outside it the model is the original; a ``LeanKCache`` passed by hand works on its
own; handles nest; the README quick start runs."""

import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from leank_ref.cache import LeanKCache, apply_leank
from leank_ref.data import continuation_example
from leank_ref.models import cache_argument

ROOT = Path(__file__).resolve().parent.parent
WINDOWS = {"sink": 4, "recent": 8, "block": 4}  # small windows: a 60-token prompt already has a middle store
STEPS = 8
ZEROS, ONES = torch.zeros(30, 3, 64), torch.ones(30, 3, 64)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return continuation_example(tokenizer, 60, seed=0).context_ids[None]  # [1, 60]


@pytest.fixture(scope="module")
def dense(model, ids) -> torch.Tensor:
    return generate(model, ids)


def generate(model, ids, **kwargs) -> torch.Tensor:
    """Exactly STEPS greedy tokens after ``ids``, with the model's own ``generate``."""
    return model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, **kwargs)


def untouched(model) -> bool:
    """The model as loaded: SDPA attention, class ``generate``, no forward pre-hook on the base model."""
    return (
        model.config._attn_implementation == "sdpa"
        and "generate" not in vars(model)
        and not model.base_model._forward_pre_hooks
    )


@pytest.fixture(scope="module")
def zeros(model, ids, dense) -> torch.Tensor:
    """Tokens inside ``with`` for the all-zeros mask (every middle token dropped): differ from dense."""
    with apply_leank(model, ZEROS, **WINDOWS) as lk:
        out = generate(model, ids)
        assert isinstance(lk.cache, LeanKCache) and lk.cache.layers[0].middle > 0
    assert not torch.equal(out, dense)  # this prompt is one where pruning changes the answer
    return out


def test_plain_generate_inside_with_is_leank_and_dense_again_after(model, ids, dense, zeros):
    with apply_leank(model, ONES, **WINDOWS) as lk:
        ones = generate(model, ids)
        assert lk.cache.layers[0].middle > 0  # the middle store was used, with every channel kept
    assert torch.equal(ones, dense)
    assert untouched(model)
    assert torch.equal(generate(model, ids), dense)


def test_creating_the_handle_changes_nothing(model, ids, dense):
    lk = apply_leank(model, ZEROS, **WINDOWS)
    assert not lk.active and untouched(model)
    assert torch.equal(generate(model, ids), dense)
    lk.remove()  # a no-op on a handle that is not active
    assert untouched(model)


def test_explicit_cache_works_without_a_handle(model, ids, zeros):
    cache = LeanKCache(model, ZEROS, **WINDOWS)
    assert torch.equal(generate(model, ids, **{cache_argument(model): cache}), zeros)
    assert cache.get_seq_length() == ids.shape[1] + STEPS - 1 and cache.layers[0].middle > 0
    assert untouched(model)
    with warnings.catch_warnings():  # transformers >= 5.2x calls the keyword `cache` and warns about the old name
        warnings.simplefilter("ignore", FutureWarning)
        assert torch.equal(generate(model, ids, past_key_values=LeanKCache(model, ZEROS, **WINDOWS)), zeros)


def test_forward_with_a_new_cache_inside_with_uses_leank(model, ids, zeros):
    with apply_leank(model, ZEROS, **WINDOWS) as lk, torch.no_grad():
        out = model(ids)  # use_cache defaults to True: the model would start a DynamicCache
        assert isinstance(lk.cache, LeanKCache) and lk.cache.get_seq_length() == ids.shape[1]
        assert out[cache_argument(model)] is lk.cache
        cache, token = lk.cache, out.logits[:, -1:].argmax(-1)
        model(token, **{cache_argument(model): cache})  # a decode step on the same cache
        assert lk.cache is cache and cache.get_seq_length() == ids.shape[1] + 1
        assert torch.equal(token[0], zeros[0, ids.shape[1] : ids.shape[1] + 1])
        no_cache = model(ids, use_cache=False)  # no cache at all: ordinary attention, LeanK's prefill
        torch.testing.assert_close(no_cache.logits, out.logits)


def test_other_caches_and_dense_generate_raise_inside_with(model, ids):
    with apply_leank(model, ZEROS, **WINDOWS):
        with pytest.raises(ValueError, match="DynamicCache inside apply_leank"):
            generate(model, ids, **{cache_argument(model): DynamicCache()})
        with pytest.raises(ValueError, match="DynamicCache inside apply_leank"), torch.no_grad():
            model(ids, **{cache_argument(model): DynamicCache()})
        with pytest.raises(ValueError, match="use_cache=False"):
            generate(model, ids, use_cache=False)
    assert untouched(model)


def test_nested_and_repeated_handles(model, ids, dense, zeros):
    outer = apply_leank(model, ZEROS, **WINDOWS)
    inner = apply_leank(model, ONES, **WINDOWS)
    with outer:
        with inner:  # the innermost handle makes the caches
            assert torch.equal(generate(model, ids), dense)
            with pytest.raises(RuntimeError, match="already active"):
                inner.install()
        assert torch.equal(generate(model, ids), zeros)  # back to the outer handle
    assert untouched(model)
    with outer:  # a handle can be used again
        assert torch.equal(generate(model, ids), zeros)
        inner.install()
        outer.remove()  # leaving out of order: the inner handle keeps working
        assert torch.equal(generate(model, ids), dense)
        inner.remove()
    assert untouched(model)
    assert torch.equal(generate(model, ids), dense)


def test_an_error_inside_with_still_restores_the_model(model, ids):
    with pytest.raises(KeyError), apply_leank(model, ZEROS, **WINDOWS):
        raise KeyError("boom")
    assert untouched(model)


def readme_quick_start() -> str:
    """The first ```python block of the README (the quick start)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_readme_quick_start_runs(capsys):
    code = readme_quick_start()
    assert len([line for line in code.splitlines() if line.strip()]) <= 6  # import + five lines
    exec(compile(code, "README.md quick start", "exec"), {})
    printed = capsys.readouterr().out
    assert "LeanK cache of" in printed and "smaller" in printed
