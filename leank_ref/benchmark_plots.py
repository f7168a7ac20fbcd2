"""Figures for the decoding-speed chapter (notebook 05 and its appendix).

Every number drawn here comes from a committed result file, read through :mod:`leank_ref.benchmark_tables`
(which also holds the byte model and the tables), or from the mask.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from leank_ref.benchmark_tables import E2E_MODES, PAPER, end_to_end_rows, modes_in, planned_shapes, result_source
from leank_ref.scorecard.rules import SPEED_TOLERANCE


def _paper_kernel_lines(ax) -> None:
    """The paper's attention-kernel speed-up and the line a speed-up must reach to reproduce it."""
    paper = PAPER["attention kernel"]
    ax.axhline(paper, color="tab:purple", ls=":", lw=1.2, label=f"paper's kernel speed-up ({paper}x)")
    ax.axhline(SPEED_TOLERANCE * paper, color="tab:purple", ls="--", lw=0.8, alpha=0.7,
               label=f"reproduces from {SPEED_TOLERANCE * paper:.3f}x ({SPEED_TOLERANCE:.0%} of it)")  # fmt: skip


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
# Result figures
# ---------------------------------------------------------------------------------------------
def _values(rows: list[dict], key: str) -> list[float]:
    """``row[key]`` per row, NaN (nothing drawn) where the value is missing or ``None``."""
    return [float("nan") if r.get(key) is None else r[key] for r in rows]


