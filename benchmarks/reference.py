"""The accuracy reference: loss and gradients in fp32 on the same inputs, chunked so it fits next to the inputs.

For a ``16384 x 128256`` problem the float64 reference of ``fused_wce.reference_linear_cross_entropy`` would
materialise 16 GiB of logits plus as much again for autograd; this computes the same quantity in true fp32 (TF32
off), chunk by chunk over the counted tokens, with the gradient written out explicitly:
``dL/dz_i = (w_i / sum w) (softmax(z_i) - onehot(t_i))``, ``dH_i = dz_i W`` and ``dW = sum_i dz_i^T h_i``.
The smoke test checks it against ``fused_wce.reference_linear_cross_entropy`` (float64).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 1 << 30  # fp32 logits per chunk


@dataclass
class Reference:
    """loss (float64 0-d), grad_hidden ``[N, H]`` fp32, grad_weight ``[V, H]`` fp32 or None."""

    loss: torch.Tensor
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor | None


@contextlib.contextmanager
def full_fp32_matmul():
    """TF32 off for the duration (the reference must be fp32, not 10-bit-mantissa TF32)."""
    previous = torch.get_float32_matmul_precision()
    previous_cuda = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        torch.backends.cuda.matmul.allow_tf32 = previous_cuda


@torch.no_grad()
def fp32_reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor,
                   need_grad_weight: bool = True, chunk_bytes: int = CHUNK_BYTES) -> Reference:
    """Weighted mean cross-entropy of ``hidden @ weight.T`` and its gradients, in fp32.

    hidden ``[N, H]``, weight ``[V, H]`` (any float dtype; upcast), target ``[N]`` int64, token_weight ``[N]``
    float32 (tokens count where target != IGNORE_INDEX and weight > 0).
    """
    vocab = weight.shape[0]
    weight32 = weight.float()
    counted = (target != IGNORE_INDEX) & (token_weight > 0)
    index = counted.nonzero().squeeze(1)
    total_weight = token_weight[index].double().sum()
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad_weight else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
    rows_per_chunk = max(1, chunk_bytes // (4 * vocab))
    with full_fp32_matmul():
        for start in range(0, index.numel(), rows_per_chunk):
            rows = index[start:start + rows_per_chunk]
            h = hidden.index_select(0, rows).float()
            t = target.index_select(0, rows)
            w = token_weight.index_select(0, rows)
            logits = h @ weight32.T
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            loss_sum += (w.double() * (lse - target_logit).double()).sum()
            grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            grad_logits[torch.arange(rows.numel(), device=rows.device), t] -= 1.0
            grad_logits.mul_((w / total_weight.float())[:, None])
            grad_hidden.index_copy_(0, rows, grad_logits @ weight32)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h)
    return Reference(loss=loss_sum / total_weight, grad_hidden=grad_hidden, grad_weight=grad_weight)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` (Frobenius), in fp32/fp64; 0/0 reads as 0."""
    reference_norm = torch.linalg.vector_norm(reference, dtype=torch.float64).item()
    # The difference in fp32 keeps memory at one fp32 copy; its norm accumulates in float64.
    difference_norm = torch.linalg.vector_norm(value.float() - reference.float(), dtype=torch.float64).item()
    if reference_norm == 0.0:
        return 0.0 if difference_norm == 0.0 else float("inf")
    return difference_norm / reference_norm
