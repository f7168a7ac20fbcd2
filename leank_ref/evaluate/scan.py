"""Where does the dense model succeed? Greedy passkey accuracy by length, run before the grid to choose its lengths.

Greedy accuracy (task ``passkey_greedy``) runs only at lengths where dense reaches 0.8 here (:func:`accuracy_lengths`).
The scan's samples (seeds 13_000+) are disjoint from the evaluation's.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leank_ref.attention import capture_prefill
from leank_ref.data import make_example
from leank_ref.evaluate.grid import SEED_BASE, EvalGrid
from leank_ref.evaluate.sample import generate_rows
from leank_ref.models import model_facts
from leank_ref.stats import summarize

SCAN_FILE = "passkey_dense_scan.json"
SCAN_LENGTHS = (256, 512, 768, 1024, 1536, 2048)


def accuracy_lengths(scan_path: str | Path, threshold: float = 0.8) -> tuple[int, ...]:
    """Lengths where dense passkey accuracy reached ``threshold`` in the dense scan at ``scan_path``.

    FileNotFoundError names the command that writes the scan."""
    path = Path(scan_path)
    if not path.exists():
        raise FileNotFoundError(
            f"no dense scan at {path}: run python -m leank_ref evaluate --scan --out {path.parent} first."
        )
    summary = json.loads(path.read_text())["summary"]
    return tuple(sorted(s["length"] for s in summary if s["accuracy"] >= threshold))


def dense_passkey_scan(
    model, tokenizer, lengths: tuple[int, ...], samples: int, grid: EvalGrid | None = None, progress: bool = True
) -> list[dict]:
    """Dense passkey accuracy per length (depths uniform at random, seeds 13_000+): one row per sample."""
    grid = grid or EvalGrid()  # only its max_new_tokens and windows matter: the mask keeps every channel
    shape = model_facts(model).mask_shape
    rows = []
    for length in lengths:
        for i in tqdm(range(samples), desc=f"dense passkey {length}", disable=not progress):
            seed = SEED_BASE["scan"] + i
            depth = random.Random(f"scan-{seed}-{length}").random()
            ex = make_example("passkey", tokenizer, length, seed=seed, depth=depth)
            capture, last_logits = capture_prefill(model, ex.context_ids, values=True)
            first = int(last_logits[0].argmax())
            ones = torch.ones(1, *shape)  # dense: every channel kept
            ids = generate_rows(model, capture, first, ones, grid, tokenizer, ex.answer, grid.max_new_tokens)[0]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            rows.append(
                {
                    "task": "passkey",
                    "method": "dense",
                    "ratio": 0.0,
                    "budget": "none",
                    "length": length,
                    "depth": depth,
                    "seed": seed,
                    "correct": int(ex.answer in text),
                }
            )
    return rows


def run_scan(
    model, tokenizer, lengths: tuple[int, ...], samples: int, out_dir: str | Path, name: str, progress: bool = True
) -> dict:
    """Run :func:`dense_passkey_scan`, write its summary to ``<out_dir>/<name>.json`` and return that report."""
    from leank_ref.provenance import provenance

    start = time.perf_counter()
    rows = dense_passkey_scan(model, tokenizer, lengths, samples, progress=progress)
    report = {
        "summary": summarize(rows, ("task", "method", "length")),
        "samples_per_length": samples,
        "runtime_s": time.perf_counter() - start,
        "provenance": provenance(next(model.parameters()).device),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    return report
