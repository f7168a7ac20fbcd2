"""LeanK's two training stages (Zhang et al., 2025, Sec. 3), one module per concern.

* :mod:`~leank_ref.train.settings`: :class:`TrainSettings` (one run of one stage), named presets, scaling to
  any model (``TrainSettings.for_model``) and the command line that runs them.
* :mod:`~leank_ref.train.data`: the examples of a run and which of them each step and process uses.
* :mod:`~leank_ref.train.student`: the student's attention over a prefilled context (answer tokens only).
* :mod:`~leank_ref.train.loss`: prefill once, the distillation loss, stage 2's straight-through estimator.
* :mod:`~leank_ref.train.schedule`: the trapezoid learning-rate schedule.
* :mod:`~leank_ref.train.checkpoint`: factor files and checkpoints, checked against the model.
* :mod:`~leank_ref.train.distributed`: data parallelism over examples under ``torchrun`` (DDP on the factors).
* :mod:`~leank_ref.train.trainer`: the loop (AdamW, clamping, logging, resuming).
* :mod:`~leank_ref.train.outputs` and :mod:`~leank_ref.train.cli`: ``python -m leank_ref train``.
"""
