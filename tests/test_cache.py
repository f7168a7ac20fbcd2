"""The LeanK cache: same tokens as dense with an all-ones mask, the simulated attention at every decode step,
memory measured from the stored tensors, batches, both decode backends, and clear errors on bad input."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from leank_ref.attention import SimulatedLeanK, use_hook
from leank_ref.cache import LeanKAttention, LeanKCache, LeanKPress, apply_leank
from leank_ref.data import continuation_example
from leank_ref.decode import decode_attention, leank_decode_torch, triton_available, uses_triton
from leank_ref.masks import binarize, kept_counts, load_mask
from leank_ref.memory import memory_formula
from leank_ref.models import cache_argument
from leank_ref.windows import Windows

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "masks" / "smollm2-135m_r0.7.pth"
LLAMA = ROOT / "masks" / "reference" / "llama3.1-8b-instruct.pth"
SINK, RECENT, BLOCK = 8, 24, 8  # small windows so 28 decode steps cross several compaction boundaries
WINDOWS = Windows(SINK, RECENT, BLOCK)


def r07_test_mask() -> torch.Tensor:
    """A SmolLM2 [30, 3, 64] mask binarized at r=0.7 (align 16) from seeded factors with a per-head scale, so that
    some heads keep nothing and each layer mixes several counts (the cases the cache must get right)."""
    g = torch.Generator().manual_seed(0)
    factors = torch.rand(30, 3, 64, generator=g) * torch.rand(30, 3, 1, generator=g) ** 2
    return binarize(factors, 0.7, 16)


def masks_to_check() -> list:
    """The seeded test mask, and the shipped r=0.7 mask when it is present."""
    shipped = pytest.param(
        "shipped",
        marks=pytest.mark.skipif(not SHIPPED.exists(), reason=f"{SHIPPED.name} not shipped"),
    )
    return ["test", shipped]


def get_mask(name: str) -> torch.Tensor:
    return r07_test_mask() if name == "test" else load_mask(SHIPPED, (30, 3, 64), 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def effective_recent(n_cached: int) -> int:
    """The cache's recent window with n_cached tokens: RECENT..RECENT+BLOCK-1 once the middle has started."""
    return RECENT + (n_cached - SINK - RECENT) % BLOCK if n_cached >= SINK + RECENT else RECENT


class Recorder:
    """Wraps a cache's LeanK attention and keeps each call's layer, query, new K/V, output and scaling."""

    def __init__(self, inner: LeanKAttention):
        self.inner = inner
        self.calls = []

    @property
    def cache(self):  # the cache this hook reads: what the cache checks before a decode step
        return self.inner.cache

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = self.inner(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        t = query.shape[-2]
        # clone: the cache hands out views of its buffers, which later steps overwrite
        self.calls.append((module, query, key[:, :, -t:].clone(), value[:, :, -t:].clone(), out, scaling))
        return out


def greedy(model, ids, steps, cache=None, **kwargs) -> torch.Tensor:
    """Exactly ``steps`` greedy tokens after ``ids`` [B, P] (with ``cache`` passed as this transformers wants)."""
    if cache is not None:
        kwargs[cache_argument(model)] = cache
    return model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **kwargs)


def test_test_mask_has_the_hard_cases():
    mask = r07_test_mask()
    counts = kept_counts(mask)
    assert abs((1 - mask.mean()).item() - 0.7) < 0.03
    assert (counts == 0).any() and len(torch.unique(counts[counts > 0])) >= 2
    assert ((counts > 0).sum(-1) >= 2).any()  # layers with two groups and a zero-count head


def test_all_ones_mask_generates_the_dense_tokens(model, tokenizer):
    ids = continuation_example(tokenizer, 1024, seed=0).context_ids[None]  # [1, 1024]
    dense = greedy(model, ids, 64)
    with apply_leank(model, torch.ones(30, 3, 64), Windows(16, 64, 32)) as lk:
        leank = greedy(model, ids, 64)
        assert lk.cache.layers[0].middle > 0  # the middle store was really used
    assert torch.equal(dense, leank)
    assert model.config._attn_implementation == "sdpa"  # the handle undid itself


