"""The scorecard's rows, one function per claim, each reading the result files (and masks) of a checkout ``root``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from leank_ref.scorecard.rules import RULES, Row, Rules, device_of, missing


def load_json(path: Path) -> dict | None:
    """A result file's contents, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# (label, mask file under masks/, alignment, tokens, sink, recent, block): the authors' mask in their deployment
# windows at 32K and 128K tokens, ours in this project's SmolLM2 windows at SmolLM2's context limit.
MEMORY_SETTINGS = (
    ("authors' Llama-3.1-8B mask", "reference/llama3.1-8b-instruct.pth", 32, 32768, 128, 768, 128),
    ("authors' Llama-3.1-8B mask", "reference/llama3.1-8b-instruct.pth", 32, 131072, 128, 768, 128),
    ("our SmolLM2-135M mask r=0.7", "smollm2-135m_r0.7.pth", 16, 8192, 16, 64, 32),
)


def memory_rows(root: Path, rules: Rules = RULES) -> list[Row]:
    """K and V saved by a LeanK cache holding a mask file's kept channels, against a dense cache of the same length.

    The bytes come from the mask's per-head counts (:func:`leank_ref.memory.memory_formula`), which equal the bytes
    a :class:`~leank_ref.cache.LeanKCache` holds after generation (checked in ``tests/test_memory.py``).
    """
    from leank_ref.masks import load_mask
    from leank_ref.memory import memory_formula
    from leank_ref.windows import Windows

    rows = []
    for label, name, align, tokens, sink, recent, block in MEMORY_SETTINGS:
        source = f"masks/{name} -> memory.memory_formula"
        try:
            mask = load_mask(root / "masks" / name, align=align)
        except (OSError, ValueError) as e:
            rows.extend(missing(claim, paper, source, type(e).__name__) for claim, paper, *_ in rules.memory_claims)
            continue
        report = memory_formula(mask, tokens, Windows(sink, recent, block))
        setting = (
            f"{label} ({1 - float(mask.mean()):.1%} of K channels pruned), {tokens // 1024}K tokens, "
            f"sink {sink} / recent {recent}"
        )
        for claim, paper, key, low, high, tolerance in rules.memory_claims:
            value = getattr(report, key)
            verdict = rules.share(value, low, high, tolerance)
            rows.append(Row(claim, paper, f"{100 * value:.1f}%", setting, source, verdict))
    return rows


def kernel_rows(root: Path, rules: Rules = RULES) -> list[Row]:
    """Attention kernel speed-up: LeanK's Triton decode kernel over the fastest SDPA backend, per shape."""
    path = root / "benchmarks" / "results" / "decode_kernels.json"
    result = load_json(path)
    claim, paper = "attention kernel speed-up", "1.3x"
    if result is None or not result.get("results"):
        return [missing(claim, paper, "benchmarks/results/decode_kernels.json", "file or entry absent")]
    rows = []
    for batch, tokens in ((8, 32768), (1, 131072)):
        source = f"benchmarks/results/decode_kernels.json: results[B={batch}, N={tokens}].leank_triton"
        match = [r for r in result["results"] if r.get("B") == batch and r.get("N") == tokens]
        value = match[0].get("methods", {}).get("leank_triton", {}).get("speedup_vs_best_sdpa") if match else None
        if value is None:
            rows.append(missing(claim, paper, source, "shape not measured"))
            continue
        setting = (
            f"authors' Llama-3.1-8B mask, batch {batch}, {tokens // 1024}K tokens, 32 layers, bf16, "
            f"vs the fastest SDPA backend; {device_of(result)}"
        )
        rows.append(Row(claim, paper, f"{value:.2f}x", setting, source, rules.speed(value, 1.3)))
    return rows


def _decode_entries(result: dict) -> dict[tuple[int, int], dict]:
    """Per (batch, tokens): LeanK's step over the same cache keeping every channel (``ones``) and over the best dense
    step (``dense``), and the entry they come from."""
    # The benchmark's ``headline`` block per ``B8_N32K`` shape; files written before it existed have
    # ``leank_speedup``/``leank_speedup_vs_ones`` in each ``decode`` row.
    out = {}
    for name, h in (result.get("headline") or {}).items():
        batch, tokens = name[1:].split("_N")
        tokens = int(tokens[:-1]) * 1024 if tokens.endswith("K") else int(tokens)
        if h.get("speedup_vs_all_ones") is not None:
            out[(int(batch), tokens)] = {
                "ones": h["speedup_vs_all_ones"],
                "dense": h.get("speedup_vs_best_dense"),
                "dense_mode": h.get("best_dense_mode", ""),
                "where": f"headline.{name}.speedup_vs_all_ones",
            }
    if not out:
        for r in result.get("decode", []):
            if r.get("leank_speedup_vs_ones") is not None:
                out[(r["batch"], r["context"])] = {
                    "ones": r["leank_speedup_vs_ones"],
                    "dense": r.get("leank_speedup"),
                    "dense_mode": "eager",
                    "where": f"decode[batch={r['batch']}, context={r['context']}].leank_speedup_vs_ones",
                }
    return out


