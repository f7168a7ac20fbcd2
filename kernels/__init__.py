"""Triton decode kernels (installed as ``leank_ref.kernels``)."""
