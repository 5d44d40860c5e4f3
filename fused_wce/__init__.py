"""fused_wce: fused, chunked, per-token-weighted linear cross-entropy.

``linear_cross_entropy(hidden, weight, target, token_weight)`` computes the weighted cross-entropy of
``hidden @ weight.T`` without allocating the ``[N, V]`` logits: Triton kernels on CUDA, a chunked PyTorch path
on CPU, both implementing :mod:`fused_wce.loss_math`.
"""
from ._passes import CPU_CHUNK_BUDGET_BYTES, DEFAULT_CHUNK_BUDGET_BYTES
from .functional import linear_cross_entropy
from .module import LinearCrossEntropy
from .reference import reference_linear_cross_entropy
from .types import LossOutput

__all__ = [
    "CPU_CHUNK_BUDGET_BYTES",
    "DEFAULT_CHUNK_BUDGET_BYTES",
    "LinearCrossEntropy",
    "LossOutput",
    "linear_cross_entropy",
    "reference_linear_cross_entropy",
]
__version__ = "0.1.0"
