"""The accuracy reference: loss and gradients in fp32 on the same inputs, chunked so it fits next to the inputs.

For a ``16384 x 128256`` problem the float64 reference of ``fused_wce.reference_linear_cross_entropy`` would
materialise 16 GiB of logits plus as much again for autograd; this computes the same quantity in true fp32 (TF32
off), chunk by chunk over the counted tokens, with the gradient written out explicitly:
``dL/dz_i = (w_i / sum w) (softmax(z_i) - onehot(t_i))``, ``dH_i = dz_i W`` and ``dW = sum_i dz_i^T h_i``.

Loss variants (fused_wce's keywords) are computed the same way, from the transformed logits
``z = c tanh(s u / c)`` of the raw logits ``u = h W^T`` (softcap ``c``, logit scale ``s``): the per-token loss
``l = (1 - eps) (lse - z_t) + eps (lse - mean_v z) + lam lse^2``, times ``f = sg(exp(z_t - lse))`` with DFT, and
``dL/du = (w f / sum w) (p (1 + 2 lam lse) - (1 - eps) onehot(t) - eps / V) (1 - (z / c)^2) s``.
The smoke test checks it against ``fused_wce.reference_linear_cross_entropy`` (float64) for every variant.

The log-prob workloads' objective (``benchmarks.workloads.policy_objective``) is computed the same way
(:func:`fp32_log_prob_reference`): ``L = -(1/M) sum_i (a_i log p_i(t_i) + b H_i)`` with
``dL/du = (1/M) (a (p - onehot(t)) + b p (log p + H)) (1 - (z / c)^2) s``.
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
                   need_grad_weight: bool = True, chunk_bytes: int = CHUNK_BYTES, *, label_smoothing: float = 0.0,
                   z_loss: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
                   dft: bool = False) -> Reference:
    """Weighted mean cross-entropy of ``hidden @ weight.T`` (with a loss variant) and its gradients, in fp32.

    hidden ``[N, H]``, weight ``[V, H]`` (any float dtype; upcast), target ``[N]`` int64, token_weight ``[N]``
    float32 (tokens count where target != IGNORE_INDEX and weight > 0). The variant keywords are
    fused_wce.linear_cross_entropy's. With a softcap each chunk holds two ``[rows, V]`` fp32 blocks, else one.
    """
    plain = not (label_smoothing or z_loss or softcap is not None or logit_scale != 1.0 or dft)
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
            if plain:
                lse = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, t[:, None]).squeeze(1)
                loss_sum += (w.double() * (lse - target_logit).double()).sum()
                grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                grad_logits[torch.arange(rows.numel(), device=rows.device), t] -= 1.0
                grad_logits.mul_((w / total_weight.float())[:, None])
            else:
                grad_logits, token_loss = _variant_chunk(logits, t, label_smoothing, z_loss, softcap, logit_scale, dft)
                loss_sum += (w.double() * token_loss).sum()
                grad_logits.mul_((w / total_weight.float())[:, None])
            grad_hidden.index_copy_(0, rows, grad_logits @ weight32)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h)
    return Reference(loss=loss_sum / total_weight, grad_hidden=grad_hidden, grad_weight=grad_weight)


def _variant_chunk(logits, t, label_smoothing, z_loss, softcap, logit_scale, dft):
    """One chunk of a loss variant: (``dl/du`` per row, unweighted, in place of ``logits``; float64 ``[rows]`` loss,
    DFT factor included). ``logits`` ``[rows, V]`` fp32 are the raw ``u = h W^T``."""
    rows, vocab = logits.shape
    z = logits.mul_(logit_scale) if logit_scale != 1.0 else logits
    softcap_slope = None
    if softcap is not None:
        z = z.div_(softcap).tanh_()
        softcap_slope = 1.0 - z.square()  # d(c tanh(a / c)) / da = 1 - tanh^2, a second [rows, V] block
        z = z.mul_(softcap)
    lse = torch.logsumexp(z, dim=-1)
    target_logit = z.gather(1, t[:, None]).squeeze(1)
    token_loss = (lse - target_logit).double()
    if label_smoothing:
        token_loss = (1.0 - label_smoothing) * token_loss + label_smoothing * (lse.double() - z.double().mean(-1))
    if z_loss:
        token_loss = token_loss + z_loss * lse.double().square()
    factor = torch.exp(target_logit - lse) if dft else None
    if factor is not None:
        token_loss = token_loss * factor.double()
    grad = z.sub_(lse[:, None]).exp_()  # softmax, in place
    if z_loss:
        grad.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
    if label_smoothing:
        grad.sub_(label_smoothing / vocab)
    grad[torch.arange(rows, device=t.device), t] -= 1.0 - label_smoothing
    if factor is not None:
        grad.mul_(factor[:, None])
    if softcap_slope is not None:
        grad.mul_(softcap_slope)
    if logit_scale != 1.0:
        grad.mul_(logit_scale)
    return grad, token_loss


@torch.no_grad()
def fp32_log_prob_reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                            advantage: torch.Tensor, need_grad_weight: bool = True, chunk_bytes: int = CHUNK_BYTES, *,
                            softcap: float | None = None, logit_scale: float = 1.0) -> Reference:
    """``benchmarks.workloads.policy_objective`` of the log-probs and entropies of ``hidden @ weight.T`` (softcap,
    logit scale) and its gradients, in fp32, chunk by chunk over the counted rows (target != IGNORE_INDEX);
    ``advantage`` ``[N]`` float32. Each chunk holds up to three ``[rows, V]`` fp32 blocks."""
    from .workloads import ENTROPY_COEF

    weight32 = weight.float()
    index = (target != IGNORE_INDEX).nonzero().squeeze(1)
    count = max(index.numel(), 1)
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad_weight else None
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    rows_per_chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
    with full_fp32_matmul():
        for start in range(0, index.numel(), rows_per_chunk):
            rows = index[start:start + rows_per_chunk]
            h = hidden.index_select(0, rows).float()
            t, a = target.index_select(0, rows), advantage.index_select(0, rows).float()
            z = (h @ weight32.T).mul_(logit_scale)
            slope = None
            if softcap is not None:
                z = z.div_(softcap).tanh_()
                slope = 1.0 - z.square()
                z = z.mul_(softcap)
            log_p = z.sub_(torch.logsumexp(z, dim=-1)[:, None])
            p = log_p.exp()
            entropy = -(p * log_p).sum(-1)
            picked = log_p.gather(1, t[:, None]).squeeze(1)
            total += (a.double() * picked.double() + ENTROPY_COEF * entropy.double()).sum()
            # dL/dz = (1/M) (a (p - onehot) + b p (log p + H))
            grad = log_p.add_(entropy[:, None]).mul_(ENTROPY_COEF).add_(a[:, None]).mul_(p)
            grad[torch.arange(rows.numel(), device=rows.device), t] -= a
            grad.div_(count)
            if slope is not None:
                grad.mul_(slope)
            if logit_scale != 1.0:
                grad.mul_(logit_scale)
            grad_hidden.index_copy_(0, rows, grad @ weight32)
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h)
    return Reference(loss=-total / count, grad_hidden=grad_hidden, grad_weight=grad_weight)


def workload_reference(workload, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                       token_weight: torch.Tensor) -> Reference:
    """The fp32 reference of a workload's objective (the loss with its variant, or the log-prob objective with the
    token weights as advantages) on the given inputs."""
    if workload.objective == "log_prob":
        return fp32_log_prob_reference(hidden, weight, target, token_weight, need_grad_weight=not workload.frozen_head,
                                       **workload.loss_keywords)
    return fp32_reference(hidden, weight, target, token_weight, need_grad_weight=not workload.frozen_head,
                          **workload.loss_keywords)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` (Frobenius), in fp32/fp64; 0/0 reads as 0."""
    reference_norm = torch.linalg.vector_norm(reference, dtype=torch.float64).item()
    # The difference in fp32 keeps memory at one fp32 copy; its norm accumulates in float64.
    difference_norm = torch.linalg.vector_norm(value.float() - reference.float(), dtype=torch.float64).item()
    if reference_norm == 0.0:
        return 0.0 if difference_norm == 0.0 else float("inf")
    return difference_norm / reference_norm
