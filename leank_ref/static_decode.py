"""Decoding with a preallocated LeanK cache: one decode step of fixed shapes, captured once as a CUDA graph.

Eager decoding spends most of a short step on the host: Python, transformers' bookkeeping and one kernel launch
after another. A CUDA graph records the launches of one step once and replays them with a single call, but only if
every replay touches the same addresses with the same shapes. A ``LeanKCache(..., static=True, max_tokens=N)``
gives exactly that:

* its full window (sink + recent + one block of slots) and its middle groups (room for every middle token up to
  ``N``) are allocated once, and attention always reads the whole buffers;
* how much of them is filled lives on the device, ``lengths = (n_full, n_mid)`` per layer: a step writes the new
  token at slot ``n_full`` and adds one, on the device, so the replayed step needs no Python;
* the compaction of a block (once every ``block`` tokens) runs eagerly *between* replays (``begin_step``): it
  moves data inside the fixed buffers and rewrites ``lengths``, addresses stay the same.

Attention then masks what is not filled: the layer's ``lengths`` go to the Triton decoder and to
:func:`leank_ref.decode.leank_decode_torch`, which set unfilled slots aside on the device (the buffers start
zeroed, so no slot holds a NaN). :func:`greedy_decode` is the decode loop: prefill eagerly, then one step per
token, replayed from a graph on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .attention import use_hook
from .cache import LeanKAttention
from .models import cache_argument


def capture_graph(step: Callable[[], None], state: Sequence[torch.Tensor] = ()) -> Callable[[], None]:
    """Warm ``step`` up on a side stream (then undo its effect on ``state``), capture it once; return the replay."""
    saved = [t.clone() for t in state]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # first calls compile kernels and allocate workspaces, which a capture must not do
            step()
            for t, s in zip(state, saved):
                t.copy_(s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@torch.no_grad()
def greedy_step(model, cache, token: torch.Tensor, position: torch.Tensor, last: torch.Tensor) -> Callable[[], None]:
    """One greedy decode step on static buffers, updated in place (what a CUDA graph captures).

    ``token`` [B, 1] is fed and replaced by the argmax, ``position`` [B, 1] advances by one, ``last`` [B, vocab]
    receives the step's logits.
    """
    name = cache_argument(model)

    def step() -> None:
        out = model(input_ids=token, position_ids=position, use_cache=True, logits_to_keep=1, **{name: cache})
        last.copy_(out.logits[:, -1])
        token.copy_(last.argmax(-1, keepdim=True))
        position.add_(1)

    return step


def greedy_decode(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    cache,
    cuda_graph: bool | None = None,
    output_logits: bool = False,
):
    """Greedy decoding with a static LeanK cache: ``input_ids`` [B, P] -> [B, P + max_new_tokens].

    ``cache``: a fresh ``LeanKCache(model, mask, windows, static=True, max_tokens >= P + max_new_tokens)``; its
    attention is bound to the model for the call (:class:`~leank_ref.cache.LeanKAttention`). The prompt is a
    normal (eager) forward pass; each new token is one step of fixed shapes, captured once as a CUDA graph and
    replayed when ``cuda_graph`` (default: on CUDA), or run eagerly (the same code, e.g. on CPU). With
    ``output_logits`` it also returns the logits of every new token, [B, max_new_tokens, V].
    """
    b, p = input_ids.shape
    if not getattr(cache, "static", False):
        raise ValueError("greedy_decode needs LeanKCache(model, mask, windows, static=True, max_tokens=...).")
    if cache.get_seq_length():
        raise ValueError("greedy_decode needs a fresh cache (this one already holds tokens).")
    if max_new_tokens < 1 or cache.max_tokens < p + max_new_tokens:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} after a {p}-token prompt needs 1 <= max_new_tokens and "
            f"max_tokens >= {p + max_new_tokens} (the cache has max_tokens={cache.max_tokens})."
        )
    cuda_graph = input_ids.device.type == "cuda" if cuda_graph is None else cuda_graph
    if cuda_graph and input_ids.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and input_ids on a CUDA device.")
    with use_hook(model, LeanKAttention(cache)):
        name = cache_argument(model)
        logits = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{name: cache}).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)  # [B, 1]: static inputs of every step, updated in place
        position = torch.full((b, 1), p, dtype=torch.long, device=input_ids.device)
        last = logits.clone()
        new_tokens, new_logits = [token.clone()], [logits.clone()]

        step = greedy_step(model, cache, token, position, last)
        cache.driven = True  # the loop keeps the host counters: a replayed graph runs no Python
        try:
            run = step
            for i in range(max_new_tokens - 1):
                cache.begin_step()
                if cuda_graph and i == 0:
                    run = capture_graph(step, [token, position, last] + [layer.lengths for layer in cache.layers])
                run()
                cache.end_step()
                new_tokens.append(token.clone())
                if output_logits:
                    new_logits.append(last.clone())
        finally:
            cache.driven = False
    tokens = torch.cat([input_ids, *new_tokens], dim=1)
    return (tokens, torch.stack(new_logits, 1)) if output_logits else tokens
