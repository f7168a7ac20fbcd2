"""Accuracy of channel selectors at equal budget: passkey, key-value retrieval, LM fidelity (notebook 06).

Protocol. Every sample is prefilled **once**, densely (LeanK's prefill is dense), by
:func:`~leank_ref.attention.capture_prefill`, which records every layer's post-RoPE queries, keys and values.
Per-prompt selectors (ThinK, K-norm) pick their channels from that capture; then all methods decode *together*,
one batch row per (method, ratio, budget), through :class:`~leank_ref.attention.SimulatedLeanKRows` (simulated
LeanK for many masks over one prompt: decode queries see full K for sink and recent keys and only the kept
channels for middle keys; a zero-count head skips its middle tokens, the deployed meaning). Dense is the row
whose mask keeps every channel. So the prefill, by far the largest cost on a CPU, is paid once per sample for the
whole grid, and the first answer token (predicted by the dense prefill) is the same for every method.

- passkey / kv_retrieval: greedy decoding of up to 16 / 20 new tokens per row; a row stops at EOS or
  once its text contains the expected digits (the verdict cannot change after that). Correct if the expected
  digits appear in the decoded text. Wilson 95% intervals.
- continuation: teacher forcing on the true next ``answer_length`` pydoc tokens; per sample the mean over decode
  positions of KL(dense || method) of the next-token distributions (nats) and the top-1 agreement with dense.
  Normal 95% intervals over samples.

Samples are fixed by seeds before any result is seen: passkey 10_000+, kv_retrieval 11_000+, continuation
12_000+, the dense length scan 13_000+ (training uses seeds below 10_000, static-importance calibration 20_000+).
Nothing here is tuned on them: windows, lengths and the budget rule were set before the grid ran.
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
from leank_ref.data import Example, make_example
from leank_ref.masks import mask_stats, top_count_mask
from leank_ref.models import model_facts
from leank_ref.stats import headline, summarize

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
SEED_BASE = {"passkey": 10_000, "kv_retrieval": 11_000, "continuation": 12_000, "scan": 13_000}
ALL_METHODS = ("leank", "leank_factors", "think", "knorm", "static_qk", "rope", "random")
ACCURACY_TASKS = ("passkey", "kv_retrieval")


@dataclass
class EvalGrid:
    """Everything that defines an evaluation run; fixed before looking at any result. Defaults: the full grid."""

    methods: tuple[str, ...] = ALL_METHODS
    ratios: tuple[float, ...] = (0.5, 0.7, 0.8)
    tasks: tuple[str, ...] = ("passkey", "kv_retrieval", "continuation")
    # lengths where dense SmolLM2 finds the key at all, measured first on seeds of their own:
    # results/passkey_dense_scan.json, written by `python -m leank_ref evaluate --scan`
    passkey_lengths: tuple[int, ...] = (256, 384, 512, 768)
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_repeats: int = 3  # samples per (length, depth) cell of the heatmap
    kv_lengths: tuple[int, ...] = (512, 1024)
    kv_pairs: int = 4
    kv_samples: int = 50
    continuation_lengths: tuple[int, ...] = (512, 1024)
    continuation_samples: int = 50
    answer_length: int = 32  # continuation tokens teacher-forced (KL over the last answer_length - 1)
    max_new_tokens: int = 16  # passkey: the answer "The pass key is 12345." is ~11 tokens (digits are single tokens)
    kv_max_new_tokens: int = 20  # kv retrieval: "The value of record abcdef is 12345." is ~15 tokens
    sink: int = 16
    recent: int = 64
    align: int = 16
    uniform_ablation: bool = True  # also run the heuristics at uniform counts where LeanK's counts are the budget
    think_window: int = 32
    calibration_prompts: int = 4
    calibration_length: int = 1024
    random_seed: int = 0

    def samples(self, task: str) -> list[dict]:
        """The fixed list of sample specs (task, length, seed, and depth for passkey) for ``task``."""
        base = SEED_BASE[task]
        if task == "passkey":
            cells = [
                (n, d) for n in self.passkey_lengths for d in self.passkey_depths for _ in range(self.passkey_repeats)
            ]
            return [{"task": task, "length": n, "depth": d, "seed": base + i} for i, (n, d) in enumerate(cells)]
        if task == "kv_retrieval":
            lengths, count = self.kv_lengths, self.kv_samples
        elif task == "continuation":
            lengths, count = self.continuation_lengths, self.continuation_samples
        else:
            raise ValueError(f"unknown task '{task}'; choose from passkey, kv_retrieval, continuation.")
        return [{"task": task, "length": lengths[i % len(lengths)], "seed": base + i} for i in range(count)]


def tiny_grid(**overrides) -> EvalGrid:
    """A grid that runs in well under a minute: tests and the notebook's live check."""
    values = dict(
        ratios=(0.5, 0.8),
        passkey_lengths=(256,),
        passkey_depths=(0.5,),
        passkey_repeats=2,
        kv_lengths=(256,),
        kv_samples=1,
        continuation_lengths=(256,),
        continuation_samples=2,
        answer_length=8,
        calibration_prompts=1,
        calibration_length=256,
    )
    values.update(overrides)
    return EvalGrid(**values)


