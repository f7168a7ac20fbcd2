"""Evaluation: the batched decode equals SimulatedLeanK row by row, the real LeanK cache gives the same passkey
answers, the statistics are right, and a tiny grid runs end to end through the command line and writes its files."""

import hashlib
import json
import math

import pytest
import torch

from leank_ref.__main__ import main
from leank_ref.attention import SimulatedLeanK, capture_prefill, use_hook
from leank_ref.baselines import learned_mask_path, uniform_counts
from leank_ref.cache import apply_leank
from leank_ref.data import continuation_example, haystack_sha256, make_example
from leank_ref.evaluate.grid import EvalGrid
from leank_ref.evaluate.metrics import answer_metrics, needle_positions
from leank_ref.evaluate.report import read_rows
from leank_ref.evaluate.sample import generate_rows, teacher_forced_logprobs
from leank_ref.masks import binarize, kept_counts, save_mask, top_count_mask
from leank_ref.stats import compare_all, headline
from leank_ref.windows import Windows

SHAPE, ALIGN = (30, 3, 64), 16


def three_masks() -> torch.Tensor:
    """[3, L, G, D]: dense, random channels at r=0.5, and a binarized r=0.8 mask with zero-count heads."""
    g = torch.Generator().manual_seed(0)
    factors = torch.rand(SHAPE, generator=g) * torch.rand(30, 3, 1, generator=g) ** 2
    r08 = binarize(factors, 0.8, ALIGN)
    assert (kept_counts(r08) == 0).any()
    random05 = top_count_mask(torch.rand(SHAPE, generator=g), uniform_counts(SHAPE, 0.5, ALIGN))
    return torch.stack([torch.ones(SHAPE), random05, r08])


def test_batched_rows_equal_simulated_leank_row_by_row(model, tokenizer):
    sink, recent, p = 4, 16, 120
    ex = continuation_example(tokenizer, p, answer_length=12, seed=3)
    masks = three_masks()
    grid = EvalGrid(windows=Windows(sink, recent, 1))
    capture, last = capture_prefill(model, ex.context_ids, values=True)
    logprobs = teacher_forced_logprobs(model, capture, ex.input_ids[p:], masks, grid)  # [3, 11, V]
    with torch.no_grad():
        dense_last = model(input_ids=ex.context_ids[None]).logits[0, -1]
        torch.testing.assert_close(last[0], dense_last, atol=1e-4, rtol=1e-4)
        for b in range(3):
            with use_hook(model, SimulatedLeanK(masks[b], sink, recent, decode_start=p, exclude_zero_heads=True)):
                ref = torch.log_softmax(model(input_ids=ex.input_ids[None, :-1]).logits[0, p:].float(), -1)
            torch.testing.assert_close(logprobs[b], ref, atol=2e-4, rtol=1e-4)
    assert (logprobs[2] - logprobs[0]).abs().max() > 1e-2  # the pruned rows really differ from dense


def test_real_cache_gives_the_same_passkey_answers(model, tokenizer):
    """The LeanK cache (block=1, so its recent window is exactly `recent`) and the simulation agree token by token."""
    grid = EvalGrid(max_new_tokens=16)
    masks = three_masks()[1:]
    for seed, depth in ((10, 0.3), (11, 0.7)):
        ex = make_example("passkey", tokenizer, 256, seed=seed, depth=depth)
        capture, last = capture_prefill(model, ex.context_ids, values=True)
        sim = generate_rows(model, capture, int(last[0].argmax()), masks, grid, tokenizer, "no stop", max_new_tokens=16)
        for mask, sim_ids in zip(masks, sim):
            with apply_leank(
                model, mask, Windows(grid.windows.sink, grid.windows.recent, 1), align=ALIGN, backend="torch"
            ):
                out = model.generate(ex.context_ids[None], max_new_tokens=16, do_sample=False)  # a LeanK cache
            real_ids = out[0, ex.length_context :].tolist()
            assert real_ids == sim_ids[: len(real_ids)]
            assert tokenizer.decode(real_ids, skip_special_tokens=True).count(ex.answer) == tokenizer.decode(
                sim_ids, skip_special_tokens=True
            ).count(ex.answer)


def test_needle_positions_cover_exactly_the_digits(tokenizer):
    ex = make_example("passkey", tokenizer, 256, seed=4, depth=0.5)
    answer = ex.input_ids[ex.length_context :]
    pos = needle_positions(tokenizer, answer, ex.answer)
    assert tokenizer.decode(answer[pos].tolist()).strip() == ex.answer and 0 not in pos
    with pytest.raises(ValueError, match="does not contain the needle"):
        needle_positions(tokenizer, answer, "99999x")


