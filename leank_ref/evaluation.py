"""Accuracy of channel selectors at equal budget: needle log-likelihood, KL to dense, greedy passkey (notebook 06).

Protocol. Every sample is prefilled **once**, densely (LeanK's prefill is dense), by
:func:`~leank_ref.attention.capture_prefill`, which records every layer's post-RoPE queries, keys and values.
Per-prompt selectors (ThinK, K-norm) pick their channels from that capture; then all methods decode *together*,
one batch row per (method, ratio, budget), through :class:`~leank_ref.attention.SimulatedLeanKRows` (simulated
LeanK for many masks over one prompt: decode queries see full K for sink and recent keys and only the kept
channels for middle keys; a zero-count head skips its middle tokens, the deployed meaning). Dense is the row
whose mask keeps every channel. So the prefill, by far the largest cost, is paid once per sample for the whole
grid, every method sees exactly the same samples, and every comparison can be paired.

Metrics (per sample and row), chosen because they do not saturate on a 135M model:
- ``ll``: teacher-forced log-likelihood of the answer, mean nats per token. Passkey / key-value: the needle's
  digit tokens inside the reference answer ("The pass key is 12345."); continuation: the true next tokens.
  It moves smoothly even where greedy decoding fails.
- ``kl``: mean over the teacher-forced answer positions of KL(dense || method) of the next-token distributions
  (nats); ``top1``: share of those positions whose most likely token equals dense's.
- ``correct`` (task ``passkey_greedy`` only): greedy decoding contains the key. Run only at lengths where dense
  itself reaches 0.8 in the dense scan (:func:`accuracy_lengths`): below that, a pruned model "beating" dense
  says more about the task than about the method.
The first answer token comes from the shared dense prefill, identical for every row, so it is left out of
``ll`` and ``kl`` (they average over the decode positions that pruning can change).

Text. Haystacks and continuations come from two sources (:mod:`leank_ref.data`): ``pydoc``, the text the masks
were trained on (other seeds), and ``stdlib``, standard-library source code that no training builder uses.

Comparisons (:mod:`leank_ref.stats`) are always paired by sample: a paired bootstrap interval of the per-sample
difference, an exact sign test for accuracies. A method *holds* where a loss of ``tolerance`` (0.05 nats per
token: the answer's per-token probability falls by at most ~5%) is excluded for both ``ll`` and ``kl``.

Samples are fixed by seeds before any result is seen: passkey 10_000+, kv_retrieval 11_000+, continuation
12_000+, the dense length scan 13_000+, greedy passkey 14_000+ (training draws its example seeds from its own
generator over 2^31 and uses the pydoc text only; static-importance calibration uses 20_000+). Nothing is tuned
on them: windows, lengths, tolerance and the budget rule were set before the grid ran.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import random
import resource
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leank_ref.attention import QKCapture, SimulatedLeanKRows, capture_prefill, use_hook
from leank_ref.baselines import (
    MASKS_DIR,
    SELECTORS,
    STAGE1_FACTORS,
    Dense,
    LeanKFactors,
    LeanKLearned,
    RandomChannels,
    Selector,
    StaticImportance,
    ThinK,
    equal_budget,
    learned_mask_path,
    uniform_counts,
)
from leank_ref.data import SOURCES, Example, make_example
from leank_ref.masks import kept_counts, load_mask, top_count_mask
from leank_ref.memory import mask_stats
from leank_ref.models import model_facts
from leank_ref.stats import compare_all, headline, summarize
from leank_ref.windows import Windows

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
SCAN_FILE = "passkey_dense_scan.json"
SEED_BASE = {
    "passkey": 10_000,
    "kv_retrieval": 11_000,
    "continuation": 12_000,
    "scan": 13_000,
    "passkey_greedy": 14_000,
}
ALL_METHODS = ("leank", "leank_authors", "leank_factors", "think", "knorm", "static_qk", "rope", "random")
TEACHER_FORCED_TASKS = ("passkey", "kv_retrieval", "continuation")
TOLERANCE = 0.05  # nats per token, for ll and kl (module docstring)


@dataclass
class EvalGrid:
    """Everything that defines an evaluation run; fixed before looking at any result. Defaults: the full grid."""

    methods: tuple[str, ...] = ALL_METHODS
    ratios: tuple[float, ...] = (0.5, 0.7, 0.8)
    tasks: tuple[str, ...] = TEACHER_FORCED_TASKS
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    sources: tuple[str, ...] = SOURCES
    samples: int = 8  # per (task, source, length)
    kv_pairs: int = 4
    answer_length: int = 32  # continuation tokens teacher-forced (ll/kl over the last answer_length - 1)
    greedy_lengths: tuple[int, ...] = ()  # passkey_greedy: lengths where dense >= 0.8 (accuracy_lengths)
    greedy_samples: int = 20  # per greedy length
    max_new_tokens: int = 16  # greedy passkey: "The pass key is 12345." is ~11 tokens (digits are single tokens)
    sink: int = 16
    recent: int = 64
    align: int = 16
    uniform_ablation: bool = True  # also run the heuristics at uniform counts where LeanK's counts are the budget
    think_window: int = 32
    calibration_prompts: int = 4
    calibration_length: int = 1024
    random_seed: int = 0
    tolerance: float = TOLERANCE

    def specs(self) -> list[dict]:
        """The fixed list of sample specs (task, source, length, seed) of the whole grid, in evaluation order."""
        out = []
        for task in self.tasks:
            for source in self.sources:
                for length in self.lengths:
                    out += [
                        {"task": task, "source": source, "length": length, "seed": SEED_BASE[task] + i}
                        for i in range(self.samples)
                    ]
        for length in self.greedy_lengths:
            out += [
                {"task": "passkey_greedy", "source": "pydoc", "length": length, "seed": SEED_BASE["passkey_greedy"] + i}
                for i in range(self.greedy_samples)
            ]
        return out


def tiny_grid(**overrides) -> EvalGrid:
    """A grid that runs in about a minute: tests and the notebook's live check."""
    values = dict(
        ratios=(0.5, 0.8),
        lengths=(256,),
        samples=1,
        answer_length=8,
        greedy_lengths=(256,),
        greedy_samples=1,
        calibration_prompts=1,
        calibration_length=256,
    )
    values.update(overrides)
    return EvalGrid(**values)


