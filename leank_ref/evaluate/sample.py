"""One sample: a shared dense prefill, then every row (one mask each) decodes against it, batched.

Greedy decoding (:func:`generate_rows`) for the passkey accuracy, teacher forcing (:func:`teacher_forced_logprobs`)
for the log-likelihood and KL; :func:`evaluate_sample` turns either into one result row per config.
"""

from __future__ import annotations

import torch

from leank_ref.attention import QKCapture, SimulatedLeanKRows, capture_prefill, use_hook
from leank_ref.evaluate.configs import Config
from leank_ref.evaluate.grid import EvalGrid, example_for
from leank_ref.evaluate.metrics import answer_metrics, needle_positions


@torch.no_grad()
def generate_rows(
    model,
    prompt: QKCapture,
    first_token: int,
    masks: torch.Tensor,
    grid: EvalGrid,
    tokenizer,
    answer: str,
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy decoding of up to ``max_new_tokens`` (the first included), one row per mask [B, L, G, D], after the
    shared prompt; a row stops at EOS or once its text contains ``answer``."""
    decoder = SimulatedLeanKRows(prompt, masks, grid.windows.sink, grid.windows.recent)
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    out_ids = [[first_token] for _ in range(masks.shape[0])]

    def finished(ids: list[int]) -> bool:
        return ids[-1] == eos or answer in tokenizer.decode(ids, skip_special_tokens=True)

    active = [i for i, ids in enumerate(out_ids) if not finished(ids)]
    decoder.select(active)
    tokens = torch.full((len(active), 1), first_token, dtype=torch.long, device=device)  # [B, 1]
    position = decoder.prompt_len
    with use_hook(model, decoder):
        for _ in range(max_new_tokens - 1):
            if not active:
                break
            positions = torch.full_like(tokens, position)
            logits = model(input_ids=tokens, position_ids=positions, use_cache=False).logits[:, -1]  # [B, V]
            position += 1
            nxt = logits.argmax(-1)  # [B]
            for i, row in enumerate(active):
                out_ids[row].append(int(nxt[i]))
            keep = [i for i, row in enumerate(active) if not finished(out_ids[row])]
            if len(keep) < len(active):
                decoder.select(keep)
                active = [active[i] for i in keep]
                nxt = nxt[keep]
            tokens = nxt[:, None]
    return out_ids


@torch.no_grad()
def teacher_forced_logprobs(
    model, prompt: QKCapture, answer_ids: torch.Tensor, masks: torch.Tensor, grid: EvalGrid
) -> torch.Tensor:
    """Log-probs [B, A-1, V] of the next token at the decode positions, feeding ``answer_ids[:-1]`` to each row."""
    decoder = SimulatedLeanKRows(prompt, masks, grid.windows.sink, grid.windows.recent)
    rows = masks.shape[0]
    device = next(model.parameters()).device
    inputs = answer_ids[:-1].reshape(1, -1).expand(rows, -1).to(device)  # [B, A-1]
    positions = (decoder.prompt_len + torch.arange(inputs.shape[1], device=device)).expand(rows, -1)
    with use_hook(model, decoder):
        logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits  # [B, A-1, V]
    return torch.log_softmax(logits.float(), dim=-1)


def evaluate_sample(model, tokenizer, spec: dict, configs: list[Config], grid: EvalGrid) -> list[dict]:
    """All configs on one sample (one shared prefill); one result row per config."""
    return evaluate_sample_jobs(model, tokenizer, spec, [(configs, grid)])[0]


def evaluate_sample_jobs(model, tokenizer, spec: dict, jobs: list[tuple[list[Config], EvalGrid]]) -> list[list[dict]]:
    """Several (configs, grid) jobs on one sample, e.g. one per window setting: the dense prefill does not depend on
    the windows or the masks, so it runs once; one list of rows per job. The grids must build the same example."""
    examples = [example_for(tokenizer, spec, grid) for _, grid in jobs]
    ex = examples[0]
    if any(not torch.equal(e.input_ids, ex.input_ids) for e in examples[1:]):
        raise ValueError("these grids build different examples from one spec (tasks, lengths, answer length or "
                         "kv pairs differ): evaluate them separately")  # fmt: skip
    capture, last_logits = capture_prefill(model, ex.context_ids, values=True)
    return [_sample_rows(model, tokenizer, spec, ex, capture, last_logits, c, g) for c, g in jobs]


def _sample_rows(model, tokenizer, spec, ex, capture, last_logits, configs: list[Config], grid: EvalGrid) -> list[dict]:
    """One job's rows on a prefilled sample (see :func:`evaluate_sample_jobs`)."""
    masks = torch.stack([c.mask(model, capture, grid.align) for c in configs])  # [B, L, G, D]
    base = {k: spec.get(k) for k in ("task", "source", "length", "seed")}
    base["depth"] = ex.meta.get("depth")
    rows = []
    if spec["task"] == "passkey_greedy":
        first = int(last_logits[0].argmax())
        outputs = generate_rows(model, capture, first, masks, grid, tokenizer, ex.answer, grid.max_new_tokens)
        for c, ids in zip(configs, outputs):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            rows.append(
                {
                    **base,
                    "method": c.method,
                    "ratio": c.ratio,
                    "budget": c.budget,
                    "correct": int(ex.answer in text),
                    "answer": ex.answer,
                    "output": text.strip(),
                }
            )
        return rows
    answer = ex.input_ids[ex.length_context :]
    logprobs = teacher_forced_logprobs(model, capture, answer, masks, grid)  # [B, A-1, V]: predicts answer[1:]
    targets = answer[1:]
    if spec["task"] == "continuation":
        ll_at = list(range(len(targets)))
    else:  # the needle's digits; the answer's first token (from the dense prefill) is never one of them
        ll_at = [j - 1 for j in needle_positions(tokenizer, answer, ex.answer) if j > 0]
    dense = logprobs[[c.method for c in configs].index("dense")]
    for c, lp in zip(configs, logprobs):
        rows.append(
            {
                **base,
                "method": c.method,
                "ratio": c.ratio,
                "budget": c.budget,
                **answer_metrics(dense, lp, targets, ll_at),
            }
        )
    return rows
