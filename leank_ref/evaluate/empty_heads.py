"""The empty-head effect at equal K bytes: does a head do better skipping its middle tokens than reading them
through its few kept channels?

A deployed LeanK head with no kept channel stores no middle K *or V*: its middle tokens are skipped
(:func:`leank_ref.masks.zero_head_rule`). A head with ``align`` kept channels reads them through those channels.
To isolate the difference from the K budget, two mask surgeries move exactly ``align`` channels inside one layer,
so the mask's total K bytes stay the same and every count stays a multiple of ``align``:

* :func:`empty_head` (a ``swap``): a head keeping ``align`` channels gives them up (it now skips its middle) and
  a *recipient* of the same layer gains its ``align`` best pruned channels. The recipient is the non-empty,
  not-full head whose best pruned channels have the largest mean stage-1 factor. V bytes fall by one head.
* :func:`restore_head` (a ``restore``): an empty head gets back its ``align`` best channels by stage-1 factor, taken
  from a *donor* of the same layer that keeps at least ``2 * align`` (so it stays non-empty): the one whose weakest
  ``align`` kept channels have the smallest mean factor. V bytes rise by one head.

:func:`empty_heads_configs` turns a mask into the rows of one comparison (each surgery alone, all at once, and the
emptying alone without the recipient's gain), evaluated with the evaluation's own paired measures
(:func:`leank_ref.evaluate.sample.evaluate_sample`); :func:`analyze_moves` reads them with
:func:`leank_ref.stats.compare` (paired bootstrap intervals per text source).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from leank_ref.baselines import Selector
from leank_ref.evaluate.configs import Config
from leank_ref.masks import check_align, check_shape, kept_counts, validate_mask
from leank_ref.memory import memory_formula
from leank_ref.stats import compare
from leank_ref.windows import SMOLLM2, Windows

BASE = "leank"  # method name of the unmodified mask's row


@dataclass(frozen=True)
class HeadMove:
    """One equal-K-bytes move inside ``layer``: ``head`` empties (``swap``) or is restored (``restore``),
    ``partner`` gains (recipient) or loses (donor) the ``channels`` moved."""

    kind: str  # "swap" or "restore"
    layer: int
    head: int
    partner: int
    partner_channels: tuple[int, ...]  # the partner's channels gained (swap) or given up (restore)
    head_channels: tuple[int, ...]  # the head's channels given up (swap) or gained (restore)

    @property
    def name(self) -> str:
        """``swap_L3H0`` / ``restore_L3H0``: the row's method name."""
        return f"{self.kind}_L{self.layer}H{self.head}"


def _check(mask: torch.Tensor, factors: torch.Tensor, align: int) -> torch.Tensor:
    mask = validate_mask(mask, align=align)
    check_shape(factors, tuple(mask.shape), "factors")
    check_align(align, mask.shape[-1])
    return mask


def empty_head(
    mask: torch.Tensor, factors: torch.Tensor, layer: int, head: int, align: int, exclude: frozenset[int] = frozenset()
) -> tuple[torch.Tensor, HeadMove] | None:
    """Empty ``head`` of ``layer`` (which keeps exactly ``align`` channels) and give ``align`` channels to a recipient
    of the same layer (module docstring); None if no head qualifies. ``exclude``: heads that may not receive."""
    mask = _check(mask, factors, align).clone()
    counts, d = kept_counts(mask)[layer], mask.shape[-1]
    if int(counts[head]) != align:
        raise ValueError(
            f"layer {layer} head {head} keeps {int(counts[head])} channels; a swap empties a head of {align}."
        )
    f = factors[layer].float()
    best, pick = None, None
    for g in range(mask.shape[1]):
        if g == head or g in exclude or not 0 < int(counts[g]) < d:
            continue
        pruned = (mask[layer, g] == 0).nonzero()[:, 0]
        top = pruned[torch.sort(f[g, pruned], descending=True, stable=True).indices[:align]]
        score = float(f[g, top].mean())
        if best is None or score > best:
            best, pick = score, (g, top)
    if pick is None:
        return None
    g, top = pick
    given = tuple(int(c) for c in mask[layer, head].nonzero()[:, 0])
    mask[layer, head] = 0.0
    mask[layer, g, top] = 1.0
    return mask, HeadMove("swap", layer, head, g, tuple(sorted(int(c) for c in top)), given)


def restore_head(
    mask: torch.Tensor, factors: torch.Tensor, layer: int, head: int, align: int, exclude: frozenset[int] = frozenset()
) -> tuple[torch.Tensor, HeadMove] | None:
    """Give the empty ``head`` of ``layer`` its ``align`` best channels by factor, taken from a donor of the same layer
    (module docstring); None if no head can give them. ``exclude``: heads that may not donate."""
    mask = _check(mask, factors, align).clone()
    counts = kept_counts(mask)[layer]
    if int(counts[head]) != 0:
        raise ValueError(
            f"layer {layer} head {head} keeps {int(counts[head])} channels; a restore needs an empty head."
        )
    f = factors[layer].float()
    best, pick = None, None
    for g in range(mask.shape[1]):
        if g == head or g in exclude or int(counts[g]) < 2 * align:
            continue
        kept = mask[layer, g].nonzero()[:, 0]
        weak = kept[torch.sort(f[g, kept], descending=False, stable=True).indices[:align]]
        score = float(f[g, weak].mean())
        if best is None or score < best:
            best, pick = score, (g, weak)
    if pick is None:
        return None
    g, weak = pick
    gained = torch.sort(f[head], descending=True, stable=True).indices[:align]
    mask[layer, g, weak] = 0.0
    mask[layer, head, gained] = 1.0
    return mask, HeadMove(
        "restore", layer, head, g, tuple(sorted(int(c) for c in weak)), tuple(sorted(int(c) for c in gained))
    )