def kernel_figure(rows: list[dict], source: str):
    """LeanK over the best SDPA backend per shape: kernel time (graph) and eager step, with the byte roofline."""
    fig, (ax_t, ax_h) = plt.subplots(
        1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]}, layout="constrained"
    )
    x = torch.arange(len(rows)).float()
    for key, style, label in (
        ("kernel_speedup_graph", dict(marker="o", ms=8), "kernel time (CUDA graph of 32 layers)"),
        ("kernel_speedup_eager", dict(marker="s", ms=7, mfc="none"), "eager step (host work included)"),
    ):
        ax_t.plot(x, _values(rows, key), ls="none", color="tab:green", label=label, **style)
    if any(r.get("ones_over_best_sdpa") is not None for r in rows):
        ones = _values(rows, "ones_over_best_sdpa")
        ax_t.plot(x, ones, "d", ms=6, color="tab:orange", label="all-ones control (graph)")
    ax_t.plot(x, _values(rows, "byte_roofline"), "k_", ms=18, mew=2, label="byte roofline")
    ax_t.axhline(1.0, color="tab:gray", lw=1, label="best SDPA backend")
    _paper_kernel_lines(ax_t)
    labels = [r["shape"] + ("\nnot measured" if r.get("kernel_speedup_graph") is None else "") for r in rows]
    ax_t.set_xticks(x, labels)
    ax_t.set(ylabel="LeanK speed-up over the best SDPA", title="Attention of one decoding step (32 layers)")
    w = 0.38
    ax_h.bar(x - w / 2, _values(rows, "sdpa_host_us_per_layer"), w, color="tab:gray", label="best SDPA")
    ax_h.bar(x + w / 2, _values(rows, "leank_host_us_per_layer"), w, color="tab:green", label="LeanK")
    ax_h.set_xticks(x, labels, fontsize=8)
    ax_h.set(ylabel="µs of host time per layer", title="Host enqueue per layer (eager)")
    ax_h.legend(fontsize=7)
    fig.legend(*ax_t.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(f"Measured on one {source}", fontsize=9)
    return fig


def end_to_end_figure(e2e: dict):
    """Whole-model decoding steps: ms per step of every measured mode per shape, the all-ones control beside LeanK.

    Each shape's label carries the two headline ratios: LeanK's best mode over the best real dense decoder, and
    the real mask over the all-ones mask in that mode (the part of the speed-up that pruning itself buys).
    """
    rows = end_to_end_rows(e2e)
    modes = modes_in(e2e)
    fig, ax = plt.subplots(figsize=(max(9, 2.3 * len(rows)), 5.0), layout="constrained")
    width = 0.8 / len(modes)
    x = torch.arange(len(rows)).float()
    for i, mode in enumerate(modes):
        label, color = E2E_MODES[mode]
        values = [r[mode] if r[mode] is not None else float("nan") for r in rows]
        ax.bar(x + (i - (len(modes) - 1) / 2) * width, values, width, color=color, label=label)
    labels = []
    for r in rows:
        extra = ""
        if r["speedup_vs_best_dense"] is not None:
            extra += f"\nvs best dense {r['speedup_vs_best_dense']:.2f}x"
        if r["speedup_vs_all_ones"] is not None:
            extra += f"\nvs all-ones {r['speedup_vs_all_ones']:.2f}x"
        labels.append(r["shape"] + extra)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set(ylabel="ms per decoding step (log)", title="Llama-3.1-8B (random bf16 weights) decoding, whole model")
    fig.legend(loc="outside lower center", ncols=3, fontsize=7)
    note = "" if e2e.get("complete", True) else f"\nincomplete run: {e2e.get('note', 'some shapes not measured')}"
    fig.suptitle(f"Measured on one {result_source(e2e)}{note}", fontsize=9)
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
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    width = 0.8 / len(series)
    for i, (name, (color, get)) in enumerate(series.items()):
        axes[0].bar(
            x + (i - 1) * width, [get(r).get("total_ms", float("nan")) for r in rows], width, color=color, label=name
        )
    axes[0].set_yscale("log")
    axes[0].set(ylabel="ms per step (32 layers, kernel time)", title="Attention kernel time, one decoding step")
    for name in ("dense Triton", "LeanK Triton"):
        color, get = series[name]
        axes[1].plot(x, [get(r).get("speedup_vs_best_sdpa", float("nan")) for r in rows], "o", ms=7, color=color)
    axes[1].plot(x, [r["byte_roofline_speedup"] for r in rows], "k_", ms=18, mew=2, label="byte roofline (LeanK)")
    axes[1].axhline(1.0, color="tab:gray", lw=1)
    _paper_kernel_lines(axes[1])
    axes[1].set(ylabel="speed-up over the best SDPA backend", title="Speed-up")
    for color, get in series.values():
        axes[2].plot(x, [get(r).get("share_of_copy_bw", float("nan")) for r in rows], "o", ms=7, color=color)
    axes[2].set(
        ylabel="achieved bandwidth / copy bandwidth",
        ylim=(0, 1.15),
        title=f"Bandwidth (copy: {bench['copy_bandwidth']['GBps']:.0f} GB/s)",
    )
    for ax in axes:
        ax.set_xticks(x, labels)
    handles, names = axes[0].get_legend_handles_labels()
    more, more_names = axes[1].get_legend_handles_labels()
    fig.legend(handles + more, names + more_names, loc="outside lower center", ncols=5, fontsize=8)
    fig.suptitle(
        f"Per-layer kernel timing after an L2 flush, summed over 32 layers; measured on one {result_source(bench)}",
        fontsize=9,
    )
    return fig


PROFILE_NAMES = {
    "sdpa_flash": "SDPA flash",
    "sdpa_efficient": "SDPA efficient",
    "sdpa_cudnn": "SDPA cuDNN",
    "dense_triton": "dense Triton",
    "leank_all_ones": "LeanK all-ones",
    "leank_triton": "LeanK",
    "leank_full_part_only": "LeanK full window only",
}


def decode_profile_figure(profile: dict, ideal_ms: dict[tuple[int, int], float] | None = None):
    """Whole 32-layer attention steps per shape, eager and as CUDA graphs, for every method of decode_profile.json
    that has a time; a method with none (SDPA's memory-efficient backend has no kernel for these shapes) is named
    under the figure with the file's reason."""
    by_shape = {(r["B"], r["N"]): r for r in profile["results"]}
    shapes = planned_shapes(profile)
    cols = 3
    rows_n = -(-len(shapes) // cols)
    fig, axes = plt.subplots(
        rows_n, cols, figsize=(5.2 * cols, 3.2 * rows_n + 0.6), squeeze=False, layout="constrained"
    )
    absent = {}
    for ax, (batch, tokens) in zip(axes.flat, shapes):
        r = by_shape.get((batch, tokens))
        if r is None:  # asked for, not reached: say so instead of leaving the shape out
            ax.text(0.5, 0.5, "not measured\n(the run ended before this shape)", ha="center", va="center")
            ax.set(title=f"B{batch} N{tokens // 1024}K", xticks=[], yticks=[])
            continue
        keys = []
        for k in PROFILE_NAMES:
            if k not in r["eager"]:
                continue
            if "median_ms" in r["eager"][k] or "median_ms" in r["graph"].get(k, {}):
                keys.append(k)
            else:
                absent[k] = r["eager"][k].get("error", "not measured")
        y = torch.arange(len(keys)).float()
        eager = [r["eager"][k].get("median_ms", float("nan")) for k in keys]
        graph = [r["graph"].get(k, {}).get("median_ms", float("nan")) for k in keys]
        ax.barh(y + 0.2, eager, 0.4, color="tab:gray", label="eager")
        ax.barh(y - 0.2, graph, 0.4, color="tab:green", label="CUDA graph")
        if ideal_ms and (r["B"], r["N"]) in ideal_ms:
            ax.axvline(ideal_ms[(r["B"], r["N"])], color="tab:green", ls=":", lw=1, label="LeanK bytes / copy bw")
        ax.set_yticks(y, [PROFILE_NAMES[k] for k in keys], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="ms per 32-layer step", title=f"B{r['B']} N{r['N'] // 1024}K")
    for ax in list(axes.flat)[len(shapes) :]:
        ax.set_visible(False)
    handles, names = axes.flat[shapes.index(next(iter(by_shape)))].get_legend_handles_labels()
    note = "; ".join(f"{PROFILE_NAMES.get(k, k)}: {why}" for k, why in absent.items())
    fig.legend(handles, names, loc="outside lower center", ncols=3, fontsize=8)
    title = f"Whole attention steps, eager vs CUDA graph; measured on one {result_source(profile)}"
    fig.suptitle(title + (f"\nnot shown, no time in the file: {note}" if note else ""), fontsize=9)
    return fig


def authors_kernel_figure(authors: dict, n_groups: list[int]):
    """Our kernels beside the authors' TileLang kernels (authors_kernel.json): total per step, and LeanK per layer
    against the number of kept-count groups in the layer at B1 N128K."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    shapes = [f"B{r['B']}\nN{r['N'] // 1024}K" for r in authors["results"]]
    bars = (
        ("LeanK, ours", "leank_total_ms", "ours_triton", "tab:blue", None),
        ("LeanK, authors", "leank_total_ms", "authors_tilelang", "tab:blue", "//"),
        ("dense, ours", "dense_total_ms", "ours_triton", "tab:gray", None),
        ("dense, authors", "dense_total_ms", "authors_tilelang", "tab:gray", "//"),
    )
    width = 0.2
    for j, (label, part, who, color, hatch) in enumerate(bars):
        x = [i + (j - 1.5) * width for i in range(len(shapes))]
        heights = [r[part][who] for r in authors["results"]]
        alpha = 0.9 if hatch is None else 0.45
        ax1.bar(x, heights, width, label=label, color=color, hatch=hatch, alpha=alpha, edgecolor="black", lw=0.4)
    ax1.set_xticks(range(len(shapes)), shapes)
    ax1.set_yscale("log")
    ax1.set(ylabel="ms per decoding step (32 layers)", title="Attention of one step, same inputs, CUDA graphs")
    ax1.legend(fontsize=8)
    per = next(r for r in authors["results"] if (r["B"], r["N"]) == (1, 131072))["leank_ms_per_layer"]
    for who, marker, label in (
        ("authors_tilelang", "s", "authors (one launch per group)"),
        ("ours_triton", "o", "ours (one launch per layer)"),
    ):
        jitter = [n + 0.08 * ((i % 5) - 2) for i, n in enumerate(n_groups)]
        ax2.scatter(jitter, [1e3 * t for t in per[who]], marker=marker, label=label, alpha=0.7)
    ax2.set_xticks(sorted(set(n_groups)))
    ax2.set(xlabel="kept-count groups in the layer", ylabel="µs per layer", title="LeanK per layer at B=1, N=128K")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    return fig