def accuracy_lengths(scan_path: str | Path = RESULTS_DIR / SCAN_FILE, threshold: float = 0.8) -> tuple[int, ...]:
    """Lengths where dense passkey accuracy reached ``threshold`` in the dense scan (greedy accuracy runs only there).

    FileNotFoundError names the command that writes the scan."""
    path = Path(scan_path)
    if not path.exists():
        raise FileNotFoundError(f"no dense scan at {path}: run python -m leank_ref evaluate --scan first.")
    summary = json.loads(path.read_text())["summary"]
    return tuple(sorted(s["length"] for s in summary if s["accuracy"] >= threshold))


def example_for(tokenizer, spec: dict, grid: EvalGrid) -> Example:
    """Build the :class:`Example` a sample spec describes (passkey depth: uniform, drawn from the seed)."""
    task = "passkey" if spec["task"] == "passkey_greedy" else spec["task"]
    extra = {"source": spec.get("source", "pydoc")}
    if task == "kv_retrieval":
        extra["num_pairs"] = grid.kv_pairs
    elif task == "continuation":
        extra["answer_length"] = grid.answer_length
    return make_example(task, tokenizer, spec["length"], seed=spec["seed"], **extra)


# ---------------------------------------------------------------------------------------------------------------
# What is compared: one Config per batch row