def test_answer_metrics_known_values():
    ref = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    same = answer_metrics(ref, ref, torch.tensor([0, 1]), [0, 1])
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["top1"] == 1.0
    assert same["ll"] == pytest.approx(float(ref[0, 0] + ref[1, 1]) / 2)
    flat = torch.log(torch.full((2, 3), 1 / 3))
    other = answer_metrics(ref, flat, torch.tensor([0, 1]), [1])
    expected_kl = float((ref.exp() * (ref - flat)).sum(-1).mean())
    assert other["kl"] == pytest.approx(expected_kl) and other["ll"] == pytest.approx(-math.log(3))


def test_headline_needs_every_task_to_hold_at_every_lower_ratio():
    def rows(method, ratio, budget, ll_shift, kl):
        return [
            {
                "task": t,
                "source": "pydoc",
                "length": 512,
                "seed": i,
                "method": method,
                "ratio": ratio,
                "budget": budget,
                "ll": -1.0 - (i % 5) * 0.3 + ll_shift,
                "kl": kl + 0.001 * (i % 3),
            }
            for t in ("passkey", "continuation")
            for i in range(30)
        ]

    data = (
        rows("dense", 0.0, "none", 0.0, 0.0)
        + rows("leank", 0.5, "leank", -0.01, 0.01)
        + rows("leank", 0.7, "leank", -0.02, 0.02)
        + rows("leank", 0.8, "leank", -0.3, 0.01)  # loses 0.3 nats: fails
        + rows("rope", 0.5, "leank", 0.0, 0.2)  # KL too large at 0.5 ...
        + rows("rope", 0.7, "leank", 0.0, 0.0)  # ... so holding at 0.7 does not count
        + rows("rope", 0.7, "uniform", 0.0, 0.0)  # not the equal budget at 0.7
    )
    comparisons = compare_all(data, tolerance=0.05)
    best = headline(comparisons, ("passkey", "continuation"))
    assert best["leank"]["ratio"] == 0.7 and best["leank"]["ratios"] == {0.5: True, 0.7: True, 0.8: False}
    assert sorted(best["leank"]["failed"][0.8]) == ["continuation ll: worse", "passkey ll: worse"]
    assert best["rope"]["ratio"] is None and best["rope"]["ratios"][0.7] is True
    vs_leank = [c for c in comparisons if c["b"] == "leank@0.7/leank" and c["a"] == "rope@0.7/leank"]
    assert {c["metric"] for c in vs_leank} == {"ll", "kl"}  # paired against LeanK too; no top1 in these rows
    with pytest.raises(ValueError, match="no comparisons against dense"):
        headline(comparisons, ("passkey",), source="stdlib")