def decoding_rows(root: Path, rules: Rules = RULES) -> list[Row]:
    """Decoding speed-up from pruning: whole greedy steps of a Llama-3.1-8B-shaped model, LeanK over the same cache
    and kernel keeping every channel (the dense control that differs only in the mask).

    The speed-up over the fastest dense step measured (eager or under a CUDA graph) is shown beside it but not
    judged: it also measures how the dense baseline is implemented, not only the pruning.
    """
    result = load_json(root / "benchmarks" / "results" / "end_to_end.json") or {}
    claim, paper = "decoding speed-up", "1.45x"
    entries = _decode_entries(result)
    shapes = [(8, 32768), (1, 131072) if (1, 131072) in entries or (1, 32768) not in entries else (1, 32768)]
    rows = []
    for batch, tokens in shapes:
        source = f"benchmarks/results/end_to_end.json: headline.B{batch}_N{tokens // 1024}K"
        entry = entries.get((batch, tokens))
        if entry is None:
            rows.append(missing(claim, paper, source, "file or shape absent"))
            continue
        ours = f"{entry['ones']:.2f}x over the same cache keeping every channel"
        if entry["dense"] is not None:
            how = "under a CUDA graph" if entry["dense_mode"].endswith("graph") else "launched from Python"
            ours += f" ({entry['dense']:.2f}x over the fastest dense step, {how})"
        setting = f"Llama-3.1-8B shape (random weights), authors' mask, batch {batch}, {tokens // 1024}K tokens; " + (
            device_of(result)
        )
        source = f"benchmarks/results/end_to_end.json: {entry['where']}"
        rows.append(Row(claim, paper, ours, setting, source, rules.speed(entry["ones"], 1.45)))
    return rows


def _summary(root: Path) -> list[dict]:
    """The evaluation summary rows (``results/eval_summary.csv``), numbers parsed."""
    path = root / "results" / "eval_summary.csv"
    try:
        with path.open() as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    for row in rows:
        for key, value in row.items():
            try:
                row[key] = float(value) if value not in ("", None) else None
            except (TypeError, ValueError):
                pass
    return rows


def _held_rows(evaluation: dict, claim: str, paper: str) -> list[Row]:
    """Rows from an evaluation whose ``headline[source][method]`` says which ratios hold dense (``ratios``)."""
    rows = []
    device = device_of(evaluation)
    for source, methods in sorted(evaluation["headline"].items()):
        h = (methods or {}).get("leank") or {}
        ratios = {round(float(r), 3): bool(ok) for r, ok in (h.get("ratios") or {}).items()}
        where = f"results/eval.json: headline.{source}.leank"
        if 0.7 not in ratios:
            rows.append(missing(claim, paper, where, "r=0.7 not evaluated"))
            continue
        held = ", ".join(f"r={r:g} {'held' if ok else 'not held'}" for r, ok in sorted(ratios.items()))
        setting = (
            f"our SmolLM2-135M masks, {source} text, held = needle log-likelihood and KL within the evaluation's "
            f"tolerance of dense (paired); {device}"
        )
        verdict = "yes" if ratios[0.7] else "no (r=0.7 does not hold dense)"
        rows.append(Row(claim, paper, held, setting, where, verdict))
    return rows


def accuracy_rows(root: Path, rules: Rules = RULES) -> list[Row]:
    """Accuracy at r=0.7 (SmolLM2, our learned mask) beside the dense model's."""
    claim, paper = "accuracy held", "no loss at r=0.7"
    evaluation = load_json(root / "results" / "eval.json") or {}
    headline = evaluation.get("headline") or {}
    if any("ratios" in ((m or {}).get("leank") or {}) for m in headline.values() if isinstance(m, dict)):
        return _held_rows(evaluation, claim, paper)
    summary = _summary(root)  # evaluations that scored answers: accuracy per task with a 95% interval
    device = device_of(evaluation)
    rows = []
    for task in ("passkey", "kv_retrieval"):
        source = f"results/eval_summary.csv: task={task}, method=leank vs dense"
        dense = [r for r in summary if r.get("task") == task and r.get("method") == "dense"]
        leank = [r for r in summary if r.get("task") == task and r.get("method") == "leank" and r.get("ratio") == 0.7]
        if not dense or not leank or leank[0].get("accuracy") is None:
            rows.append(missing(claim, paper, source, "file or entry absent"))
            continue
        d, lk = dense[0], leank[0]
        ours = (
            f"{100 * lk['accuracy']:.0f}% [{100 * lk['acc_low']:.0f}, {100 * lk['acc_high']:.0f}] vs dense "
            f"{100 * d['accuracy']:.0f}%"
        )
        held = lk["accuracy"] >= d["accuracy"] - rules.accuracy_tolerance
        verdict = "yes" if held else f"no (more than {100 * rules.accuracy_tolerance:.0f} points below dense)"
        setting = f"our SmolLM2-135M mask r=0.7, {task} ({int(lk['n'])} samples, 95% interval); {device}"
        rows.append(Row(claim, paper, ours, setting, source, verdict))
    return rows
