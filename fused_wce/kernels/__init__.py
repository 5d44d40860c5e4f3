"""Triton kernels of fused_wce and their thin launchers (one kernel a file).

- :mod:`.vocab_partials`: logit tiles ``hidden @ weight.T + bias`` in fp32 registers, folded into online
  logsumexp summaries per vocabulary split; optionally stores the tile-relative logits of a chunk.
- :mod:`.combine`: merges the splits' summaries into per-token loss, lse, entropy and top-1.
- :mod:`.softmax_grad`: turns a chunk's stored logits into ``dlogits`` in place.
- :mod:`.logit_rows`: from a chunk's fp32 logits written by cuBLAS, the per-token outputs and ``dlogits`` in
  place, one program per row.

The logits GEMM of the cuBLAS plan and the two gradient GEMMs (``dlogits @ weight``, ``dlogits.T @ hidden``) are cuBLAS calls in
:mod:`fused_wce._triton_backend`: they read a materialised ``[chunk, V]`` buffer, which is what cuBLAS is
tuned for.
"""
from .combine import combine, combine_kernel
from .configs import (FP32_CONFIGS, INTERPRETER_CONFIGS, SM80_CONFIGS, SM90_CONFIGS, KernelConfig, KernelConfigs,
                      configs_for, gpu_configs)
from .logit_rows import logit_rows, logit_rows_kernel
from .softmax_grad import softmax_grad, softmax_grad_kernel
from .vocab_partials import vocab_partials, vocab_partials_kernel

__all__ = [
    "FP32_CONFIGS", "INTERPRETER_CONFIGS", "SM80_CONFIGS", "SM90_CONFIGS", "KernelConfig", "KernelConfigs",
    "combine", "combine_kernel", "configs_for", "gpu_configs", "logit_rows", "logit_rows_kernel",
    "softmax_grad", "softmax_grad_kernel", "vocab_partials", "vocab_partials_kernel",
]