@pytest.mark.parametrize("mask_name", masks_to_check())
@pytest.mark.parametrize("prompt_len", [30, 150])  # shorter and longer than sink + recent = 32
def test_every_decode_step_equals_simulated_leank(model, tokenizer, mask_name, prompt_len):
    mask = get_mask(mask_name)
    ids = continuation_example(tokenizer, prompt_len, seed=1).context_ids[None]
    steps = 28  # 4 compaction boundaries for either prompt (block 8)
    cache = LeanKCache(model, mask, WINDOWS, backend="torch")  # no reservation: the middle store grows
    rec = Recorder(LeanKAttention(cache))
    with use_hook(model, rec):
        greedy(model, ids, steps, cache)
    keys, values = {}, {}  # layer -> every token's K/V [1, G, n, D] as the LeanK model computed them
    checked, compactions, last_recent = 0, 0, None
    for module, q, k_new, v_new, out, scaling in rec.calls:
        layer = module.layer_idx
        keys[layer] = torch.cat([keys[layer], k_new], 2) if layer in keys else k_new
        values[layer] = torch.cat([values[layer], v_new], 2) if layer in values else v_new
        if q.shape[-2] > 1:
            continue  # prefill: ordinary attention
        n = keys[layer].shape[2]
        r_eff = effective_recent(n)
        sim = SimulatedLeanK(mask, SINK, r_eff, decode_start=prompt_len, exclude_zero_heads=True)
        ref = sim(module, q, keys[layer], values[layer], None, scaling=scaling)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        checked += 1
        if layer == 0:
            compactions += last_recent is not None and r_eff < last_recent
            last_recent = r_eff
    assert checked == 30 * (steps - 1)  # the first new token comes from the prefill
    assert compactions >= 3
    n = prompt_len + steps - 1
    assert cache.layers[0].middle == max(n - SINK - effective_recent(n), 0)
    assert cache.memory_report() == memory_formula(mask, n, Windows(SINK, RECENT, BLOCK), bytes_per_value=4)


def test_block_one_logits_equal_simulation_end_to_end(model, tokenizer):
    """With block=1 the recent window is exactly RECENT, so one SimulatedLeanK forward gives every logit."""
    mask, p, steps = r07_test_mask(), 60, 12
    ids = continuation_example(tokenizer, p, seed=2).context_ids[None]
    with apply_leank(model, mask, Windows(SINK, RECENT, 1), backend="torch"):
        gen = greedy(model, ids, steps, output_logits=True, return_dict_in_generate=True)
    leank_logits = torch.stack(gen.logits, 1)[0]  # [steps, V]: positions p-1 .. p+steps-2
    with use_hook(model, SimulatedLeanK(mask, SINK, RECENT, decode_start=p)), torch.no_grad():
        sim_logits = model(gen.sequences[:, :-1]).logits[0, p - 1 :]  # [steps, V]
    torch.testing.assert_close(leank_logits, sim_logits, atol=2e-4, rtol=1e-4)


def test_batch_of_equal_lengths_matches_single_runs_and_padding_is_unsupported(model, tokenizer):
    mask = r07_test_mask()
    prompts = [continuation_example(tokenizer, 100, seed=s).context_ids for s in (3, 4)]
    with apply_leank(model, mask, WINDOWS) as lk:
        batch = greedy(model, torch.stack(prompts), 16, lk.new_cache())
        singles = [greedy(model, p[None], 16, lk.new_cache())[0] for p in prompts]
        attention_mask = torch.ones(2, 100, dtype=torch.long)
        attention_mask[1, :7] = 0  # a shorter, left-padded second prompt
        with pytest.raises(NotImplementedError, match="padded batches"):
            greedy(model, torch.stack(prompts), 4, lk.new_cache(), attention_mask=attention_mask)
    assert torch.equal(batch, torch.stack(singles))


