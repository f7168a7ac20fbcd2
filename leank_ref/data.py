"""Offline, seeded long-context examples built from text that ships with Python itself.

Three tasks, one output type (:class:`Example`):
- passkey retrieval: a 5-digit number hidden at a chosen depth of filler text, asked for at the end;
- key-value retrieval: several random ``key: value`` pairs spread through the text, one asked for;
- continuation: a stretch of the text as context, the next tokens as the answer (for distillation).

Two text sources fill the haystack (``source=``): ``"pydoc"``, CPython's documentation
(``pydoc_data.topics``, English prose), which training uses; and ``"stdlib"``, the source code of a fixed list
of standard-library modules (:data:`HELD_OUT_MODULES`, read with ``inspect.getsource``), which no training
builder touches: the evaluation's held-out text.

Examples are assembled at the token level (template prefix + filler tokens + needle + question), so the
requested length is hit exactly, and every call with the same arguments returns the same tokens (for one
Python version: both sources are the running interpreter's own files).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from functools import lru_cache

import torch

IGNORE_INDEX = -100
_PLACEHOLDER = "<<LEANK_CONTENT>>"


@dataclass
class Example:
    """One training/evaluation sequence: ``input_ids`` [T], context = ``input_ids[:length_context]``."""

    input_ids: torch.Tensor  # int64 [T]
    length_context: int  # index where the answer starts
    labels: torch.Tensor  # int64 [T], IGNORE_INDEX on the context
    answer: str  # the text a correct answer contains (e.g. the passkey digits)
    task: str
    meta: dict = field(default_factory=dict)

    @property
    def context_ids(self) -> torch.Tensor:
        """The prompt tokens [length_context], what a model is given before it answers."""
        return self.input_ids[: self.length_context]


SOURCES = ("pydoc", "stdlib")
HELD_OUT_MODULES = (  # pure-Python standard-library modules, concatenated in this order for the "stdlib" source
    "argparse",
    "calendar",
    "dataclasses",
    "difflib",
    "fractions",
    "heapq",
    "optparse",
    "pprint",
    "shutil",
    "statistics",
    "tarfile",
    "textwrap",
)


def check_source(source: str) -> None:
    """Raise unless ``source`` is one of :data:`SOURCES`."""
    if source not in SOURCES:
        raise ValueError(f"unknown text source '{source}'; choose one of {list(SOURCES)}.")


@lru_cache(maxsize=2)
def haystack_text(source: str = "pydoc") -> str:
    """The filler text: every topic of CPython's pydoc_data in sorted order (about 465K characters of English), or,
    for ``source="stdlib"``, the source code of :data:`HELD_OUT_MODULES` (never used in training)."""
    check_source(source)
    if source == "stdlib":
        import importlib
        import inspect

        return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in HELD_OUT_MODULES)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def haystack_sha256(source: str = "pydoc") -> str:
    """SHA-256 of :func:`haystack_text`: the prompts a seed builds depend on it, and it changes with the Python
    version (both sources are the running interpreter's own files)."""
    return hashlib.sha256(haystack_text(source).encode()).hexdigest()


@lru_cache(maxsize=8)
def _haystack_ids(tokenizer, source: str = "pydoc") -> tuple[int, ...]:
    return tuple(tokenizer(haystack_text(source), add_special_tokens=False)["input_ids"])


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_parts(tokenizer) -> tuple[str, str]:
    """Text before and after the user's message in the chat template (plain text if there is none)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True, tokenize=False
        )
        before, after = rendered.split(_PLACEHOLDER)
        return before, after
    return "", "\nAnswer: "


def _check_length(tokenizer, length: int, overhead: int, max_length: int | None) -> int:
    limit = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 10**7 and length > limit:
        raise ValueError(
            f"length={length} tokens exceeds the model's context limit of {limit}; ask for length <= {limit}."
        )
    if length <= overhead + 16:
        raise ValueError(
            f"length={length} is too short: the template, needle and question alone take {overhead} tokens; "
            f"ask for length >= {overhead + 64}."
        )
    return length - overhead


def _check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1] (0 = start of the text, 1 = end).")


def _filler(tokenizer, n: int, rng: random.Random, source: str = "pydoc") -> list[int]:
    ids = _haystack_ids(tokenizer, source)
    if n > len(ids):
        raise ValueError(f"asked for {n} filler tokens but the haystack holds only {len(ids)}.")
    start = rng.randrange(0, len(ids) - n + 1)
    return list(ids[start : start + n])


def _sentence_cut(tokenizer, filler: list[int], target: int) -> int:
    """Index near ``target`` just after a token that ends a sentence or line, so a needle is not mid-word."""
    for radius in range(0, 40):
        for i in (target - radius, target + radius):
            if 0 < i <= len(filler) and tokenizer.decode([filler[i - 1]]).rstrip(" ").endswith((".", "\n")):
                return i
    return min(max(target, 0), len(filler))


def _assemble(tokenizer, pieces: list[list[int]], answer_ids: list[int]) -> tuple[torch.Tensor, int, torch.Tensor]:
    context = [t for piece in pieces for t in piece]
    ids = torch.tensor(context + answer_ids, dtype=torch.long)
    labels = ids.clone()
    labels[: len(context)] = IGNORE_INDEX
    return ids, len(context), labels


def _answer_ids(tokenizer, text: str) -> list[int]:
    end = []
    if getattr(tokenizer, "chat_template", None) and tokenizer.eos_token_id is not None:
        end = [tokenizer.eos_token_id]
    return _encode(tokenizer, text) + end


def passkey_example(
    tokenizer, length: int, depth: float, seed: int = 0, max_length: int | None = None, source: str = "pydoc"
) -> Example:
    """A passkey prompt of exactly ``length`` tokens with the key at relative ``depth`` of the filler."""
    _check_depth(depth)
    check_source(source)
    rng = random.Random(f"passkey-{seed}-{length}-{depth}")
    key = str(rng.randint(10000, 99999))
    before, after = _chat_parts(tokenizer)
    head = _encode(
        tokenizer, before + "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    )
    needle = _encode(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key.\n")
    tail = _encode(tokenizer, "\n\nWhat is the pass key?" + after)
    n_fill = _check_length(tokenizer, length, len(head) + len(needle) + len(tail), max_length)
    filler = _filler(tokenizer, n_fill, rng, source)
    cut = _sentence_cut(tokenizer, filler, round(depth * n_fill))
    ids, n_ctx, labels = _assemble(
        tokenizer, [head, filler[:cut], needle, filler[cut:], tail], _answer_ids(tokenizer, f"The pass key is {key}.")
    )
    meta = {"depth": depth, "length": length, "seed": seed, "source": source}
    return Example(ids, n_ctx, labels, key, "passkey", meta)


def kv_retrieval_example(
    tokenizer, length: int, num_pairs: int = 4, seed: int = 0, max_length: int | None = None, source: str = "pydoc"
) -> Example:
    """``num_pairs`` random ``key: value`` records spread through the filler; the question asks for one of them."""
    check_source(source)
    if num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs} must be >= 1.")
    rng = random.Random(f"kv-{seed}-{length}-{num_pairs}")
    keys = ["".join(rng.choice("abcdefghjkmnpqrstuvwxyz") for _ in range(6)) for _ in range(num_pairs)]
    values = [str(rng.randint(10000, 99999)) for _ in range(num_pairs)]
    target = rng.randrange(num_pairs)
    before, after = _chat_parts(tokenizer)
    head = _encode(
        tokenizer, before + "The text below hides several records of the form 'key: value'. Read them carefully.\n\n"
    )
    records = [_encode(tokenizer, f" Record {k}: {v}.\n") for k, v in zip(keys, values)]
    tail = _encode(tokenizer, f"\n\nWhat is the value of record {keys[target]}?" + after)
    overhead = len(head) + len(tail) + sum(len(r) for r in records)
    n_fill = _check_length(tokenizer, length, overhead, max_length)
    filler = _filler(tokenizer, n_fill, rng, source)
    cuts = [_sentence_cut(tokenizer, filler, round((i + 0.5) / num_pairs * n_fill)) for i in range(num_pairs)]
    cuts = sorted(cuts)
    pieces, prev = [head], 0
    for cut, record in zip(cuts, records):
        pieces += [filler[prev:cut], record]
        prev = cut
    pieces += [filler[prev:], tail]
    answer = values[target]
    ids, n_ctx, labels = _assemble(
        tokenizer, pieces, _answer_ids(tokenizer, f"The value of record {keys[target]} is {answer}.")
    )
    return Example(
        ids,
        n_ctx,
        labels,
        answer,
        "kv_retrieval",
        {"length": length, "num_pairs": num_pairs, "key": keys[target], "seed": seed, "source": source},
    )


def continuation_example(
    tokenizer,
    length: int,
    answer_length: int = 32,
    seed: int = 0,
    max_length: int | None = None,
    source: str = "pydoc",
) -> Example:
    """Plain text of ``source``: ``length`` context tokens, then the true next ``answer_length`` tokens."""
    check_source(source)
    if answer_length < 1:
        raise ValueError(f"answer_length={answer_length} must be >= 1.")
    _check_length(tokenizer, length + answer_length, 0, max_length)
    rng = random.Random(f"continuation-{seed}-{length}-{answer_length}")
    tokens = _filler(tokenizer, length + answer_length, rng, source)
    ids, n_ctx, labels = _assemble(tokenizer, [tokens[:length]], tokens[length:])
    return Example(
        ids,
        n_ctx,
        labels,
        tokenizer.decode(tokens[length:]),
        "continuation",
        {"length": length, "answer_length": answer_length, "seed": seed, "source": source},
    )


TASKS = {"passkey": passkey_example, "kv_retrieval": kv_retrieval_example, "continuation": continuation_example}


def make_example(task: str, tokenizer, length: int, seed: int = 0, **kwargs) -> Example:
    """Build one example of ``task`` (one of :data:`TASKS`); extra keyword arguments go to its builder."""
    if task not in TASKS:
        raise ValueError(f"Unknown task '{task}'; choose one of {sorted(TASKS)}.")
    if task == "passkey" and "depth" not in kwargs:
        kwargs["depth"] = random.Random(f"depth-{seed}-{length}").random()
    return TASKS[task](tokenizer, length, seed=seed, **kwargs)
