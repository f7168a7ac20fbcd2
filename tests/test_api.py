"""The user-facing API: inside ``with apply_leank(model, mask):`` (or ``with LeanKPress(mask)(model):``) plain
``model.generate`` and new-cache forward passes are LeanK (never silently dense), outside it the model is the
original; a ``LeanKCache`` passed by hand works inside the block and is refused (not dense) outside it; a follow-up
turn appends to a cache; handles nest; two models decode in two threads without seeing each other; updates by hand
and exceptions leave no trace; the README quick start runs."""

import copy
import re
import threading
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from leank_ref.attention import HOOK_ATTRIBUTE, QKCapture, attention_modules, use_hook
from leank_ref.cache import LeanKCache, LeanKPress, apply_leank
from leank_ref.data import continuation_example
from leank_ref.decode import triton_available
from leank_ref.memory import memory_formula
from leank_ref.models import cache_argument
from leank_ref.windows import Windows

ROOT = Path(__file__).resolve().parent.parent
WINDOWS = Windows(sink=4, recent=8, block=4)  # small windows: a 60-token prompt already has a middle store
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
    """The model as loaded: SDPA attention, class ``generate``, no forward pre-hook, no hook on any attention module."""
    return (
        model.config._attn_implementation == "sdpa"
        and "generate" not in vars(model)
        and not model.base_model._forward_pre_hooks
        and not any(HOOK_ATTRIBUTE in vars(m) for m in attention_modules(model))
        and "leank_binding" not in vars(model)
    )


@pytest.fixture(scope="module")
def zeros(model, ids, dense) -> torch.Tensor:
    """Tokens inside ``with`` for the all-zeros mask (every middle token dropped): differ from dense."""
    with apply_leank(model, ZEROS, WINDOWS) as lk:
        out = generate(model, ids)
        assert isinstance(lk.cache, LeanKCache) and lk.cache.layers[0].middle > 0
    assert not torch.equal(out, dense)  # this prompt is one where pruning changes the answer
    return out


def test_plain_generate_inside_with_is_leank_and_dense_again_after(model, ids, dense, zeros):
    with apply_leank(model, ONES, WINDOWS) as lk:
        ones = generate(model, ids)
        assert lk.cache.layers[0].middle > 0  # the middle store was used, with every channel kept
    assert torch.equal(ones, dense)
    assert untouched(model)
    assert torch.equal(generate(model, ids), dense)


def test_creating_the_handle_changes_nothing(model, ids, dense):
    lk = apply_leank(model, ZEROS, WINDOWS)
    assert not lk.active and untouched(model)
    assert torch.equal(generate(model, ids), dense)
    lk.remove()  # a no-op on a handle that is not active
    assert untouched(model)


def test_explicit_cache_works_inside_the_press_and_is_refused_outside(model, ids, zeros):
    press = LeanKPress(ZEROS, WINDOWS)
    cache = press.new_cache(model)
    with press(model):
        assert torch.equal(generate(model, ids, **{cache_argument(model): cache}), zeros)
        with warnings.catch_warnings():  # recent transformers call the keyword `cache` and warn about the old name
            warnings.simplefilter("ignore", FutureWarning)
            assert torch.equal(generate(model, ids, past_key_values=press.new_cache(model)), zeros)
    assert cache.get_seq_length() == ids.shape[1] + STEPS - 1 and cache.layers[0].middle > 0
    assert untouched(model)
    with pytest.raises(RuntimeError, match="without its attention"):  # outside: refused, never silently dense
        generate(model, ids, **{cache_argument(model): LeanKCache(model, ZEROS, WINDOWS)})
    assert untouched(model)


def test_forward_with_a_new_cache_inside_with_uses_leank(model, ids, zeros):
    with apply_leank(model, ZEROS, WINDOWS) as lk, torch.no_grad():
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
    with apply_leank(model, ZEROS, WINDOWS):
        with pytest.raises(ValueError, match="DynamicCache inside apply_leank"):
            generate(model, ids, **{cache_argument(model): DynamicCache()})
        with pytest.raises(ValueError, match="DynamicCache inside apply_leank"), torch.no_grad():
            model(ids, **{cache_argument(model): DynamicCache()})
        with pytest.raises(ValueError, match="use_cache=False"):
            generate(model, ids, use_cache=False)
    assert untouched(model)


def test_nested_and_repeated_handles(model, ids, dense, zeros):
    outer = apply_leank(model, ZEROS, WINDOWS)
    inner = apply_leank(model, ONES, WINDOWS)
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


def test_an_error_inside_with_still_restores_the_model(model, ids, dense):
    with pytest.raises(KeyError), apply_leank(model, ZEROS, WINDOWS):
        raise KeyError("boom")
    assert untouched(model)
    padded = torch.ones(2, ids.shape[1], dtype=torch.long)
    padded[1, :5] = 0
    with pytest.raises(NotImplementedError, match="padded"), apply_leank(model, ZEROS, WINDOWS):
        generate(model, ids.expand(2, -1), attention_mask=padded)  # raised inside the attention of a forward pass
    assert untouched(model)
    with pytest.raises(KeyError), use_hook(model, QKCapture()):
        raise KeyError("boom")
    assert untouched(model)
    assert torch.equal(generate(model, ids), dense)


