"""Triton decode kernels (installed as ``leank_ref.kernels``): dense and LeanK flash decoding."""

from .decode_dense import DecodeConfig, dense_decode, dense_decode_reference
from .decode_leank import (
    HeadGroups,
    LeanKDecoder,
    MiddleGroup,
    leank_decode,
    leank_decode_reference,
    leank_layout_from_dense,
    masked_dense_reference,
)

__all__ = [
    "DecodeConfig",
    "HeadGroups",
    "LeanKDecoder",
    "MiddleGroup",
    "dense_decode",
    "dense_decode_reference",
    "leank_decode",
    "leank_decode_reference",
    "leank_layout_from_dense",
    "masked_dense_reference",
]
