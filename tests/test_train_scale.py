"""``benchmarks/train_scale.py --cpu-check``: the 8B-scale training benchmark runs end to end on tiny configs."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_scale.py"


def test_cpu_check_writes_every_part_and_a_projection(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("train_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "scale.json"
    module.main(["--cpu-check", "--contexts", "160", "320", "--repeats", "1", "--answer", "8", "--out", str(out)])

    result = json.loads(out.read_text())
    assert result["cpu_check"] and "random" in result["weights"] and set(result["models"]) == set(module.CPU_MODELS)
    assert {"git_commit", "torch", "device"} <= set(result["provenance"])
    assert module.LLAMA_3_1_8B["num_hidden_layers"] == 32 and module.QWEN_2_5_7B["num_key_value_heads"] == 4
    for entry in result["models"].values():
        rows = entry["rows"]
        assert [(r["context"], r["stage"]) for r in rows] == [(160, 1), (160, 2), (320, 1), (320, 2)]
        for row in rows:
            parts = {"prefill", "teacher_answer", "student_answer", "backward", "optimizer"}
            assert parts | ({"binarize"} if row["stage"] == 2 else set()) == set(row["seconds"])
            assert all(v >= 0 for v in row["seconds"].values()) and row["trainer_step_seconds"] > 0
        hours = entry["projected_recipe_hours"]
        step1 = max(r["trainer_step_seconds"] for r in rows if r["stage"] == 1)
        assert 0 < hours["stage1"] <= 2000 * step1 / 3600 + 1e-3  # held at the longest measured length
        assert hours["stage2"] > 0
