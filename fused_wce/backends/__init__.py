"""Execution paths of a pass: each module's ``run_pass(PassRequest) -> PassResult`` computes the same
:mod:`fused_wce.loss_math` over the counted tokens (:mod:`fused_wce.passes`); ``slice_summaries(request)`` and
``slice_gradients(request, lse, num_classes)`` are its two halves for one slice of the vocabulary.

- :mod:`.triton_chunks`: Triton kernels and cuBLAS GEMMs (CUDA tensors; CPU tensors under TRITON_INTERPRET=1);
- :mod:`.torch_blocks`: plain PyTorch on ``[C, B]`` logit blocks (CPU tensors, or ``backend="torch"``).
"""
from __future__ import annotations

import os

import torch

from . import torch_blocks


def backend_for(backend: str, device: torch.device):
    """The module that runs a pass for ``backend`` ("auto", "triton", "torch") on ``device``."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return torch_blocks
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 "
                         "(Triton's CPU interpreter, set before triton is imported)")
    from . import triton_chunks  # imported lazily: CPU users never need triton

    return triton_chunks
