"""Data builders: deterministic, exact lengths, the needle inside, labels only on the answer."""

import pytest
import torch

from leank_ref.data import IGNORE_INDEX, TASKS, make_example, passkey_example

LENGTHS = [200, 517]


def _examples(tokenizer, length, seed):
    return {
        "passkey": make_example("passkey", tokenizer, length, seed=seed, depth=0.5),
        "kv_retrieval": make_example("kv_retrieval", tokenizer, length, seed=seed, num_pairs=3),
        "continuation": make_example("continuation", tokenizer, length, seed=seed, answer_length=24),
    }


@pytest.mark.parametrize("length", LENGTHS)
def test_builders_are_deterministic_and_seeded(tokenizer, length):
    first, again, other = (_examples(tokenizer, length, s) for s in (0, 0, 1))
    for task in TASKS:
        assert torch.equal(first[task].input_ids, again[task].input_ids), task
        assert first[task].answer == again[task].answer, task
        assert not torch.equal(first[task].input_ids, other[task].input_ids), (
            f"{task}: seeds 0 and 1 gave the same tokens"
        )


@pytest.mark.parametrize("length", LENGTHS)
def test_exact_length_and_labels(tokenizer, length):
    for task, ex in _examples(tokenizer, length, seed=3).items():
        assert ex.length_context == length, task
        assert ex.context_ids.shape == (length,), task
        assert ex.input_ids.dtype == torch.long and ex.labels.shape == ex.input_ids.shape, task
        assert (ex.labels[:length] == IGNORE_INDEX).all(), task
        assert torch.equal(ex.labels[length:], ex.input_ids[length:]), task
        assert len(ex.input_ids) > length, f"{task}: no answer tokens"
        assert ex.answer in tokenizer.decode(ex.input_ids[length:]), task


def test_continuation_answer_length(tokenizer):
    ex = make_example("continuation", tokenizer, 300, seed=0, answer_length=24)
    assert len(ex.input_ids) == 324


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_needle_in_context_at_depth(tokenizer, depth):
    ex = passkey_example(tokenizer, 600, depth, seed=2)
    context = tokenizer.decode(ex.context_ids)
    needle = f"The pass key is {ex.answer}."
    assert needle in context
    relative = context.index(needle) / len(context)
    assert abs(relative - depth) < 0.15, f"needle at {relative:.2f} of the context, asked for depth {depth}"


def test_kv_retrieval_record_in_context(tokenizer):
    ex = make_example("kv_retrieval", tokenizer, 400, seed=5, num_pairs=4)
    context = tokenizer.decode(ex.context_ids)
    assert f"Record {ex.meta['key']}: {ex.answer}." in context
    assert context.count("Record ") == 4  # the four records (the question says "record")
    assert ex.meta["key"] in context[-200:]


@pytest.mark.parametrize("depth", [-0.1, 1.5])
def test_depth_outside_unit_interval(tokenizer, depth):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        passkey_example(tokenizer, 300, depth)


def test_length_beyond_model_limit(model, tokenizer):
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's context limit of {limit}; ask for length <= {limit}"):
        passkey_example(tokenizer, limit + 1, 0.5, max_length=limit)


def test_length_too_short(tokenizer):
    with pytest.raises(ValueError, match="too short.*ask for length >="):
        passkey_example(tokenizer, 20, 0.5)


def test_unknown_task(tokenizer):
    with pytest.raises(ValueError, match="Unknown task 'summary'; choose one of"):
        make_example("summary", tokenizer, 300)


def test_held_out_source_is_standard_library_code_never_the_training_text(tokenizer):
    from leank_ref.data import HELD_OUT_MODULES, haystack_text

    held_out, train = haystack_text("stdlib"), haystack_text("pydoc")
    assert "def " in held_out and "class ArgumentParser" in held_out and len(held_out) > 200_000
    assert held_out[:2000] not in train
    for task in TASKS:
        a = make_example(task, tokenizer, 300, seed=1, source="stdlib")
        b = make_example(task, tokenizer, 300, seed=1)
        assert a.input_ids.numel() == b.input_ids.numel() and not torch.equal(a.input_ids, b.input_ids)
        assert a.meta["source"] == "stdlib" and b.meta["source"] == "pydoc"
        assert torch.equal(a.input_ids, make_example(task, tokenizer, 300, seed=1, source="stdlib").input_ids)
    assert len(HELD_OUT_MODULES) == len(set(HELD_OUT_MODULES))
    with pytest.raises(ValueError, match="unknown text source 'web'"):
        make_example("passkey", tokenizer, 300, seed=1, source="web")
