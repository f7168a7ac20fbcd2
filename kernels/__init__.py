"""Triton decode kernels (installed as ``leank_ref.kernels``): dense and LeanK flash decoding."""

from .decode_dense import DecodeConfig, dense_decode, dense_decode_reference
from .decode_leank import (
    MiddleGroup,
    check_group_indices,
    leank_decode,
    leank_decode_reference,
    leank_layout_from_dense,
    masked_dense_reference,
)

__all__ = [
    "DecodeConfig",
    "MiddleGroup",
    "check_group_indices",
    "dense_decode",
    "dense_decode_reference",
    "leank_decode",
    "leank_decode_reference",
    "leank_layout_from_dense",
    "masked_dense_reference",
]
