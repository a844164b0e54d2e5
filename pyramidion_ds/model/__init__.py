"""Pyramidion in plain PyTorch, read top-down: topk → attention → layers → encoder → decoder → model."""

from .decoder import DecoderCache, StaticDecoderCache
from .encoder import EncoderOut, PoolingInfo
from .model import PyramidionModel
from .topk import TopKOutput, successive_halving_topk

__all__ = [
    "PyramidionModel",
    "EncoderOut",
    "PoolingInfo",
    "DecoderCache",
    "StaticDecoderCache",
    "TopKOutput",
    "successive_halving_topk",
]
