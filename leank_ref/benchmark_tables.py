"""Result-file readers, byte models and tables for the decoding-speed chapter (notebook 05 and its appendix).

Every number here is read from the committed result files of a checkout (``benchmarks/results/*.json``; the
checkout is found from the working directory, :func:`leank_ref.checkout.find_checkout`) or computed from the mask.
Verdicts against the paper's numbers use the scorecard's rule (:data:`leank_ref.scorecard.rules.RULES`), so a
shape is judged the same way here, in the README and in chapter 08.

Which number is which:

* **kernel time**: the GPU's own time for the attention kernels of one decoding step (32 layers), host work
  excluded (``decode_kernels.json``: each layer's call timed alone after an L2 flush; ``decode_profile.json``
  ``graph``: the whole step captured once as a CUDA graph and replayed);
* **eager step**: the same 32 layers launched from Python, as ``generate`` launches them: host work included
  wherever the GPU cannot hide it (``decode_profile.json`` ``eager``);
* **end to end**: a whole model decoding step (weights, cache maintenance, attention, sampling), eager or as a
  CUDA graph (``end_to_end.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leank_ref.checkout import find_checkout
from leank_ref.masks import top_count_mask
from leank_ref.memory import memory_formula
from leank_ref.scorecard.rules import RULES, Rules
from leank_ref.windows import Windows

# The paper's two speed numbers. The arXiv v1 abstract (2508.02215v1) gives 1.3x "for attention computation" from
# the custom decoding kernel; the EMNLP 2025 abstract gives 1.45x "decoding speedup". Neither abstract names the
# batch, the context length or the baseline.
PAPER = {"attention kernel": 1.3, "decoding": 1.45}
E2E_MODES = {
    "dense_eager": ("dense, eager (SDPA flash)", "#9e9e9e"),
    "dense_graph": ("dense, CUDA graph (StaticCache)", "#424242"),
    "dense_triton_graph": ("dense, CUDA graph (our split-KV kernel)", "#1565c0"),
    "sdpa_fixed_cudnn_graph": ("fixed-length SDPA cuDNN, CUDA graph (stand-in)", "#7e57c2"),
    "sdpa_fixed_flash_graph": ("fixed-length SDPA flash, CUDA graph (stand-in)", "#b39ddb"),
    "ones_eager": ("LeanK all-ones mask, eager", "#ffcc80"),
    "ones_graph": ("LeanK all-ones mask, CUDA graph", "#ef6c00"),
    "leank_eager": ("LeanK, eager", "#a5d6a7"),
    "leank_graph": ("LeanK, CUDA graph", "#2e7d32"),
}


NOT_MEASURED = "not measured"


def load_result(name: str, root: str | Path | None = None) -> dict | None:
    """A committed result file ``benchmarks/results/<name>.json`` of the checkout ``root`` (default: the one at or
    above the working directory); ``None`` when it is not there yet."""
    path = (find_checkout() if root is None else Path(root)) / "benchmarks" / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def result_source(result: dict) -> str:
    """One line: device, date, commit and versions a result file records."""
    prov = result.get("provenance", result)
    commit = str(prov.get("git_commit", "?"))[:7]
    return f"{prov.get('device', '?')}, {str(prov.get('date', '?'))[:10]}, commit {commit}, torch {prov.get('torch')}"


def shape_name(batch: int, tokens: int) -> str:
    """``B8 N32K``."""
    return f"B{batch} N{tokens // 1024}K"


def format_rows(rows: list[dict], columns: dict[str, str]) -> str:
    """A plain-text table of ``rows`` with ``columns`` {key: header}; floats get 2-3 significant decimals."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
        return NOT_MEASURED if v is None else str(v)

    table = [list(columns.values())] + [[cell(r.get(k)) for k in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table)


def planned_shapes(result: dict) -> list[tuple[int, int]]:
    """The (batch, tokens) shapes the runs of a result file were asked for (``--shapes BxN`` of each recorded
    ``invocations`` command, by context then batch), measured or not; the measured ones when it records no command."""
    planned = []
    for run in result.get("invocations", []):
        words = run.get("command", "").split()
        if "--shapes" in words:
            for word in words[words.index("--shapes") + 1 :]:
                if word.startswith("--"):
                    break
                shape = tuple(int(x) for x in word.split("x"))
                if shape not in planned:
                    planned.append(shape)
    measured = [(r["B"], r["N"]) for r in result.get("results", [])]
    shapes = planned + [s for s in measured if s not in planned] if planned else measured
    return sorted(shapes, key=lambda s: (s[1], s[0]))  # by context, then batch


def unmeasured_shapes(result: dict) -> list[str]:
    """The shapes a result file's runs were asked for that have no result in it (e.g. a run cut off by a time
    limit), as ``B1 N32K``."""
    measured = {(r["B"], r["N"]) for r in result.get("results", [])}
    return [shape_name(b, n) for b, n in planned_shapes(result) if (b, n) not in measured]


def median_ms(section: dict, method: str) -> float | None:
    """``section[method]["median_ms"]``, or ``None`` when that method has no time there."""
    return section.get(method, {}).get("median_ms")


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def attention_step_bytes(
    counts: torch.Tensor, batch: int, tokens: int, num_heads: int, head_dim: int, sink: int, recent: int
) -> tuple[int, int]:
    """Bytes (bf16) one decoding step's attention must move over all layers: (dense, LeanK); counts [L, G].

    Both read the query and write the output, and read the cache: dense every token's K and V, LeanK what its
    cache holds (:func:`leank_ref.memory.memory_formula`: the full window at full width and, per middle token,
    ``c + D`` values per KV head that keeps ``c > 0`` channels, none for ``c = 0``). The benchmarks lay every token
    past ``sink + recent`` out in the middle, i.e. block 1.
    """
    layers, kv_heads = counts.shape
    q_and_out = 2 * 2 * batch * num_heads * head_dim * layers  # bytes: the query in, the output out, per layer
    mask = top_count_mask(torch.zeros(layers, kv_heads, head_dim), counts)  # [L, G, D] with these counts
    cache = memory_formula(mask, tokens, Windows(sink, recent, 1), batch=batch, bytes_per_value=2)
    return q_and_out + cache.dense_total, q_and_out + cache.total


def kernel_rows(profile: dict, counts: torch.Tensor, windows: Windows, rules: Rules = RULES) -> list[dict]:
    """Per shape of ``decode_profile.json``: LeanK's 32-layer attention step over the best SDPA backend, as kernel
    time (graph) and eager step, the byte roofline from the mask, the all-ones control against the best dense kernel
    (SDPA or our dense Triton kernel), and the scorecard's verdict on the graph number. A shape the runs were asked
    for but did not reach gets a row whose numbers are ``None`` (printed "not measured")."""
    heads, head_dim = profile["shapes"]["H"], profile["shapes"]["D"]
    by_shape = {(r["B"], r["N"]): r for r in profile.get("results", [])}
    rows = []
    for batch, tokens in planned_shapes(profile):
        dense_b, leank_b = attention_step_bytes(counts, batch, tokens, heads, head_dim, windows.sink, windows.recent)
        row = {"shape": shape_name(batch, tokens), "B": batch, "N": tokens, "byte_roofline": dense_b / leank_b}
        r = by_shape.get((batch, tokens))
        if r is None:
            rows.append(row | {"verdict": NOT_MEASURED})
            continue
        graph, eager = r["graph"], r["eager"]
        best_g, best_e = r.get("best_sdpa_graph"), r.get("best_sdpa_eager")
        speedup = r.get("kernel_speedup_graph")
        dense_kernels = {m: median_ms(graph, m) for m in (best_g, "dense_triton") if median_ms(graph, m) is not None}
        best_dense = min(dense_kernels, key=dense_kernels.get) if dense_kernels else None
        ones = median_ms(graph, "leank_all_ones")  # the same decoder keeping every channel: dense bytes
        row |= {
            "best_sdpa": best_g.removeprefix("sdpa_") if best_g else None,
            "sdpa_graph_ms": median_ms(graph, best_g) if best_g else None,
            "leank_graph_ms": median_ms(graph, "leank_triton"),
            "kernel_speedup_graph": speedup,
            "share_of_roofline": None if speedup is None else speedup * leank_b / dense_b,
            "kernel_speedup_eager": r.get("kernel_speedup_eager"),
            "sdpa_host_us_per_layer": eager.get(best_e, {}).get("host_enqueue_us_per_layer"),
            "leank_host_us_per_layer": eager.get("leank_triton", {}).get("host_enqueue_us_per_layer"),
            "verdict": NOT_MEASURED if speedup is None else rules.speed(speedup, PAPER["attention kernel"]),
            "best_dense_kernel": best_dense,
            "best_dense_ms": dense_kernels.get(best_dense),
            "ones_graph_ms": ones,
            "ones_over_best_sdpa": _ratio(median_ms(graph, best_g) if best_g else None, ones),
            "ones_slower_than_best_dense": None if best_dense is None else _ratio(ones, dense_kernels[best_dense]),
            "leank_over_ones": _ratio(ones, median_ms(graph, "leank_triton")),
        }
        if row["ones_slower_than_best_dense"] is not None:
            row["ones_slower_than_best_dense"] -= 1.0
        rows.append(row)
    return rows


def bandwidth_rows(profile: dict, counts: torch.Tensor, windows: Windows, copy_gbps: float) -> list[dict]:
    """Per shape (graph timing): bytes per second of LeanK and of the best SDPA against a copy ceiling, and what the
    full window alone costs per layer against the time its own bytes take at that ceiling. Shapes the runs did not
    reach, and methods with no time, give ``None`` (printed "not measured")."""
    heads, head_dim = profile["shapes"]["H"], profile["shapes"]["D"]
    by_shape = {(r["B"], r["N"]): r for r in profile.get("results", [])}
    window = windows.sink + windows.recent
    rows = []
    for batch, tokens in planned_shapes(profile):
        row = {"shape": shape_name(batch, tokens)}
        r = by_shape.get((batch, tokens))
        if r is None:
            rows.append(row)
            continue
        layers, graph = r["layers"], r["graph"]
        dense_b, leank_b = attention_step_bytes(counts, batch, tokens, heads, head_dim, windows.sink, windows.recent)
        full_b = attention_step_bytes(counts, batch, window, heads, head_dim, windows.sink, windows.recent)[0]
        leank_ms = median_ms(graph, "leank_triton")
        sdpa_ms = median_ms(graph, r.get("best_sdpa_graph", ""))
        full_ms = median_ms(graph, "leank_full_part_only")
        leank_gbps = _ratio(leank_b / 1e6, leank_ms)
        sdpa_gbps = _ratio(dense_b / 1e6, sdpa_ms)
        row |= {
            "leank_GBps": leank_gbps,
            "leank_share": _ratio(leank_gbps, copy_gbps),
            "sdpa_GBps": sdpa_gbps,
            "sdpa_share": _ratio(sdpa_gbps, copy_gbps),
            "full_us_per_layer": None if full_ms is None else full_ms / layers * 1e3,
            "full_bytes_us_per_layer": full_b / layers / (copy_gbps * 1e3),
            "full_share_of_step": _ratio(full_ms, leank_ms),
        }
        rows.append(row)
    return rows


def profile_rows(profile: dict) -> tuple[list[dict], dict[str, str]]:
    """Per shape the runs were asked for: every method's graph and eager ms in one row (``None`` where it has no
    time, and for a shape not reached); and the methods that have no time at any shape, with the reason the file
    gives (e.g. SDPA's memory-efficient backend: no kernel)."""
    results = {(r["B"], r["N"]): r for r in profile.get("results", [])}
    methods = list(dict.fromkeys(m for r in results.values() for m in (*r["eager"], *r["graph"])))
    timed = {m for r in results.values() for m in methods if median_ms(r["eager"], m) or median_ms(r["graph"], m)}
    absent = {}
    for m in methods:
        if m not in timed:
            why = next((r["eager"].get(m, {}).get("error") for r in results.values() if m in r["eager"]), None)
            absent[m] = why or NOT_MEASURED
    rows = []
    for batch, tokens in planned_shapes(profile):
        row, r = {"shape": shape_name(batch, tokens)}, results.get((batch, tokens))
        for m in (m for m in methods if m in timed):
            row[f"{m}_graph"] = None if r is None else median_ms(r["graph"], m)
            row[f"{m}_eager"] = None if r is None else median_ms(r["eager"], m)
        rows.append(row)
    return rows, absent


def sweep_rows(sweep: dict) -> list[dict]:
    """One row per (mask, shape, launch plan) of ``decode_sweep.json``: ms, speed-up over the best SDPA, GB/s."""
    copy = sweep["copy_bandwidth"]["GBps"]
    rows = []
    for r in sweep["results"]:
        for p in r["plans"]:
            rows.append(
                {
                    "mask": r["model"],
                    "shape": shape_name(r["B"], r["N"]),
                    "programs_per_sm": p["programs_per_sm"],
                    "grid": p.get("grid_layer0"),
                    "leank_ms": p["leank_ms"],
                    "speedup": p["speedup_vs_best_sdpa"],
                    "roofline": r["byte_roofline"],
                    "GBps": p["leank_GBps"],
                    "share_of_copy": p["leank_GBps"] / copy,
                }
            )
    return rows


def end_to_end_rows(e2e: dict) -> list[dict]:
    """Per shape: ms per step of every mode the file has, and the headline ratios."""
    rows = []
    for r in e2e["decode"]:
        name = f"B{r['batch']}_N{r['context'] // 1024}K"
        head = e2e.get("headline", {}).get(name, {})
        row = {"shape": name.replace("_", " ")}
        for mode in E2E_MODES:
            entry = r.get(mode) if isinstance(r.get(mode), dict) else {}
            row[mode] = entry.get("step_ms")
            row[f"{mode}_peak"] = entry.get("peak_gib")
        for key in ("speedup_vs_best_dense", "speedup_vs_all_ones", "speedup_vs_fixed_sdpa_graph"):
            row[key] = head.get(key)
        row["best_dense_mode"] = head.get("best_dense_mode")
        row["byte_roofline"] = head.get("byte_roofline_speedup")
        rows.append(row)
    return rows


def modes_in(e2e: dict) -> list[str]:
    """The modes of ``E2E_MODES`` that ``end_to_end.json`` measured at some shape."""
    return [m for m in E2E_MODES if any("step_ms" in (r.get(m) or {}) for r in e2e["decode"])]
