"""The prefill-once student equals the student run over the whole sequence: loss and gradient, Llama and Qwen2.

The trainer prefills the context once without gradients and runs only the answer tokens through the student
(:mod:`leank_ref.train.student`: LeanK attention over the prefilled K/V, one SDPA call, keys scaled per KV
head). The reference is the straightforward student: :class:`~leank_ref.attention.SimulatedLeanK` over the
whole sequence (context queries attend normally, answer queries see ``K * s`` for middle keys), as the
authors' training runs it. Tiny random models built from configs; float32.
"""

from __future__ import annotations

import pytest
import torch

from leank_ref.attention import SimulatedLeanK, use_hook
from leank_ref.data import IGNORE_INDEX, Example
from leank_ref.train.loss import distillation_loss, straight_through
from leank_ref.train.settings import TrainSettings
from leank_ref.train.student import student_attention
from leank_ref.windows import Windows

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)  # head_dim 16, 2 query heads per KV head
WINDOWS = Windows(sink=4, recent=8, block=1)
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-3, 1e-4  # GRAD_ATOL: a share of the largest gradient


def tiny_model(model_type: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        model_type
    ]
    torch.manual_seed(0)
    config = config_class(**TINY, vocab_size=128, max_position_embeddings=512, initializer_range=0.3)
    return model_class(config).eval().requires_grad_(False)


def random_example(context: int, answer: int = 10, seed: int = 0) -> Example:
    """Random token ids: ``context`` context tokens, ``answer`` answer tokens, the first answer token unlabelled."""
    ids = torch.randint(0, 128, (context + answer,), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[: context + 1] = IGNORE_INDEX
    return Example(ids, context, labels, answer="", task="random")


def full_sequence_loss(model, example: Example, scale: torch.Tensor, exclude_zero_heads: bool) -> torch.Tensor:
    """The reference: teacher and student each over the whole sequence, SimulatedLeanK for the student."""
    n, ids = example.length_context, example.input_ids[None]
    keep = example.labels[n:] != IGNORE_INDEX
    with torch.no_grad():
        teacher = model.base_model(input_ids=ids).last_hidden_state[0, n:][keep]
    hook = SimulatedLeanK(scale, WINDOWS.sink, WINDOWS.recent, decode_start=n, exclude_zero_heads=exclude_zero_heads)
    with use_hook(model, hook):
        student = model.base_model(input_ids=ids).last_hidden_state[0, n:][keep]
    return (student - teacher).pow(2).mean(-1).mean()


def loss_and_grad(loss_fn, factors: torch.Tensor, scale_fn) -> tuple[float, torch.Tensor]:
    leaf = factors.clone().requires_grad_(True)
    loss = loss_fn(scale_fn(leaf))
    loss.backward()
    return loss.item(), leaf.grad


def scales(variant: str):
    """(settings, scale from factors, exclude zero heads) for stage 1 and both stage-2 forward passes."""
    if variant == "stage1":
        return TrainSettings(windows=WINDOWS), (lambda f: f), False
    mask = (torch.rand(2, 2, 16, generator=torch.Generator().manual_seed(5)) < 0.4).float()
    mask[0, 1] = 0  # a head with no kept channel: deployed skips its middle tokens, authors' gives logit 0
    settings = TrainSettings.for_stage(2, ratio=0.7, windows=WINDOWS, variant=variant)
    hard = variant == "deployed"
    return settings, (lambda f: straight_through(f, mask, hard=hard)), hard


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("variant", ["stage1", "deployed", "authors"])
@pytest.mark.parametrize("context", [40, 6])  # 6: shorter than sink + recent, the first answers have no middle
def test_prefill_once_student_equals_the_full_sequence_student(model_type, variant, context):
    model = tiny_model(model_type)
    example = random_example(context)
    factors = torch.rand(2, 2, 16, generator=torch.Generator().manual_seed(1))
    settings, scale_fn, exclude = scales(variant)

    ours = loss_and_grad(lambda s: distillation_loss(model, example, s, settings), factors, scale_fn)
    reference = loss_and_grad(lambda s: full_sequence_loss(model, example, s, exclude), factors, scale_fn)

    assert reference[0] > 1e-6 and float(reference[1].abs().max()) > 1e-8  # the factors really matter
    atol = GRAD_ATOL * float(reference[1].abs().max())
    assert ours[0] == pytest.approx(reference[0], rel=LOSS_RTOL)
    torch.testing.assert_close(ours[1], reference[1], rtol=GRAD_RTOL, atol=atol)

    # The comparison can fail: one token more of recent window moves loss and gradient far beyond the tolerance.
    wider = settings.replace(windows=Windows(WINDOWS.sink, WINDOWS.recent + 1, 1))
    other = loss_and_grad(lambda s: distillation_loss(model, example, s, wider), factors, scale_fn)
    assert abs(other[0] - reference[0]) > 100 * LOSS_RTOL * reference[0]
    assert float((other[1] - reference[1]).abs().max()) > 10 * (atol + GRAD_RTOL * float(reference[1].abs().max()))


@pytest.mark.parametrize("exclude", [False, True])
def test_student_attention_equals_simulated_leank(exclude):
    """The attention function alone, random tensors: GQA (3 query heads per KV head), a zero head, T=7 answers."""
    from types import SimpleNamespace

    g, r, n, t, d = 2, 3, 50, 7, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, g * r, t, d, generator=gen)
    k, v = torch.randn(1, g, n, d, generator=gen), torch.randn(1, g, n, d, generator=gen)
    scale = torch.rand(1, g, d, generator=gen)
    scale[0, 1] = 0
    windows = Windows(3, 5, 1)
    ours = student_attention(q, k, v, scale[0], windows, d**-0.5, exclude)
    layer = SimpleNamespace(layer_idx=0, num_key_value_groups=r, is_causal=True)
    reference = SimulatedLeanK(scale, 3, 5, decode_start=n - t, exclude_zero_heads=exclude)(layer, q, k, v, None)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
