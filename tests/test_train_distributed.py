"""Data parallelism under torch.distributed (gloo, CPU): 2 processes x 1 example train exactly what 1 process does
with the same 2 examples, checkpoints and resuming included; bad launches fail before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from leank_ref.train.settings import TrainSettings
from leank_ref.train.trainer import Trainer
from leank_ref.windows import Windows

SETTINGS = TrainSettings(
    steps=4, batch=2, context_min=160, context_max=200, windows=Windows(4, 16, 1), align=4, tasks=("passkey",)
)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_model_and_tokenizer():
    """A randomly initialised 2-layer Llama (head_dim 16, the same weights in every process) and SmolLM2's
    tokenizer, which the training data templates need."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from leank_ref.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, vocab_size=len(tokenizer), max_position_embeddings=512, initializer_range=0.3)
    return LlamaForCausalLM(config).eval(), tokenizer


def rank_main(rank: int, world: int, folder: str) -> None:
    """One process: 2 steps with a checkpoint, then a fresh trainer resumes to the end; factors and log saved."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model, tokenizer = tiny_model_and_tokenizer()
        checkpoint = Path(folder) / "run.ckpt"
        Trainer(model, tokenizer, SETTINGS).run(checkpoint=checkpoint, until=2, progress=False)
        result = Trainer(model, tokenizer, SETTINGS).run(checkpoint=checkpoint, resume=True, progress=False)
        torch.save(result.factors, Path(folder) / f"factors_rank{rank}.pt")
        (Path(folder) / f"log_rank{rank}.json").write_text(json.dumps(result.log))
    finally:
        dist.destroy_process_group()


def test_two_processes_with_one_example_each_equal_one_process_with_both(tmp_path, one_thread):
    mp.spawn(rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    parallel = [torch.load(tmp_path / f"factors_rank{r}.pt", weights_only=True) for r in range(2)]
    logs = [json.loads((tmp_path / f"log_rank{r}.json").read_text()) for r in range(2)]

    model, tokenizer = tiny_model_and_tokenizer()
    single = Trainer(model, tokenizer, SETTINGS).run(progress=False)
    alone = Trainer(model, tokenizer, SETTINGS.replace(batch=1)).run(progress=False)  # example 0 only per step

    assert torch.equal(parallel[0], parallel[1])  # every process holds the same factors
    assert float((single.factors - 1).abs().max()) > 1e-3  # four steps really moved them
    torch.testing.assert_close(parallel[0], single.factors, rtol=0, atol=1e-6)
    assert float((alone.factors - single.factors).abs().max()) > 1e-4  # a process alone would have drifted off
    for ours in logs:  # the log's loss is the mean over both processes' examples, as in one process
        assert [r["step"] for r in ours] == [0, 1, 2, 3]
        for a, b in zip(ours, single.log):
            assert a["distill_loss"] == pytest.approx(b["distill_loss"], rel=1e-5)


def test_bad_launches_fail_before_any_work(monkeypatch, tmp_path):
    from leank_ref.__main__ import main

    out = str(tmp_path / "f.pth")
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="cannot be split evenly over 2 processes"):
        main(["train", "--stage", "1", "--out", out, "--batch", "3", "--device", "cpu"])
    assert not dist.is_initialized()  # the error came before the process group
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU.*--device cpu"):
            main(["train", "--stage", "1", "--out", out, "--device", "cuda"])