def test_updates_by_hand_leave_the_model_dense(model, ids, dense):
    """Storing tokens by hand (no attention follows) changes nothing in the model: later forward passes are dense."""
    with torch.no_grad():
        before = model(ids).logits
    gen = torch.Generator().manual_seed(0)
    by_hand = LeanKCache(model.config, ZEROS, WINDOWS)  # made from the config: storage only
    prompt = LeanKCache(model, ZEROS, WINDOWS)
    for tokens in [20] + [1] * 6:  # a prompt, then six single tokens (compactions included)
        for i in range(30):
            kv = torch.randn(2, 1, 3, tokens, 64, generator=gen)
            by_hand.update(kv[0], kv[1], i)
            if tokens > 1:
                prompt.update(kv[0], kv[1], i)
    assert by_hand.layers[0].middle > 0 and untouched(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert torch.equal(generate(model, ids), dense)
    with pytest.raises(RuntimeError, match="without its attention"):  # a model's cache: a decode step needs the press
        prompt.update(kv[0], kv[1], 0)
    assert untouched(model)


def test_two_models_decode_in_two_threads_without_interfering(model, ids):
    """Two copies of the model, each generating with its own LeanK press (different masks) in its own thread, at the
    same time: every one of 20 concurrent runs gives each thread's single-thread tokens."""
    prompt, name = ids[:, :24], cache_argument(model)  # short, so 40 decodings stay quick; the middle is in use

    @torch.no_grad()
    def run(own, mask) -> torch.Tensor:
        """A prompt and three greedy decode steps (forward passes: cheaper than generate)."""
        with apply_leank(own, mask, WINDOWS) as lk:
            tokens = [own(prompt).logits[:, -1].argmax(-1, keepdim=True)]  # the press makes the cache
            for _ in range(3):
                tokens.append(own(tokens[-1], **{name: lk.cache}).logits[:, -1].argmax(-1, keepdim=True))
            assert lk.cache.layers[0].middle > 0
        return torch.cat(tokens, 1)

    jobs = [(copy.deepcopy(model), ZEROS), (copy.deepcopy(model), ONES)]
    expected = [run(own, mask) for own, mask in jobs]  # one thread
    assert not torch.equal(*expected)  # the two masks decode differently, so crossed wires would show
    runs, start = 20, threading.Barrier(2)
    results: list[list] = [[], []]
    errors = []

    def work(slot: int) -> None:
        try:
            for _ in range(runs):
                start.wait(timeout=120)
                results[slot].append(run(*jobs[slot]))
        except Exception as error:  # reported below: an exception in a thread would otherwise be lost
            start.abort()
            errors.append(error)

    threads = [threading.Thread(target=work, args=(slot,)) for slot in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (own, _), want, outs in zip(jobs, expected, results):
        assert len(outs) == runs and all(torch.equal(out, want) for out in outs)
        assert untouched(own)


def test_follow_up_turn_appends_to_the_cache_as_decoding_would(model, ids):
    """A chat's next turn: several new tokens on a non-empty cache give the logits and the stored tokens of feeding
    them one at a time (each new token attends as a decode step)."""
    name = cache_argument(model)
    follow = ids[:, 10:22]  # 12 more tokens (any will do)
    with apply_leank(model, ZEROS, WINDOWS) as lk, torch.no_grad():
        chunked, stepped = lk.new_cache(), lk.new_cache()
        model(ids, **{name: chunked})
        model(ids, **{name: stepped})
        together = model(follow, **{name: chunked}).logits[0]  # [12, V]
        one_by_one = torch.cat([model(follow[:, i : i + 1], **{name: stepped}).logits[0] for i in range(12)])
        first = generate(model, ids, **{name: lk.new_cache()})  # the same through generate: turn 1 ...
        turn2 = torch.cat([first, follow], 1)
        second = generate(model, turn2, **{name: lk.cache})  # ... then turn 2 on the same cache
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=1e-4)
    for a, b in zip(chunked.layers, stepped.layers):
        assert a.length == b.length == ids.shape[1] + 12 and a.middle == b.middle > 0
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)  # K of 12 tokens at once vs one at a time
        for x, y in zip(a.groups, b.groups):
            torch.testing.assert_close(x.k, y.k, atol=1e-4, rtol=1e-4)
    assert second.shape[1] == turn2.shape[1] + STEPS and torch.equal(second[:, : turn2.shape[1]], turn2)
    assert lk.cache.get_seq_length() == turn2.shape[1] + STEPS - 1


def test_press_checks_everything_when_made_and_refuses_assisted_decoding(model, ids, monkeypatch):
    press = LeanKPress(ZEROS, WINDOWS, backend="torch")  # made without a model, memory known before running
    assert press.memory(1000) == memory_formula(ZEROS, 1000, WINDOWS)
    assert press.k_saved(1000) == pytest.approx(1 - 12 / 1000)  # only sink + recent (+ a partial block) stay
    with pytest.raises(ValueError, match="backend"):
        LeanKPress(ZEROS, WINDOWS, backend="cuda")
    with pytest.raises(ValueError, match="only 0 and 1"):
        LeanKPress(ZEROS + 0.5, WINDOWS)
    with pytest.raises(TypeError, match="windows must be"):
        LeanKPress(ZEROS, (4, 8, 4))
    with pytest.raises(ValueError, match="model needs"):
        LeanKPress(torch.zeros(32, 8, 128))(model)
    if triton_available():  # the Triton kernel on a CPU model: refused when the press meets the model, not mid-decode
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="runs on CUDA"):
            LeanKPress(ZEROS, WINDOWS, backend="triton")(model)
        with pytest.raises(ValueError, match="runs on CUDA"):
            LeanKCache(model, ZEROS, WINDOWS, backend="triton")
    assert untouched(model)
    with press(model), pytest.raises(ValueError, match="assisted decoding"):
        generate(model, ids, assistant_model=model)
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
