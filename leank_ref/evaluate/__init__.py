"""Accuracy of channel selectors at equal budget, paired against dense (notebook 06).

Protocol. Every sample is prefilled **once**, densely (LeanK's prefill is dense), by
:func:`leank_ref.attention.capture_prefill`, which records every layer's post-RoPE queries, keys and values.
Per-prompt selectors (ThinK, K-norm) pick their channels from that capture; then all methods decode *together*,
one batch row per (method, ratio, budget), through :class:`leank_ref.attention.SimulatedLeanKRows` (simulated
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
  itself reaches 0.8 in the dense scan (:func:`leank_ref.evaluate.scan.accuracy_lengths`): below that, a pruned
  model "beating" dense says more about the task than about the method.

The first answer token comes from the shared dense prefill, identical for every row, so it is left out of
``ll`` and ``kl`` (they average over the decode positions that pruning can change).

Text. Haystacks and continuations come from two sources (:mod:`leank_ref.data`): ``pydoc``, the text the masks
were trained on (other seeds), and ``stdlib``, standard-library source code that no training builder uses.

Comparisons (:mod:`leank_ref.stats`) are always paired by sample: a paired bootstrap interval of the per-sample
difference, an exact sign test for accuracies. A method *holds* where a loss of ``tolerance`` (0.05 nats per
token: the answer's per-token probability falls by at most ~5%) is excluded for both ``ll`` and ``kl``.

The modules, one concern each: ``grid`` (what a run measures: tasks, texts, lengths, ratios, windows, seeds),
``configs`` (the rows compared: a selector at a budget, and their cache memory), ``metrics`` (the per-answer
measures), ``sample`` (one sample: shared prefill, then every row decodes), ``report`` (result files),
``run`` (many samples, many processes, the analysis), ``scan`` (dense passkey accuracy by length),
``windows_grid`` (the window x length x ratio grid, each window with its own masks) and ``cli`` (the
``evaluate`` command).
"""