@dataclass
class Config:
    """One row of the comparison: a selector at a ratio with its per-head budget (dense: ratio 0, no budget)."""

    method: str
    ratio: float
    budget: str  # where the per-head counts come from: "leank", "uniform", "own" (a learned mask's), "none" (dense)
    selector: Selector = field(repr=False)
    counts: torch.Tensor | None = field(default=None, repr=False)  # int [L, G]

    def mask(self, model, capture: QKCapture | None, align: int) -> torch.Tensor:
        """This row's [L, G, D] 0/1 mask for the current prompt (static selectors ignore ``capture``)."""
        return self.selector.select(model, self.counts, align, capture=capture)

    @property
    def key(self) -> str:
        """A short label, e.g. ``think@0.7/leank`` (method@ratio/budget source)."""
        return "dense" if self.method == "dense" else f"{self.method}@{self.ratio:g}/{self.budget}"


def build_configs(
    model, tokenizer, grid: EvalGrid, masks_dir: str | Path = MASKS_DIR
) -> tuple[list[Config], list[str]]:
    """Dense first, then every (method, ratio, budget) of the grid; also what is pending (missing learned files)."""
    shape = model_facts(model).mask_shape
    unknown = set(grid.methods) - set(ALL_METHODS) - {"dense"}
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {sorted(ALL_METHODS)}.")
    pending: list[str] = []
    fixed: dict[str, Selector] = {}
    if "static_qk" in grid.methods:
        fixed["static_qk"] = StaticImportance.calibrate(
            model, tokenizer, grid.calibration_prompts, grid.calibration_length
        )
    if "leank_factors" in grid.methods:
        path = Path(masks_dir) / STAGE1_FACTORS
        if path.exists():
            fixed["leank_factors"] = LeanKFactors.load(path)
        else:
            pending.append(f"leank_factors: no stage-1 factors at {path}")
    fixed["think"] = ThinK(grid.think_window)
    fixed["random"] = RandomChannels(grid.random_seed)

    configs = [Config("dense", 0.0, "none", Dense())]
    for ratio in grid.ratios:
        counts, source = equal_budget(model, ratio, grid.align, masks_dir)
        budgets = [(source, counts)]
        if source == "leank" and grid.uniform_ablation:  # same total as LeanK's mask, spread evenly over heads
            realized = 1.0 - counts.sum().item() / (counts.numel() * shape[2])
            budgets.append(("uniform", uniform_counts(shape, realized, grid.align)))
        for method in grid.methods:
            if method == "dense":
                continue
            if method == "leank_authors":  # the authors' stage-2 variant, at its own per-head counts
                path = learned_mask_path(ratio, masks_dir, variant="authors")
                if path.exists():
                    own = kept_counts(load_mask(path, shape, grid.align))
                    configs.append(Config(method, ratio, "own", LeanKLearned(path), own))
                else:
                    pending.append(f"leank_authors r={ratio:g}: no learned mask at {path}")
                continue
            if method == "leank":
                if source == "leank":
                    configs.append(
                        Config("leank", ratio, "leank", LeanKLearned(learned_mask_path(ratio, masks_dir)), counts)
                    )
                else:
                    pending.append(f"leank r={ratio:g}: no learned mask at {learned_mask_path(ratio, masks_dir)}")
                continue
            if method == "leank_factors" and method not in fixed:
                continue
            selector = fixed.get(method) or SELECTORS[method]()
            configs.extend(Config(method, ratio, name, selector, c) for name, c in budgets)
    return configs, pending


# ---------------------------------------------------------------------------------------------------------------
# One shared dense prefill, then every row decodes against it


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
    decoder = SimulatedLeanKRows(prompt, masks, grid.sink, grid.recent)
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
    decoder = SimulatedLeanKRows(prompt, masks, grid.sink, grid.recent)
    rows = masks.shape[0]
    device = next(model.parameters()).device
    inputs = answer_ids[:-1].reshape(1, -1).expand(rows, -1).to(device)  # [B, A-1]
    positions = (decoder.prompt_len + torch.arange(inputs.shape[1], device=device)).expand(rows, -1)
    with use_hook(model, decoder):
        logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits  # [B, A-1, V]
    return torch.log_softmax(logits.float(), dim=-1)


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


