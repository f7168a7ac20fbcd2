"""The preallocated (static) LeanK cache and its decode loop: the same tokens and logits as the default cache, fixed
buffer addresses through compactions, both decode backends; on CUDA, a captured and replayed step equals eager
decoding (run on the GPU; skipped on the CPU)."""

import os

import pytest
import torch

from leank_ref.attention import use_hook
from leank_ref.cache import LeanKAttention, LeanKCache, apply_leank
from leank_ref.data import continuation_example
from leank_ref.decode import triton_available
from leank_ref.masks import binarize
from leank_ref.models import cache_argument
from leank_ref.static_decode import greedy_decode
from leank_ref.windows import Windows

WINDOWS = Windows(sink=8, recent=24, block=8)  # small windows: 20 steps cross two compactions
STEPS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def r07_mask() -> torch.Tensor:
    """SmolLM2-shaped r=0.7 mask from seeded factors: zero-count heads and several kept counts per layer."""
    g = torch.Generator().manual_seed(0)
    return binarize(torch.rand(30, 3, 64, generator=g) * torch.rand(30, 3, 1, generator=g) ** 2, 0.7, 16)


def dynamic_generate(model, ids, mask, steps, **kwargs):
    """(tokens, logits [B, steps, V]) of model.generate with the default (growing) LeanK cache."""
    cache = LeanKCache(model, mask, WINDOWS, **kwargs)
    with use_hook(model, LeanKAttention(cache)):  # the cache's attention, bound for the call
        out = model.generate(
            ids,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **{cache_argument(model): cache},
        )
    return out.sequences, torch.stack(out.logits, 1), cache


def buffer_addresses(cache) -> list[int]:
    return [
        t.data_ptr() for layer in cache.layers for t in [layer._kv_full, layer.lengths, *layer._mid_k, *layer._mid_v]
    ]


@pytest.mark.parametrize("prompt_len", [30, 100])  # without and with a middle store after the prompt
def test_static_decoding_equals_the_default_cache(model, tokenizer, prompt_len):
    mask = r07_mask()
    ids = continuation_example(tokenizer, prompt_len, seed=1).context_ids[None]
    tokens, logits, dynamic = dynamic_generate(model, ids, mask, STEPS)
    static = LeanKCache(model, mask, WINDOWS, static=True, max_tokens=prompt_len + STEPS)
    seen = []
    original = static.end_step

    def end_step():  # record the buffers' addresses after every step
        original()
        seen.append(buffer_addresses(static))

    static.end_step = end_step
    out, out_logits = greedy_decode(model, ids, STEPS, static, cuda_graph=False, output_logits=True)
    assert torch.equal(out, tokens)
    torch.testing.assert_close(out_logits, logits, atol=2e-4, rtol=1e-4)
    assert len(seen) == STEPS - 1 and all(a == seen[0] for a in seen)  # fixed addresses, compactions included
    layer = static.layers[0]
    assert layer.middle == dynamic.layers[0].middle > 0 and layer.middle >= 16
    assert layer.lengths.tolist() == [layer.n_full, layer.middle] == [dynamic.layers[0].n_full, layer.middle]
    assert static.memory_report() == dynamic.memory_report()


def test_static_cache_in_plain_generate_and_through_the_handle(model, tokenizer):
    """Without the decode loop a static cache keeps its own counters, so model.generate works with it too."""
    mask = r07_mask()
    ids = continuation_example(tokenizer, 40, seed=2).context_ids[None]
    tokens, _, _ = dynamic_generate(model, ids, mask, 10)
    with apply_leank(model, mask, WINDOWS) as lk:
        static = lk.new_cache(max_tokens=50, static=True)
        out = model.generate(
            ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, **{cache_argument(model): static}
        )
    assert torch.equal(out, tokens)
    assert static.layers[0].lengths.tolist() == [static.layers[0].n_full, static.layers[0].middle]