def example_for(tokenizer, spec: dict, grid: EvalGrid) -> Example:
    """Build the :class:`Example` a sample spec describes."""
    extra = {}
    if spec["task"] == "passkey":
        extra["depth"] = spec["depth"]
    elif spec["task"] == "kv_retrieval":
        extra["num_pairs"] = grid.kv_pairs
    elif spec["task"] == "continuation":
        extra["answer_length"] = grid.answer_length
    return make_example(spec["task"], tokenizer, spec["length"], seed=spec["seed"], **extra)


# ---------------------------------------------------------------------------------------------------------------
# What is compared: one Config per batch row


@dataclass
class Config:
    """One row of the comparison: a selector at a ratio with its per-head budget (dense: ratio 0, no budget)."""

    method: str
    ratio: float
    budget: str  # where the per-head counts come from: "leank", "uniform", or "none" (dense)
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
    unknown = set(grid.methods) - set(SELECTORS) - {"dense"}
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {sorted(set(SELECTORS) - {'dense'})}.")
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


def kl_and_agreement(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> tuple[float, float]:
    """Mean over positions of KL(ref || other) in nats, and the share of positions with the same top-1 token."""
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    agree = (ref_logprobs.argmax(-1) == logprobs.argmax(-1)).float()
    return float(kl.mean()), float(agree.mean())


def evaluate_sample(model, tokenizer, spec: dict, configs: list[Config], grid: EvalGrid) -> list[dict]:
    """All configs on one sample (one shared prefill); one result row per config."""
    ex = example_for(tokenizer, spec, grid)
    capture, last_logits = capture_prefill(model, ex.context_ids, values=True)
    masks = torch.stack([c.mask(model, capture, grid.align) for c in configs])  # [B, L, G, D]
    base = {k: spec.get(k) for k in ("task", "length", "depth", "seed")}
    rows = []
    if spec["task"] == "continuation":
        logprobs = teacher_forced_logprobs(model, capture, ex.input_ids[ex.length_context :], masks, grid)
        dense = logprobs[[c.method for c in configs].index("dense")]
        for c, lp in zip(configs, logprobs):
            kl, top1 = kl_and_agreement(dense, lp)
            rows.append({**base, "method": c.method, "ratio": c.ratio, "budget": c.budget, "kl": kl, "top1": top1})
    else:
        first = int(last_logits[0].argmax())
        budget = grid.max_new_tokens if spec["task"] == "passkey" else grid.kv_max_new_tokens
        outputs = generate_rows(model, capture, first, masks, grid, tokenizer, ex.answer, budget)
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


def config_memory(configs: list[Config], model, grid: EvalGrid, context: int) -> list[dict]:
    """Per config: pruned ratio, zero-count heads and K/V cache saved at ``context`` tokens (as the cache stores)."""
    shape = model_facts(model).mask_shape
    out = []
    for c in configs:
        counts = torch.full(shape[:2], shape[2]) if c.counts is None else c.counts
        stats = mask_stats(top_count_mask(torch.zeros(shape), counts), context, grid.sink, grid.recent)
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
    specs = [spec for task in grid.tasks for spec in grid.samples(task)]
    rows = evaluate_specs(model, tokenizer, specs, configs, grid, workers, model_path, progress)
    summary = summarize(rows)
    contexts = sorted({s["length"] for s in specs})
    report = {
        "grid": asdict(grid),
        "configs": [c.key for c in configs],
        "pending": pending,
        "summary": summary,
        "headline": {t: headline(summary, t) for t in grid.tasks if t in ACCURACY_TASKS},
        "by_length": summarize(rows, ("task", "method", "ratio", "budget", "length")),
        "by_cell": summarize(
            [r for r in rows if r["task"] == "passkey"], ("task", "method", "ratio", "budget", "length", "depth")
        ),
        "memory": config_memory(configs, model, grid, max(contexts)),
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
    _write_csv(out / f"{name}_summary.csv", summary)
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
    methods = sorted(set(SELECTORS) - {"dense"})
    parser.add_argument(
        "--method",
        nargs="+",
        choices=methods,
        default=list(d.methods),
        help="methods to compare with dense (default: all)",
    )
    parser.add_argument(
        "--ratio", nargs="+", type=float, default=list(d.ratios), help="pruning ratios (default 0.5 0.7 0.8)"
    )
    parser.add_argument("--task", nargs="+", choices=("passkey", "kv_retrieval", "continuation"), default=list(d.tasks))
    parser.add_argument("--passkey-lengths", nargs="+", type=int, default=list(d.passkey_lengths))
    parser.add_argument(
        "--passkey-repeats", type=int, default=d.passkey_repeats, help="samples per (length, depth) cell"
    )
    parser.add_argument("--kv-samples", type=int, default=d.kv_samples)
    parser.add_argument("--continuation-samples", type=int, default=d.continuation_samples)
    parser.add_argument(
        "--no-uniform-ablation",
        action="store_true",
        help="skip the heuristics at uniform counts where LeanK's counts are the budget",
    )
    parser.add_argument("--tiny", action="store_true", help="a grid of a few samples (seconds; a smoke test)")
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
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def run_command(args) -> int:
    """Run ``evaluate``: every method at every ratio on passkey, kv retrieval and continuation; write results/."""
    from leank_ref.models import load_model
    from leank_ref.provenance import provenance

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    out = Path(args.out)
    if args.scan is not None:
        lengths = tuple(args.scan) or (256, 512, 768, 1024, 1536, 2048)
        start = time.perf_counter()
        rows = dense_passkey_scan(model, tokenizer, lengths, args.scan_samples, progress=not args.no_progress)
        summary = summarize(rows, ("task", "method", "length"))
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "summary": summary,
            "samples_per_length": args.scan_samples,
            "runtime_s": time.perf_counter() - start,
            "provenance": provenance("cpu"),
        }
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
        for s in summary:
            print(
                f"length {s['length']:>5}: dense passkey {s['accuracy']:.2f} "
                f"[{s['acc_low']:.2f}, {s['acc_high']:.2f}] (n={s['n']})"
            )
        return 0
    overrides = dict(
        methods=tuple(args.method),
        ratios=tuple(args.ratio),
        tasks=tuple(args.task),
        uniform_ablation=not args.no_uniform_ablation,
    )
    if args.tiny:
        grid = tiny_grid(**overrides)
    else:
        grid = EvalGrid(
            **overrides,
            passkey_lengths=tuple(args.passkey_lengths),
            passkey_repeats=args.passkey_repeats,
            kv_samples=args.kv_samples,
            continuation_samples=args.continuation_samples,
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
    for s in report["summary"]:
        label = "dense" if s["method"] == "dense" else f"{s['method']}@{s['ratio']:g}/{s['budget']}"
        if "accuracy" in s:
            print(
                f"{s['task']:>13} {label:<28} acc {s['accuracy']:.2f} "
                f"[{s['acc_low']:.2f}, {s['acc_high']:.2f}] n={s['n']}"
            )
        else:
            print(
                f"{s['task']:>13} {label:<28} KL {s['kl']:.4f} "
                f"[{s['kl_low']:.4f}, {s['kl_high']:.4f}] top-1 {s['top1']:.3f}"
            )
    print(f"wrote {out}/{args.name}.json ({report['runtime_s']:.0f} s wall, {args.workers} worker(s))")
    return 0
