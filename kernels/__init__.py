"""Triton decode kernels (installed as ``leank_ref.kernels``): dense and LeanK flash decoding.

``launch`` (launch parameters, split plans, input checks), ``decode_dense`` (the dense kernel), ``leank_kernel``
(the LeanK kernel), ``leank_decoder`` (its per-layer host side) and ``decode_leank`` (the one-call form).
"""

from .decode_dense import dense_decode, dense_decode_reference
from .decode_leank import leank_decode
from .launch import DecodeConfig
from .leank_decoder import LeanKDecoder

__all__ = ["DecodeConfig", "LeanKDecoder", "dense_decode", "dense_decode_reference", "leank_decode"]
