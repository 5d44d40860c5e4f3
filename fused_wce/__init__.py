"""fused_wce: fused, chunked, per-token-weighted linear cross-entropy.

``linear_cross_entropy(hidden, weight, target, token_weight)`` computes the weighted cross-entropy of
``hidden @ weight.T`` without allocating the ``[N, V]`` logits: Triton kernels and cuBLAS on CUDA, a blocked
PyTorch path on CPU, both implementing :mod:`fused_wce.loss_math`. ``linear_log_prob(hidden, weight, target)``
gives the per-token log-probabilities (and entropies) an RL loss needs, the same way.
"""
from .budget import CPU_CHUNK_BUDGET_BYTES, DEFAULT_CHUNK_BUDGET_BYTES
from .functional import linear_cross_entropy, linear_log_prob
from .module import LinearCrossEntropy
from .options import LossOptions
from .outputs import LossOutput
from .reference import reference_linear_cross_entropy, reference_linear_log_prob

__all__ = [
    "CPU_CHUNK_BUDGET_BYTES",
    "DEFAULT_CHUNK_BUDGET_BYTES",
    "LinearCrossEntropy",
    "LossOptions",
    "LossOutput",
    "linear_cross_entropy",
    "linear_log_prob",
    "reference_linear_cross_entropy",
    "reference_linear_log_prob",
]
__version__ = "0.1.0"