def test_tiny_grid_runs_from_the_command_line_and_writes_files(model, tmp_path):
    masks_dir = tmp_path / "masks"
    g = torch.Generator().manual_seed(2)
    save_mask(binarize(torch.rand(SHAPE, generator=g), 0.5, ALIGN), learned_mask_path(0.5, masks_dir))
    save_mask(
        binarize(torch.rand(SHAPE, generator=g), 0.5, ALIGN), learned_mask_path(0.5, masks_dir, variant="authors")
    )
    out = tmp_path / "results"
    code = main(
        [
            "evaluate",
            "--tiny",
            "--method",
            "leank",
            "leank_authors",
            "think",
            "random",
            "--ratio",
            "0.5",
            "0.8",
            "--masks-dir",
            str(masks_dir),
            "--out",
            str(out),
            "--name",
            "tiny",
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((out / "tiny.json").read_text())
    assert report["configs"] == [
        "dense",
        "leank@0.5/leank",
        "leank_authors@0.5/own",
        "think@0.5/leank",
        "think@0.5/uniform",
        "random@0.5/leank",
        "random@0.5/uniform",
        "think@0.8/uniform",
        "random@0.8/uniform",
    ]
    assert report["pending"] == [
        f"leank r=0.8: no learned mask at {learned_mask_path(0.8, masks_dir)}",
        f"leank_authors r=0.8: no learned mask at {learned_mask_path(0.8, masks_dir, variant='authors')}",
    ]
    assert report["provenance"]["torch"] == torch.__version__
    samples = read_rows(out / "tiny_samples.csv")
    assert len(samples) == 9 * (3 * 2 + 1)  # configs x (3 tasks x 2 sources + 1 greedy passkey)
    assert {s["source"] for s in samples} == {"pydoc", "stdlib"}
    dense = [s for s in samples if s["method"] == "dense" and s["task"] != "passkey_greedy"]
    assert all(s["kl"] == 0.0 and s["top1"] == 1.0 and s["ll"] < 0 for s in dense)
    for c in report["comparisons"]:
        assert c["low"] <= c["mean"] <= c["high"] and c["verdict"] in ("beats", "holds", "worse", "unclear")
    greedy = [c for c in report["comparisons"] if c["task"] == "passkey_greedy" and c["b"] == "dense"]
    assert greedy and all({"wins_a", "wins_b", "p"} <= set(c) for c in greedy)
    assert set(report["headline"]) == {"pydoc", "stdlib"}
    memory = {(m["method"], m["ratio"], m["budget"]): m for m in report["memory"]}
    assert memory[("think", 0.8, "uniform")]["pruned_ratio"] == pytest.approx(0.8, abs=0.02)
    assert memory[("dense", 0.0, "none")]["k_saved"] == 0.0


def test_tiny_windows_grid_runs_each_window_with_its_own_masks(model, tmp_path):
    """--windows-grid --tiny: one file set per window, masks looked up per window, the missing ones reported with the
    commands that make them, and LeanK's paired differences at r=0.7 against dense and the best heuristic."""
    masks_dir = tmp_path / "masks"
    g = torch.Generator().manual_seed(3)
    save_mask(binarize(torch.rand(SHAPE, generator=g), 0.7, ALIGN), learned_mask_path(0.7, masks_dir))  # 16/64 only
    out = tmp_path / "results"
    argv = ["evaluate", "--windows-grid", "--tiny", "--method", "leank", "random", "--masks-dir", str(masks_dir)]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    assert {p.name for p in out.glob("*.json")} == {"eval_w16-64.json", "eval_w32-128.json", "eval_windows.json"}
    summary = json.loads((out / "eval_windows.json").read_text())
    first, second = summary["windows"]
    assert first["windows"] == {"sink": 16, "recent": 64, "block": 32} and first["missing_masks"] is None
    report = json.loads((out / "eval_w16-64.json").read_text())
    assert report["grid"]["windows"] == first["windows"]
    mask = learned_mask_path(0.7, masks_dir)
    assert report["mask_files"] == {mask.name: hashlib.sha256(mask.read_bytes()).hexdigest()}
    paired = first["paired"]["stdlib"]
    assert paired["best_heuristic"] == "random" and first["paired_length"] == 256
    assert set(paired["vs_dense"]) == {
        f"{t} {m}" for t in ("passkey", "kv_retrieval", "continuation") for m in ("ll", "kl")
    }
    assert all(c["n"] == 1 and c["a"] == "leank@0.7/leank" for c in paired["vs_best_heuristic"].values())
    assert "leank" in first["headline"]["stdlib"] and "leank" not in second["headline"]["stdlib"]
    wanted = learned_mask_path(0.7, masks_dir, windows=Windows(32, 128, 32))
    assert wanted.parent.name == "paper" and second["missing_masks"]["files"] == [str(wanted)]
    commands = second["missing_masks"]["commands"]
    assert commands[0].startswith("python -m leank_ref train --stage 1 --sink 32 --recent 128")
    assert "--ratio 0.7" in commands[1] and commands[1].endswith(f"--out {wanted}")
    assert second["paired"]["stdlib"] == {"missing": "no LeanK mask at r=0.7"}


def _merge_one(out: str, sink: int) -> None:
    from leank_ref.evaluate.windows_grid import merge_summary

    merge_summary(out, [{"windows": {"sink": sink, "recent": 4 * sink, "block": 32}, "headline": {}}])


def test_windows_run_in_parallel_processes_all_land_in_the_summary(tmp_path):
    """Each --window process merges its entry under a lock: eight processes, eight entries, sorted by window."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_merge_one, args=(str(tmp_path), s)) for s in (8, 16, 24, 32, 40, 48, 56, 64)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    _merge_one(str(tmp_path), 16)  # a window run again replaces its entry
    windows = [e["windows"]["sink"] for e in json.loads((tmp_path / "eval_windows.json").read_text())["windows"]]
    assert windows == [8, 16, 24, 32, 40, 48, 56, 64] and [p.name for p in tmp_path.iterdir()] == ["eval_windows.json"]


def test_windows_share_prefills_and_an_interrupted_run_resumes(model_and_tokenizer, tmp_path, monkeypatch):
    """Two window settings evaluated together give each window the rows it gets alone; a run stopped after its
    first sample keeps that sample in the partial file and the same call finishes it, with the same rows."""
    from leank_ref.evaluate import run as run_module
    from leank_ref.evaluate.configs import build_configs
    from leank_ref.evaluate.grid import tiny_grid

    model, tokenizer = model_and_tokenizer
    grids = [
        tiny_grid(
            methods=("random",),
            ratios=(0.7,),
            sources=("stdlib",),
            tasks=("passkey",),
            greedy_lengths=(),
            samples=2,
            windows=w,
        )
        for w in (Windows(16, 64, 32), Windows(32, 128, 32))
    ]
    jobs = [(build_configs(model, tokenizer, g)[0], g) for g in grids]
    specs = grids[0].specs()
    alone = [run_module.evaluate_jobs(model, tokenizer, specs, [job], progress=False)[0] for job in jobs]

    real, calls = run_module.evaluate_sample_jobs, []

    def stop_at_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    partial = tmp_path / "run.partial.jsonl"
    monkeypatch.setattr(run_module, "evaluate_sample_jobs", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        run_module.evaluate_jobs(model, tokenizer, specs, jobs, progress=False, partial=partial, segment={"at": "a"})
    assert len(partial.read_text().splitlines()) == 3  # the header, the first process and its first sample
    monkeypatch.setattr(run_module, "evaluate_sample_jobs", real)
    resumed = dict(progress=False, partial=partial, segment={"at": "b"})
    together = run_module.evaluate_jobs(model, tokenizer, specs, jobs, **resumed)
    assert len(specs) == len(calls) == 2 and len(partial.read_text().splitlines()) == 5
    assert run_module.partial_segments(partial) == [
        {"provenance": {"at": "a"}, "samples": 1},
        {"provenance": {"at": "b"}, "samples": 1},
    ]
    for a, b in zip(alone, together):
        assert [(r["seed"], r["method"]) for r in a] == [(r["seed"], r["method"]) for r in b]
        assert all(x[k] == pytest.approx(y[k], abs=1e-6) for x, y in zip(a, b) for k in ("ll", "kl"))
    assert alone[0] != alone[1]  # the windows do change the rows
    other = [(jobs[0][0][:1], grids[0])]
    with pytest.raises(ValueError, match="delete it"):
        run_module.evaluate_jobs(model, tokenizer, specs, other, progress=False, partial=partial)
    lines = partial.read_text().splitlines()  # the same run under another interpreter: other haystack texts
    header = json.loads(lines[0])
    assert header["texts"] == {"stdlib": haystack_sha256("stdlib")}
    header["texts"]["stdlib"] = "0" * 64
    partial.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="haystack texts"):
        run_module.evaluate_jobs(model, tokenizer, specs, jobs, progress=False, partial=partial)


def test_runs_at_other_lengths_merge_into_the_run_over_all_lengths(model_and_tokenizer, tmp_path):
    """A window's run at 256 tokens merged with its run at 320 tokens gives the rows and the analysis of one run at
    both lengths, keeps each run's provenance, and refuses runs of another grid or a length measured twice."""
    from leank_ref.evaluate.merge import load_run, merge_reports
    from leank_ref.evaluate.windows_grid import run_windows_grid, windows_grid

    model, tokenizer = model_and_tokenizer
    window = Windows(16, 64, 32)
    options = dict(methods=("random",), sources=("stdlib",), tasks=("passkey", "continuation"), windows=(window,))
    for name, lengths in (("short", (256,)), ("long", (320,)), ("both", (256, 320))):
        grids = windows_grid(tiny=True, lengths=lengths, ratios=(0.5,), **options)
        run_windows_grid(model, tokenizer, grids, tmp_path / name, progress=False)
    argv = ["evaluate", "--windows-grid", "--merge-from", str(tmp_path / "long"), "--out", str(tmp_path / "short")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "short" / "eval_windows.json").read_text())
    merged, both = load_run(tmp_path / "short" / "eval_w16-64.json"), load_run(tmp_path / "both" / "eval_w16-64.json")
    key = ("task", "source", "length", "seed", "method", "ratio", "budget")
    assert {r["method"] for r in merged[1]} == {"dense", "random"}
    assert [tuple(r[k] for k in key) for r in merged[1]] == [tuple(r[k] for k in key) for r in both[1]]
    assert all(a[m] == pytest.approx(b[m], abs=1e-6) for a, b in zip(merged[1], both[1]) for m in ("ll", "kl"))
    assert merged[0]["grid"] == both[0]["grid"] and merged[0]["headline"] == both[0]["headline"]
    assert [run["lengths"] for run in merged[0]["runs"]] == [[256], [320]]
    assert summary["windows"][0]["lengths"] == [256, 320] and summary["windows"][0]["paired_length"] == 320
    with pytest.raises(ValueError, match="length twice"):
        merge_reports([merged, both])
    other = json.loads(json.dumps(both[0]))
    other["grid"]["ratios"] = [0.7]
    with pytest.raises(ValueError, match="grid"):
        merge_reports([merged, (other, both[1])])