def evaluate_sample(model, tokenizer, spec: dict, configs: list[Config], grid: EvalGrid) -> list[dict]:
    """All configs on one sample (one shared prefill); one result row per config."""
    ex = example_for(tokenizer, spec, grid)
    capture, last_logits = capture_prefill(model, ex.context_ids, values=True)
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


def config_memory(configs: list[Config], model, grid: EvalGrid, context: int) -> list[dict]:
    """Per config: pruned ratio, zero-count heads and K/V cache saved at ``context`` tokens (as the cache stores)."""
    shape = model_facts(model).mask_shape
    out = []
    for c in configs:
        counts = torch.full(shape[:2], shape[2]) if c.counts is None else c.counts
        stats = mask_stats(
            top_count_mask(torch.zeros(shape), counts), context, Windows(grid.sink, grid.recent, grid.block)
        )
        out.append(
            {
                "method": c.method,
                "ratio": c.ratio,
                "budget": c.budget,
                "context": context,
                "pruned_ratio": stats.pruned_ratio,
                "zero_heads": stats.zero_heads,
                "k_saved": stats.k_saved,
                "v_saved": stats.v_saved,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Files


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: str | Path) -> list[dict]:
    """Read a samples/summary CSV back with numbers as numbers (empty cells -> None)."""

    def parse(v: str):
        if v == "":
            return None
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: (v if k in ("answer", "output") else parse(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_WORKER: dict = {}


def _worker_init(model_path: str | None, configs: list[Config], grid: EvalGrid) -> None:
    """A worker process: one torch thread, its own copy of the model, the parent's configs."""
    from leank_ref.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model(model_path)
    _WORKER.update(model=model, tokenizer=tokenizer, configs=configs, grid=grid)


def _worker_sample(spec: dict) -> list[dict]:
    return evaluate_sample(_WORKER["model"], _WORKER["tokenizer"], spec, _WORKER["configs"], _WORKER["grid"])


def evaluate_specs(
    model,
    tokenizer,
    specs: list[dict],
    configs: list[Config],
    grid: EvalGrid,
    workers: int = 1,
    model_path: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Result rows of every sample spec, in spec order; ``workers`` > 1 spreads samples over processes."""
    bar = tqdm(total=len(specs), desc=f"{len(specs)} samples x {len(configs)} configs", disable=not progress)
    if workers <= 1:
        rows = []
        for spec in specs:
            rows.extend(evaluate_sample(model, tokenizer, spec, configs, grid))
            bar.update()
        bar.close()
        return rows
    ctx = multiprocessing.get_context("spawn")
    results: dict[int, list[dict]] = {}
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=(model_path, configs, grid)
    ) as pool:
        futures = {pool.submit(_worker_sample, spec): i for i, spec in enumerate(specs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    bar.close()
    return [row for i in range(len(specs)) for row in results[i]]


def analyze(rows: list[dict], grid: EvalGrid) -> dict:
    """Summaries (pooled over lengths, and per length), paired comparisons against dense and LeanK (pooled and per
    length) and the headline of each text source, from the per-sample rows."""
    tasks = tuple(t for t in grid.tasks if t in TEACHER_FORCED_TASKS)
    comparisons = compare_all(rows, grid.tolerance, by=("task", "source"))
    per_length = compare_all(rows, grid.tolerance, metrics=("ll", "kl", "correct"), by=("task", "source", "length"))
    sources = sorted({r["source"] for r in rows if r["task"] in tasks})
    return {
        "summary": summarize(rows),
        "by_length": summarize(rows, ("task", "source", "length", "method", "ratio", "budget")),
        "comparisons": comparisons,
        "comparisons_by_length": [c for c in per_length if c["b"] == "dense"],
        "headline": {source: headline(comparisons, tasks, source=source) for source in sources} if tasks else {},
    }


def run_evaluation(
    model,
    tokenizer,
    grid: EvalGrid,
    out_dir: str | Path = RESULTS_DIR,
    name: str = "eval",
    masks_dir: str | Path = MASKS_DIR,
    progress: bool = True,
    workers: int = 1,
    model_path: str | None = None,
) -> dict:
    """Evaluate the grid; write ``<name>_samples.csv``, ``<name>_summary.csv`` and ``<name>.json`` under ``out_dir``.

    ``workers`` > 1 runs samples in that many processes of one thread each (``model_path``: what they load; None =
    the embedded SmolLM2), the fastest use of a few CPU cores; results do not depend on it.
    """
    from leank_ref.provenance import provenance

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    configs, pending = build_configs(model, tokenizer, grid, masks_dir)
    specs = grid.specs()
    rows = evaluate_specs(model, tokenizer, specs, configs, grid, workers, model_path, progress)
    report = {
        "grid": asdict(grid),
        "configs": [c.key for c in configs],
        "pending": pending,
        **analyze(rows, grid),
        "memory": [m for n in sorted({s["length"] for s in specs}) for m in config_memory(configs, model, grid, n)],
        "runtime_s": time.perf_counter() - start,
        "workers": workers,
        "threads": 1 if workers > 1 else torch.get_num_threads(),
        "provenance": provenance(next(model.parameters()).device),
    }
    if workers <= 1:
        report["cpu_s"] = _cpu_seconds() - cpu_start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / f"{name}_samples.csv", rows)
    _write_csv(out / f"{name}_summary.csv", report["summary"])
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    return report


def dense_passkey_scan(
    model, tokenizer, lengths: tuple[int, ...], samples: int, grid: EvalGrid | None = None, progress: bool = True
) -> list[dict]:
    """Dense passkey accuracy per length (depths uniform at random, seeds 13_000+): where does the model succeed?

    Run before the grid to choose its lengths; its samples are disjoint from the evaluation's.
    """
    grid = grid or EvalGrid()
    shape = model_facts(model).mask_shape
    rows = []
    for length in lengths:
        for i in tqdm(range(samples), desc=f"dense passkey {length}", disable=not progress):
            seed = SEED_BASE["scan"] + i
            depth = random.Random(f"scan-{seed}-{length}").random()
            ex = make_example("passkey", tokenizer, length, seed=seed, depth=depth)
            capture, last_logits = capture_prefill(model, ex.context_ids, values=True)
            ids = generate_rows(
                model,
                capture,
                int(last_logits[0].argmax()),
                torch.ones(1, *shape),
                grid,
                tokenizer,
                ex.answer,
                grid.max_new_tokens,
            )[0]
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


# ---------------------------------------------------------------------------------------------------------------
# Command line: python -m leank_ref evaluate ...


def add_arguments(parser) -> None:
    """The ``evaluate`` subcommand's options (defaults: the full grid of notebook 06)."""
    d = EvalGrid()
    parser.add_argument(
        "--method", nargs="+", choices=ALL_METHODS, default=list(d.methods), help="methods compared with dense"
    )
    parser.add_argument(
        "--ratio", nargs="+", type=float, default=list(d.ratios), help="pruning ratios (default 0.5 0.7 0.8)"
    )
    parser.add_argument("--task", nargs="+", choices=TEACHER_FORCED_TASKS, default=list(d.tasks))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(d.lengths), help="context lengths (tokens)")
    parser.add_argument("--source", nargs="+", choices=SOURCES, default=list(d.sources), help="haystack text sources")
    parser.add_argument("--samples", type=int, default=d.samples, help="samples per (task, source, length)")
    parser.add_argument(
        "--greedy-lengths",
        nargs="*",
        type=int,
        help="greedy passkey accuracy at these lengths (default: where the dense scan reaches 0.8)",
    )
    parser.add_argument("--greedy-samples", type=int, default=d.greedy_samples, help="samples per greedy length")
    parser.add_argument(
        "--no-uniform-ablation",
        action="store_true",
        help="skip the heuristics at uniform counts where LeanK's counts are the budget",
    )
    parser.add_argument("--tiny", action="store_true", help="a grid of a few samples (a smoke test)")
    parser.add_argument(
        "--scan",
        nargs="*",
        type=int,
        metavar="LENGTH",
        help="instead of the grid: dense passkey accuracy at these lengths (default 256 ... 2048)",
    )
    parser.add_argument("--scan-samples", type=int, default=30, help="samples per length of --scan")
    parser.add_argument("--masks-dir", default=str(MASKS_DIR), help="folder of the shipped masks and factors")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="output folder (default results/)")
    parser.add_argument("--name", default="eval", help="file stem: <name>.json, <name>_samples.csv, <name>_summary.csv")
    parser.add_argument(
        "--model", help="local Llama/Qwen2 checkpoint folder (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes of one thread each sharing the samples (2 on a 2-core machine: fastest)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads of a single process (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (e.g. cuda)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _run_scan(args, model, tokenizer, out: Path) -> int:
    from leank_ref.provenance import provenance

    lengths = tuple(args.scan) or (256, 512, 768, 1024, 1536, 2048)
    start = time.perf_counter()
    rows = dense_passkey_scan(model, tokenizer, lengths, args.scan_samples, progress=not args.no_progress)
    summary = summarize(rows, ("task", "method", "length"))
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "summary": summary,
        "samples_per_length": args.scan_samples,
        "runtime_s": time.perf_counter() - start,
        "provenance": provenance(next(model.parameters()).device),
    }
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    for s in summary:
        print(
            f"length {s['length']:>5}: dense passkey {s['accuracy']:.2f} "
            f"[{s['acc_low']:.2f}, {s['acc_high']:.2f}] (n={s['n']})"
        )
    return 0


def run_command(args) -> int:
    """Run ``evaluate``: every method at every ratio, paired against dense, on held-in and held-out text."""
    from leank_ref.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    out = Path(args.out)
    if args.scan is not None:
        return _run_scan(args, model, tokenizer, out)
    overrides = dict(
        methods=tuple(args.method),
        ratios=tuple(args.ratio),
        tasks=tuple(args.task),
        uniform_ablation=not args.no_uniform_ablation,
    )
    if args.greedy_lengths is not None:
        overrides["greedy_lengths"] = tuple(args.greedy_lengths)
    if args.tiny:
        grid = tiny_grid(**overrides)
    else:
        if args.greedy_lengths is None:  # the committed scan (results/), or one written to --out
            scan = out / SCAN_FILE if (out / SCAN_FILE).exists() else RESULTS_DIR / SCAN_FILE
            overrides["greedy_lengths"] = accuracy_lengths(scan)
        grid = EvalGrid(
            **overrides,
            lengths=tuple(args.lengths),
            sources=tuple(args.source),
            samples=args.samples,
            greedy_samples=args.greedy_samples,
        )
    report = run_evaluation(
        model,
        tokenizer,
        grid,
        out,
        args.name,
        args.masks_dir,
        progress=not args.no_progress,
        workers=args.workers,
        model_path=args.model,
    )
    for line in report["pending"]:
        print(f"pending: {line}")
    for c in report["comparisons"]:
        if c["b"] == "dense" and c["metric"] in ("ll", "kl", "correct"):
            print(
                f"{c['task']:>14} {c['source']:>6} {c['a']:<28} {c['metric']:>7} vs dense "
                f"{c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] n={c['n']} {c['verdict']}"
            )
    for source, methods in report["headline"].items():
        for method, rec in methods.items():
            print(f"headline {source:>6} {method:<14} holds up to r={rec['ratio']}")
    print(f"wrote {out}/{args.name}.json ({report['runtime_s']:.0f} s wall, {args.workers} worker(s))")
    return 0
