"""Byte models, result-file readers and figures for the decoding-speed chapter (notebook 05 and its appendix).

The notebooks call these so that their cells stay short; every number drawn here is read from the committed
result files of a checkout (``benchmarks/results/decode_profile.json``, ``decode_kernels.json``,
``end_to_end.json``; the checkout is found from the working directory, :func:`leank_ref.checkout.find_checkout`)
or computed from the mask.

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

import matplotlib.pyplot as plt
import torch

from leank_ref.checkout import find_checkout
from leank_ref.masks import top_count_mask
from leank_ref.memory import memory_formula
from leank_ref.windows import Windows

PAPER = {"attention kernel": 1.3, "decoding": 1.45}  # Zhang et al. (EMNLP 2025), abstract and section 5
E2E_MODES = {
    "dense_eager": ("dense, eager (SDPA flash)", "#9e9e9e"),
    "dense_graph": ("dense, CUDA graph (StaticCache)", "#424242"),
    "dense_triton_graph": ("dense, CUDA graph (our split-KV kernel)", "#1565c0"),
    "ones_eager": ("LeanK all-ones mask, eager", "#ffcc80"),
    "ones_graph": ("LeanK all-ones mask, CUDA graph", "#ef6c00"),
    "leank_eager": ("LeanK, eager", "#a5d6a7"),
    "leank_graph": ("LeanK, CUDA graph", "#2e7d32"),
}


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


# ---------------------------------------------------------------------------------------------
# Byte models
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Lesson figures
# ---------------------------------------------------------------------------------------------
def roofline_figure(peak_flops: float, peak_bw: float, attention_intensity: float, gpu: str):
    """The classic roofline with decode attention and the decode linear layers at a few batch sizes."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = torch.logspace(-0.5, 3.5, 200)
    ax.loglog(x, torch.minimum(torch.full_like(x, peak_flops), x * peak_bw) / 1e12, color="k", lw=1.5)
    ax.axvline(peak_flops / peak_bw, color="gray", ls=":", lw=1)
    points = {"decode attention (any B)": attention_intensity, **{f"linear layers, B={b}": b for b in (1, 8, 32, 256)}}
    for label, intensity in points.items():
        color = "tab:red" if "attention" in label else "tab:blue"
        y = min(peak_flops, intensity * peak_bw) / 1e12
        ax.plot(intensity, y, "o", color=color)
        offset = (6, -10) if "attention" in label else (6, 4)
        ax.annotate(label, (intensity, y), textcoords="offset points", xytext=offset, fontsize=8, color=color)
    ax.set(
        xlabel="arithmetic intensity (FLOP per byte read)",
        ylabel="attainable TFLOP/s",
        title=f"{gpu} roofline (data-sheet peaks): decode attention stays on the memory slope",
    )
    return fig


def byte_roofline_figure(contexts: list[int], ratios: list[float], asymptote: float, window: int):
    """Dense bytes over LeanK bytes of a decoding step's attention, against the context length."""
    fig, ax = plt.subplots(figsize=(7, 3.3))
    ax.semilogx(contexts, ratios, marker="o", ms=4, color="tab:green", label="byte roofline, released Llama mask")
    ax.axhline(asymptote, color="tab:green", ls=":", lw=1, label=f"N → ∞: {asymptote:.2f}x")
    ax.axvline(window, color="gray", ls="--", lw=1, label=f"sink + recent = {window} tokens")
    ax.set(
        xlabel="context N (tokens)",
        ylabel="dense bytes / LeanK bytes",
        ylim=(0.95, 1.9),
        title="Largest possible LeanK decode speed-up from bytes alone",
    )
    ax.legend(loc="lower right", fontsize=8)
    return fig