def filled_cache(
    mask, tokens, dtype, batch=1, seed=0, sink=SINK, recent=RECENT, block=BLOCK, max_tokens=None, device="cpu"
) -> LeanKCache:
    """A cache for ``mask`` holding ``tokens`` random tokens: a prefill, then single-token updates (no model)."""
    layers, g, d = mask.shape
    config = LlamaConfig(
        num_hidden_layers=layers, num_attention_heads=3 * g, num_key_value_heads=g, head_dim=d, hidden_size=3 * g * d
    )  # the cache reads only shapes from its model, so a config stands in for one
    windows = Windows(sink, recent, block)
    cache = LeanKCache(config, mask, windows, align=min(d // 4, 16), backend="torch", max_tokens=max_tokens)
    gen = torch.Generator().manual_seed(seed)
    first = max(tokens - 20, 1)
    for t in [first] + [1] * (tokens - first):
        for i in range(layers):
            kv = torch.randn(2, batch, g, t, d, generator=gen).to(device, dtype)
            cache.update(kv[0], kv[1], i)
    return cache


def test_memory_report_equals_hand_formula():
    mask = torch.zeros(1, 2, 8)
    mask[0, 1, :4] = 1  # head 0 keeps nothing, head 1 keeps 4 of 8 channels
    cache = filled_cache(mask, 8, torch.float32, sink=1, recent=2, block=2)
    rep = cache.memory_report()
    # 8 tokens: middle = (8 - 1 - 2) // 2 * 2 = 4, full window = 4; fp32 = 4 bytes
    assert (rep.tokens, rep.middle_tokens) == (8, 4)
    assert (rep.full_k, rep.full_v) == (2 * 4 * 8 * 4, 2 * 4 * 8 * 4)
    assert (rep.middle_k, rep.middle_v) == (4 * 4 * 4, 4 * 8 * 4)
    assert (rep.dense_k, rep.dense_middle_k) == (2 * 8 * 8 * 4, 2 * 4 * 8 * 4)
    assert rep.allocated >= rep.total


def test_memory_report_equals_formula_for_the_authors_llama_mask():
    mask = load_mask(LLAMA, (32, 8, 128), 32)
    for tokens in (40, 300):
        cache = filled_cache(mask, tokens, torch.bfloat16, batch=2, sink=16, recent=64, block=32)
        rep = cache.memory_report()
        assert rep == memory_formula(mask, tokens, Windows(16, 64, 32), batch=2, bytes_per_value=2)
    assert rep.middle_k / rep.dense_middle_k == pytest.approx(mask.mean().item())
    assert rep.middle_v / rep.dense_middle_v == pytest.approx((kept_counts(mask) > 0).float().mean().item())


def test_r07_mask_at_2k_keeps_at_most_035_of_middle_k():
    mask = load_mask(SHIPPED, (30, 3, 64), 16) if SHIPPED.exists() else r07_test_mask()
    rep = filled_cache(mask, 2048, torch.float32, sink=16, recent=64, block=32).memory_report()
    assert rep.middle_tokens == (2048 - 16 - 64) // 32 * 32
    assert rep == memory_formula(mask, 2048, Windows(16, 64, 32), bytes_per_value=4)
    assert rep.middle_k <= 0.35 * rep.dense_middle_k
    assert rep.total < rep.dense_total


def test_reserved_cache_never_reallocates_and_growth_keeps_the_data():
    mask = r07_test_mask()[:2]
    reserved = filled_cache(mask, 50, torch.float32, max_tokens=130)
    layer = reserved.layers[1]
    pointers = [t.data_ptr() for t in layer._mid_k + layer._mid_v] + [layer._kv_full.data_ptr()]
    grown = filled_cache(mask, 50, torch.float32)  # same tokens, no reservation
    gen = torch.Generator().manual_seed(9)
    for _ in range(80):  # several compactions in both
        for i in range(2):
            kv = torch.randn(2, 1, 3, 1, 64, generator=gen)
            reserved.update(kv[0], kv[1], i)
            grown.update(kv[0], kv[1], i)
    assert [t.data_ptr() for t in layer._mid_k + layer._mid_v] + [layer._kv_full.data_ptr()] == pointers
    for a, b in zip(reserved.layers, grown.layers):
        assert torch.equal(a.keys, b.keys) and a.middle == b.middle == 96
        assert all(torch.equal(x.k, y.k) and torch.equal(x.v, y.v) for x, y in zip(a.groups, b.groups))
    assert reserved.memory_report() == grown.memory_report()


def test_decode_paths_agree_with_dense_attention_on_zeroed_channels():
    """The torch decode path against plain softmax attention over explicitly masked full tensors."""
    mask = r07_test_mask()[:4]
    cache = filled_cache(mask, 90, torch.float32, batch=2)
    gen = torch.Generator().manual_seed(1)
    layer = cache.layers[3]
    b, g, _, d = layer.keys.shape
    q = torch.randn(b, 9, d, generator=gen)
    out = leank_decode_torch(q, layer.keys, layer.values, layer.groups, d**-0.5)
    # Rebuild full middle tensors with zeros in pruned channels; zero-count heads excluded
    vals = []
    q4 = q.view(b, g, 3, d)
    for h in range(g):
        parts_v = [layer.values[:, h]]
        lg = [q4[:, h] @ layer.keys[:, h].transpose(-1, -2)]
        for grp in layer.groups:
            hit = (grp.kv_heads == h).nonzero()
            if len(hit):
                j = int(hit[0, 0])
                k_full = torch.zeros(b, grp.k.shape[2], d).index_copy_(-1, grp.channels[j], grp.k[:, j])
                lg.append(q4[:, h] @ k_full.transpose(-1, -2))
                parts_v.append(grp.v[:, j])
        p = torch.softmax(torch.cat(lg, -1) * d**-0.5, -1)
        vals.append(p @ torch.cat(parts_v, 1))  # [B, 3, D]
    ref = torch.stack(vals, 1).view(b, 9, d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if INTERPRETER or not torch.cuda.is_available() else "cuda"
needs_triton = pytest.mark.skipif(
    not triton_available() or (KERNEL_DEVICE == "cpu" and not INTERPRETER),
    reason="the Triton path needs leank_ref.kernels and CUDA, or TRITON_INTERPRET=1 on CPU (make test sets it)",
)


@needs_triton
@pytest.mark.parametrize("tokens", [20, 70])  # without and with a middle store
def test_triton_backend_matches_torch_backend(tokens):
    mask = r07_test_mask()[:3]
    cache = filled_cache(mask, tokens, torch.float32, batch=2, device=KERNEL_DEVICE)
    gen = torch.Generator().manual_seed(2)
    assert uses_triton("triton", torch.device("cpu")) and not uses_triton("torch", torch.device("cpu"))
    for layer in cache.layers:
        q = torch.randn(2, 9, 64, generator=gen).to(KERNEL_DEVICE)
        out, ref = decode_attention(layer, q, 0.125, "triton"), decode_attention(layer, q, 0.125, "torch")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not (triton_available() and INTERPRETER), reason="runs the CPU model through Triton's interpreter")
def test_triton_switch_generates_the_torch_tokens(model, tokenizer):
    """backend="triton" (the CUDA default) through generate: same logits as the torch path (interpreter on CPU)."""
    ids = continuation_example(tokenizer, 40, seed=6).context_ids[None]
    logits = {}
    for backend in ("torch", "triton"):
        with apply_leank(model, r07_test_mask(), WINDOWS, backend=backend) as lk:
            out = greedy(model, ids, 2, output_logits=True, return_dict_in_generate=True)
            assert lk.cache.layers[0].middle > 0
        logits[backend] = torch.stack(out.logits)
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)


def test_bad_input_gives_clear_errors(model):
    with pytest.raises(ValueError, match="model needs"):
        apply_leank(model, torch.ones(32, 8, 128))
    half = torch.ones(30, 3, 64)
    half[0, 0, 0] = 0.5
    with pytest.raises(ValueError, match="only 0 and 1"):
        apply_leank(model, half)
    odd = torch.ones(30, 3, 64)
    odd[2, 1, :17] = 0
    with pytest.raises(ValueError, match="multiple of align=16"):
        apply_leank(model, odd)
    for kw in ({"sink": -1}, {"recent": -4}, {"block": 0}):
        with pytest.raises(ValueError, match="need sink >= 0"):
            apply_leank(model, torch.ones(30, 3, 64), Windows(**kw))
    with pytest.raises(TypeError, match="windows must be"):
        apply_leank(model, torch.ones(30, 3, 64), (16, 64, 32))
    with pytest.raises(ValueError, match="Unsupported architecture"):
        apply_leank(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")), torch.ones(30, 3, 64))
    with pytest.raises(ValueError, match="backend"):
        apply_leank(model, torch.ones(30, 3, 64), backend="cuda")
    if triton_available():
        with pytest.raises(ValueError, match="multiple of 16"):
            apply_leank(model, torch.ones(30, 3, 64), align=8, backend="triton")
    assert model.config._attn_implementation == "sdpa"  # failed calls installed nothing


def test_cache_misuse_gives_clear_errors(model, tokenizer):
    ids = continuation_example(tokenizer, 40, seed=5).context_ids[None]
    cache = LeanKCache(model, torch.ones(30, 3, 64), WINDOWS)
    name = cache_argument(model)
    with torch.no_grad():
        model(ids, **{name: cache})  # a prompt needs no LeanK attention: ordinary attention
        with pytest.raises(RuntimeError, match="without its attention"):  # decoding does: refused, not dense
            model(ids[:, :3], **{name: cache})
        with apply_leank(model, torch.ones(30, 3, 64), WINDOWS), pytest.raises(ValueError, match="batch size"):
            model(ids[:, :1].expand(2, 1), **{name: cache})
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    try:
        LeanKCache(model, torch.ones(30, 3, 64))  # eager masks are fine
    finally:
        model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="set_attn_implementation"):
        LeanKCache(SimpleNamespace(config=LlamaConfig(attn_implementation="flash_attention_2")), torch.ones(32, 8, 128))


def test_crop_and_batch_selection():
    mask = r07_test_mask()[:2]
    cache = filled_cache(mask, 60, torch.float32, batch=3)
    layer = cache.layers[1]
    recent = layer.length - SINK - layer.middle
    keys = layer.keys.clone()
    cache.crop(-2)
    assert layer.length == 58 and torch.equal(layer.keys, keys[:, :, :-2])
    with pytest.raises(NotImplementedError, match="uncompacted"):
        cache.crop(-(recent - 2 + 1))
    middle_k = [g.k.clone() for g in layer.groups]
    full_v = layer.values.clone()
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert all(torch.equal(g.k, k[[2, 0]]) for g, k in zip(layer.groups, middle_k))
    assert torch.equal(layer.values, full_v[[2, 0]])
    assert layer.keys.shape[0] == 2


def test_press_memory_is_readable_before_running_and_equals_a_real_cache():
    mask = r07_test_mask()
    press = LeanKPress(mask, Windows(16, 64, 32))  # no model needed
    cache = filled_cache(mask, 300, torch.float32, sink=16, recent=64, block=32)
    assert press.memory(300, bytes_per_value=4) == cache.memory_report()
    assert press.k_saved(300) == pytest.approx(cache.memory_report().k_saved) and 0.3 < press.k_saved(300) < 0.7