def all_moves(mask: torch.Tensor, factors: torch.Tensor, align: int, kind: str) -> list[tuple[torch.Tensor, HeadMove]]:
    """Every single move of ``kind`` on ``mask``: one per head keeping ``align`` (swap) or none (restore)."""
    if kind not in ("swap", "restore"):
        raise ValueError(f"kind={kind!r}: choose 'swap' or 'restore'.")
    counts = kept_counts(_check(mask, factors, align))
    want = align if kind == "swap" else 0
    move = empty_head if kind == "swap" else restore_head
    heads = [(int(l), int(g)) for l, g in (counts == want).nonzero()]
    return [m for l, g in heads if (m := move(mask, factors, l, g, align)) is not None]


def combined_moves(
    mask: torch.Tensor, factors: torch.Tensor, align: int, kind: str
) -> tuple[torch.Tensor, list[HeadMove]]:
    """All moves of ``kind`` at once, applied in (layer, head) order on the updated mask. Heads moved themselves never
    act as partners (a head that empties receives nothing; a restored head donates nothing)."""
    counts = kept_counts(_check(mask, factors, align))
    want = align if kind == "swap" else 0
    move = empty_head if kind == "swap" else restore_head
    out, moves = mask.clone(), []
    for layer in range(mask.shape[0]):
        heads = frozenset(int(g) for g in (counts[layer] == want).nonzero()[:, 0])
        for g in sorted(heads):
            done = move(out, factors, layer, g, align, exclude=heads)
            if done is not None:
                out, m = done
                moves.append(m)
    return out, moves


def emptied_only(mask: torch.Tensor, align: int) -> torch.Tensor:
    """``mask`` with every head keeping exactly ``align`` channels emptied, nothing given elsewhere (fewer K bytes)."""
    mask = validate_mask(mask, align=align).clone()
    mask[kept_counts(mask) == align] = 0.0
    return mask


@dataclass
class FixedMask(Selector):
    """A selector that returns one given mask (a surgery's result); the budget must be the mask's own counts."""

    fixed: torch.Tensor  # [L, G, D]
    name: ClassVar[str] = "fixed"

    def select(self, model, counts, align, prompt_ids=None, capture=None) -> torch.Tensor:
        if counts is not None and not torch.equal(kept_counts(self.fixed), counts.long()):
            raise ValueError("FixedMask returns its own mask: pass kept_counts(mask) as the budget.")
        return self.fixed.clone()


def empty_heads_configs(
    mask: torch.Tensor, factors: torch.Tensor, ratio: float, align: int, single: bool = True
) -> tuple[list[Config], list[HeadMove]]:
    """The rows of the experiment: dense, the mask itself (method ``leank``), ``swap_all``, ``restore_all``,
    ``empty_only`` and, with ``single``, every single swap and restore. Returns the configs and the single moves."""
    from leank_ref.baselines import Dense

    def row(method: str, m: torch.Tensor, budget: str) -> Config:
        return Config(method, ratio, budget, FixedMask(m), kept_counts(m))

    rows = [Config("dense", 0.0, "none", Dense()), row(BASE, mask, "leank")]
    for kind in ("swap", "restore"):
        rows.append(row(f"{kind}_all", combined_moves(mask, factors, align, kind)[0], kind))
    rows.append(row("empty_only", emptied_only(mask, align), "fewer_k"))
    moves = []
    if single:
        for kind in ("swap", "restore"):
            for m, move in all_moves(mask, factors, align, kind):
                rows.append(row(move.name, m, kind))
                moves.append(move)
    return rows, moves


def bytes_of(configs: list[Config], tokens: int, windows: Windows = SMOLLM2) -> dict[str, dict]:
    """Per row (not dense): total K and V bytes (bf16, one sequence) at ``tokens`` and the share saved."""
    out = {}
    for c in configs:
        if c.method == "dense":
            continue
        rep = memory_formula(c.selector.fixed, tokens, windows)
        out[c.method] = {"k_bytes": rep.k, "v_bytes": rep.v, "k_saved": rep.k_saved, "v_saved": rep.v_saved}
    return out


def analyze_moves(
    rows: list[dict], methods: list[str], ratio: float, tolerance: float, by: tuple[str, ...]
) -> list[dict]:
    """Paired comparison of each of ``methods`` with the unmodified mask (and with dense) within each group of
    ``by`` (e.g. ``("source",)``), for ``ll`` and ``kl``; positive = the method is better."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        for method in methods:
            for ref in ((BASE, ratio, "leank"), ("dense", 0.0, "none")):
                if method == ref[0]:
                    continue
                budget = next(r["budget"] for r in members if r["method"] == method)
                for metric in ("ll", "kl"):
                    res = compare(members, (method, ratio, budget), ref, metric, tolerance)
                    out.append({**dict(zip(by, key)), "method": method, **res})
    return out