def cache_layout_figure(layer_mask: torch.Tensor, layer: int, heads: list[int], tokens: int, sink: int, recent: int):
    """What the LeanK cache stores for a few KV heads of one layer: K channels and V over the tokens."""
    d = layer_mask.shape[1]
    positions = torch.arange(tokens)
    middle = (positions >= sink) & (positions < tokens - recent)
    fig, axes = plt.subplots(2, len(heads), figsize=(3 * len(heads), 4.2), sharex=True, sharey=True, squeeze=False)
    for col, h in enumerate(heads):
        kept = layer_mask[h].bool()
        k_stored = (~middle[None, :] | kept[:, None]).float()  # [D, N]: full window every channel, middle the kept
        v_stored = (~middle[None, :] | bool(kept.any())).float().expand(d, tokens)
        for row, (stored, name) in enumerate(((k_stored, "K"), (v_stored, "V"))):
            ax = axes[row, col]
            ax.imshow(
                stored, aspect="auto", cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest", extent=(0, tokens, d, 0)
            )
            ax.grid(False)
            if row == 0:
                ax.set_title(f"KV head {h}: c = {int(kept.sum())}", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{name} channel")
            if row == 1:
                ax.set_xlabel("token")
    fig.suptitle(f"What the LeanK cache stores: layer {layer} of the Llama-3.1-8B mask (sink {sink}, recent {recent})")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Tables read from the result files
# ---------------------------------------------------------------------------------------------
def kernel_rows(profile: dict, kernels: dict | None = None) -> list[dict]:
    """Per shape: best SDPA and LeanK, as kernel time (graph; per-layer flush timing) and eager step (host in)."""
    per_layer = {(r["B"], r["N"]): r for r in (kernels or {}).get("results", [])}
    rows = []
    for r in profile["results"]:
        best_g, best_e = r["best_sdpa_graph"], r["best_sdpa_eager"]
        row = {
            "shape": f"B{r['B']} N{r['N'] // 1024}K",
            "B": r["B"],
            "N": r["N"],
            "sdpa_graph_ms": r["graph"][best_g]["median_ms"],
            "leank_graph_ms": r["graph"]["leank_triton"]["median_ms"],
            "kernel_speedup_graph": r["kernel_speedup_graph"],
            "sdpa_eager_ms": r["eager"][best_e]["median_ms"],
            "leank_eager_ms": r["eager"]["leank_triton"]["median_ms"],
            "kernel_speedup_eager": r["kernel_speedup_eager"],
            "sdpa_host_us_per_layer": r["eager"][best_e]["host_enqueue_us_per_layer"],
            "leank_host_us_per_layer": r["eager"]["leank_triton"]["host_enqueue_us_per_layer"],
            "best_sdpa": best_g.removeprefix("sdpa_"),
        }
        k = per_layer.get((r["B"], r["N"]))
        if k is not None:
            row["per_layer_kernel_speedup"] = k["methods"]["leank_triton"].get("speedup_vs_best_sdpa")
            row["byte_roofline"] = k["byte_roofline_speedup"]
            row["leank_share_of_copy_bw"] = k["methods"]["leank_triton"].get("share_of_copy_bw")
        rows.append(row)
    return rows


def format_rows(rows: list[dict], columns: dict[str, str]) -> str:
    """A plain-text table of ``rows`` with ``columns`` {key: header}; floats get 2-3 significant decimals."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
        return "-" if v is None else str(v)

    table = [list(columns.values())] + [[cell(r.get(k)) for k in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table)


def end_to_end_rows(e2e: dict) -> list[dict]:
    """Per shape: ms per step of every mode, tokens/s of the best dense and best LeanK, and the headline ratios."""
    rows = []
    for r in e2e["decode"]:
        name = f"B{r['batch']}_N{r['context'] // 1024}K"
        head = e2e.get("headline", {}).get(name, {})
        row = {"shape": name.replace("_", " ")}
        for mode in E2E_MODES:
            row[mode] = r.get(mode, {}).get("step_ms")
        row["speedup_vs_best_dense"] = head.get("speedup_vs_best_dense")
        row["speedup_vs_all_ones"] = head.get("speedup_vs_all_ones")
        row["byte_roofline"] = head.get("byte_roofline_speedup")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Result figures
# ---------------------------------------------------------------------------------------------
def kernel_figure(rows: list[dict], source: str):
    """LeanK over the best SDPA backend per shape: kernel time (graph) and eager step, with the byte roofline."""
    fig, (ax_t, ax_h) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    x = torch.arange(len(rows)).float()
    for key, style, label in (
        ("kernel_speedup_graph", dict(marker="o", ms=8), "kernel time (CUDA graph of 32 layers)"),
        ("kernel_speedup_eager", dict(marker="s", ms=7, mfc="none"), "eager step (host work included)"),
    ):
        ax_t.plot(x, [r[key] for r in rows], ls="none", color="tab:green", label=label, **style)
    roof = [r.get("byte_roofline", float("nan")) for r in rows]
    ax_t.plot(x, roof, "k_", ms=18, mew=2, label="byte roofline")
    ax_t.axhline(1.0, color="tab:gray", lw=1, label="best SDPA backend")
    ax_t.axhline(
        PAPER["attention kernel"],
        color="tab:purple",
        ls=":",
        lw=1.2,
        label=f"paper's kernel speed-up ({PAPER['attention kernel']}x)",
    )
    ax_t.set_xticks(x, [r["shape"] for r in rows])
    ax_t.set(ylabel="LeanK speed-up over the best SDPA", title="Attention of one decoding step (32 layers)")
    ax_t.legend(fontsize=7, loc="upper right")
    w = 0.38
    ax_h.bar(x - w / 2, [r["sdpa_host_us_per_layer"] for r in rows], w, color="tab:gray", label="best SDPA")
    ax_h.bar(x + w / 2, [r["leank_host_us_per_layer"] for r in rows], w, color="tab:green", label="LeanK")
    ax_h.set_xticks(x, [r["shape"] for r in rows], fontsize=8)
    ax_h.set(ylabel="µs of host time per layer", title="Host enqueue per layer (eager)")
    ax_h.legend(fontsize=7)
    fig.suptitle(f"Measured on one {source}", fontsize=9)
    fig.tight_layout()
    return fig


def end_to_end_figure(e2e: dict):
    """Whole-model decoding steps: ms per step of every mode per shape, the all-ones control beside LeanK.

    Each shape's label carries the two headline ratios: LeanK's best mode over the best dense mode, and the real
    mask over the all-ones mask in that mode (the part of the speed-up that pruning itself buys).
    """
    rows = end_to_end_rows(e2e)
    modes = list(E2E_MODES)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(rows)), 4.4))
    width = 0.8 / len(modes)
    x = torch.arange(len(rows)).float()
    for i, mode in enumerate(modes):
        label, color = E2E_MODES[mode]
        values = [r[mode] if r[mode] is not None else float("nan") for r in rows]
        ax.bar(x + (i - (len(modes) - 1) / 2) * width, values, width, color=color, label=label)
    labels = []
    for r in rows:
        vs_dense, vs_ones = r["speedup_vs_best_dense"], r["speedup_vs_all_ones"]
        extra = ""
        if vs_dense is not None:
            extra += f"\nvs best dense {vs_dense:.2f}x"
        if vs_ones is not None:
            extra += f"\nvs all-ones {vs_ones:.2f}x"
        labels.append(r["shape"] + extra)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set(ylabel="ms per decoding step (log)", title="Llama-3.1-8B (random bf16 weights) decoding, whole model")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.suptitle(f"Measured on one {result_source(e2e)}", fontsize=9)
    fig.tight_layout()
    return fig


def decode_kernels_figure(bench: dict):
    """Per-layer kernel times summed over 32 layers (decode_kernels.json): time, speed-up, bandwidth share."""
    rows = bench["results"]
    labels = [f"B{r['B']}\nN{r['N'] // 1024}K" for r in rows]
    x = torch.arange(len(rows)).float()
    series = {
        "best SDPA": ("tab:gray", lambda r: r["methods"][r["best_sdpa"]]),
        "dense Triton": ("tab:blue", lambda r: r["methods"]["dense_triton"]),
        "LeanK Triton": ("tab:green", lambda r: r["methods"]["leank_triton"]),
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    width = 0.8 / len(series)
    for i, (name, (color, get)) in enumerate(series.items()):
        axes[0].bar(
            x + (i - 1) * width, [get(r).get("total_ms", float("nan")) for r in rows], width, color=color, label=name
        )
    axes[0].set_yscale("log")
    axes[0].set(ylabel="ms per step (32 layers, kernel time)", title="Attention kernel time, one decoding step")
    for name in ("dense Triton", "LeanK Triton"):
        color, get = series[name]
        axes[1].plot(
            x, [get(r).get("speedup_vs_best_sdpa", float("nan")) for r in rows], "o", ms=7, color=color, label=name
        )
    axes[1].plot(x, [r["byte_roofline_speedup"] for r in rows], "k_", ms=18, mew=2, label="byte roofline (LeanK)")
    axes[1].axhline(1.0, color="tab:gray", lw=1, label="best SDPA")
    axes[1].axhline(PAPER["attention kernel"], color="tab:purple", ls=":", lw=1.2, label="paper's kernel speed-up")
    axes[1].set(ylabel="speed-up over the best SDPA backend", title="Speed-up")
    for name, (color, get) in series.items():
        axes[2].plot(
            x, [get(r).get("share_of_copy_bw", float("nan")) for r in rows], "o", ms=7, color=color, label=name
        )
    axes[2].set(
        ylabel="achieved bandwidth / copy bandwidth",
        ylim=(0, 1.1),
        title=f"Bandwidth (copy: {bench['copy_bandwidth']['GBps']:.0f} GB/s)",
    )
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.legend(fontsize=7)
    source = result_source(bench)
    fig.suptitle(
        f"Per-layer kernel timing after an L2 flush, summed over 32 layers; measured on one {source}", fontsize=9
    )
    fig.tight_layout()
    return fig


def decode_profile_figure(profile: dict, ideal_ms: dict[tuple[int, int], float] | None = None):
    """Whole 32-layer attention steps per shape, eager and as CUDA graphs, for every method of decode_profile.json."""
    names = {
        "sdpa_flash": "SDPA flash",
        "sdpa_efficient": "SDPA efficient",
        "sdpa_cudnn": "SDPA cuDNN",
        "dense_triton": "dense Triton",
        "leank_triton": "LeanK",
        "leank_full_part_only": "LeanK full window only",
    }
    results = profile["results"]
    cols = 3
    rows_n = -(-len(results) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, r in zip(axes.flat, results):
        keys = [k for k in names if k in r["eager"]]
        y = torch.arange(len(keys)).float()
        eager = [r["eager"][k].get("median_ms", float("nan")) for k in keys]
        graph = [r["graph"].get(k, {}).get("median_ms", float("nan")) for k in keys]
        ax.barh(y + 0.2, eager, 0.4, color="tab:gray", label="eager")
        ax.barh(y - 0.2, graph, 0.4, color="tab:green", label="CUDA graph")
        if ideal_ms and (r["B"], r["N"]) in ideal_ms:
            ax.axvline(ideal_ms[(r["B"], r["N"])], color="tab:green", ls=":", lw=1, label="LeanK bytes / copy bw")
        ax.set_yticks(y, [names[k] for k in keys], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="ms per 32-layer step", title=f"B{r['B']} N{r['N'] // 1024}K")
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(results) :]:
        ax.set_visible(False)
    fig.suptitle(f"Whole attention steps, eager vs CUDA graph; measured on one {result_source(profile)}", fontsize=9)
    fig.tight_layout()
    return fig
