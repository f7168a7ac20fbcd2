"""The per-answer measures: which answer tokens are the needle, and ``ll`` / ``kl`` / ``top1`` of one row."""

from __future__ import annotations

import torch


def needle_positions(tokenizer, answer_ids: torch.Tensor, needle: str) -> list[int]:
    """Indices of the tokens of ``answer_ids`` whose text overlaps the first occurrence of ``needle`` in it."""
    ids = answer_ids.tolist()
    text = tokenizer.decode(ids)
    start = text.find(needle)
    if start < 0:
        raise ValueError(f"the answer {text!r} does not contain the needle {needle!r}.")
    end, out, prev = start + len(needle), [], 0
    for j in range(len(ids)):
        cur = len(tokenizer.decode(ids[: j + 1]))
        if prev < end and cur > start:
            out.append(j)
        prev = cur
    return out


def answer_metrics(ref: torch.Tensor, logprobs: torch.Tensor, targets: torch.Tensor, ll_at: list[int]) -> dict:
    """Per row: ``ll`` (mean log-prob of ``targets`` at ``ll_at``), ``kl`` (mean KL(ref || row)), ``top1``.

    ``ref`` [A, V] and ``logprobs`` [A, V] are next-token log-probs at the teacher-forced positions, ``targets``
    [A] the tokens that follow; ``ll_at`` indexes those positions.
    """
    kl = (ref.exp() * (ref - logprobs)).sum(-1)  # [A]
    agree = (ref.argmax(-1) == logprobs.argmax(-1)).float()
    ll = logprobs.gather(-1, targets[:, None].to(logprobs.device))[:, 0]  # [A]
    return {"ll": float(ll[ll_at].mean()), "kl": float(kl.mean()), "top1": float(agree.mean())}