def test_static_decoding_errors(model, tokenizer):
    ids = continuation_example(tokenizer, 30, seed=3).context_ids[None]
    mask = torch.ones(30, 3, 64)
    with pytest.raises(ValueError, match="give max_tokens"):
        LeanKCache(model, mask, static=True)
    with pytest.raises(ValueError, match="static=True"):
        greedy_decode(model, ids, 4, LeanKCache(model, mask))
    with pytest.raises(ValueError, match="max_tokens >= 34"):
        greedy_decode(model, ids, 4, LeanKCache(model, mask, static=True, max_tokens=33))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            greedy_decode(model, ids, 4, LeanKCache(model, mask, static=True, max_tokens=34), cuda_graph=True)
    static = LeanKCache(model, mask, static=True, max_tokens=34)
    greedy_decode(model, ids, 2, static)
    with pytest.raises(ValueError, match="fresh cache"):
        greedy_decode(model, ids, 2, static)


INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not (triton_available() and INTERPRETER), reason="runs the CPU model through Triton's interpreter")
def test_static_triton_decoder_reads_the_device_lengths(model, tokenizer):
    mask = r07_mask()
    ids = continuation_example(tokenizer, 40, seed=6).context_ids[None]
    out = {}
    for backend in ("torch", "triton"):
        cache = LeanKCache(model, mask, WINDOWS, static=True, max_tokens=44, backend=backend)
        out[backend] = greedy_decode(model, ids, 3, cache, output_logits=True)
        assert cache.layers[0].middle > 0
    assert torch.equal(out["triton"][0], out["torch"][0])
    torch.testing.assert_close(out["triton"][1], out["torch"][1], atol=1e-4, rtol=1e-4)


def tiny_llama(device: str):
    """A small random Llama (4 layers, 8 query / 2 KV heads, head_dim 64) in float32: no model download needed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config).to(device).eval()
    model.set_attn_implementation("sdpa")
    return model


@torch.no_grad()
def teacher_forced_logits(model, cache, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits [B, N, V] for each token after the prompt, feeding ``tokens`` one at a time through ``cache``."""
    name = cache_argument(model)
    with use_hook(model, LeanKAttention(cache)):
        out = [model(tokens[:, :prompt_len], **{name: cache}).logits[:, -1]]
        for i in range(prompt_len, tokens.shape[1] - 1):
            out.append(model(tokens[:, i : i + 1], **{name: cache}).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_replay_equals_eager_decoding(backend):
    """On the GPU (float32, a small random Llama): the step captured once and replayed 40 times gives exactly the
    eager static loop's tokens, and logits equal to the default cache's fed the same tokens, through compactions."""
    if backend == "triton" and not triton_available():
        pytest.skip("no Triton")
    model = tiny_llama("cuda")
    g = torch.Generator().manual_seed(1)
    mask = binarize(torch.rand(4, 2, 64, generator=g) * torch.rand(4, 2, 1, generator=g) ** 2, 0.7, 16)
    prompt, steps = 100, 40
    ids = torch.randint(0, 512, (2, prompt), generator=g).cuda()

    def static_cache():
        return LeanKCache(model, mask, WINDOWS, static=True, max_tokens=prompt + steps, backend=backend)

    eager = greedy_decode(model, ids, steps, static_cache(), cuda_graph=False, output_logits=True)
    cache = static_cache()
    graph = greedy_decode(model, ids, steps, cache, cuda_graph=True, output_logits=True)
    assert cache.layers[0].middle >= 96  # several compactions happened between replays
    assert torch.equal(graph[0], eager[0])
    torch.testing.assert_close(graph[1], eager[1], atol=1e-5, rtol=1e-5)
    forced = teacher_forced_logits(model, LeanKCache(model, mask, WINDOWS, backend=backend), graph[0], prompt)
    torch.testing.assert_close(graph[1], forced, atol=1e-4, rtol=1e-4)
