"""Argument checks of :func:`fused_wce.linear_cross_entropy`, run before any kernel launches.

Shape, dtype and device checks need no device values. Value checks (targets in range, weights finite and
non-negative, a positive normalizer) need them; :func:`count_tokens` does those together with counting the
tokens, so a call makes exactly one host synchronisation.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .options import FLOAT_DTYPES, LossOptions

INDEX_DTYPES = (torch.int64, torch.int32)


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_tensors(hidden, weight, target, token_weight, bias, normalizer, options: LossOptions) -> None:
    """Check the tensors (and the normalizer) without reading device values; raise TypeError/ValueError
    naming the argument. With an explicit or autocast compute dtype (``options.compute_dtype`` set before
    :meth:`LossOptions.resolved`), weight and bias may have any float dtype; otherwise they must have hidden's.
    """
    mixed_dtypes = options.casts_inputs or (isinstance(hidden, torch.Tensor)
                                            and torch.is_autocast_enabled(hidden.device.type))
    _require_tensor("hidden", hidden)
    _require_tensor("weight", weight)
    _require_tensor("target", target)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight.dtype must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.dtype != hidden.dtype and not mixed_dtypes:
        raise TypeError(f"weight.dtype ({weight.dtype}) must equal hidden.dtype ({hidden.dtype})")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H] with at least one dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    vocab_size, hidden_size = weight.shape
    if hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden's last dimension ({hidden.shape[-1]}) must equal weight.shape[1] ({hidden_size})")
    if vocab_size < 1 or hidden_size < 1:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got shape {tuple(weight.shape)}")
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must be int64 or int32, got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    _check_same_device("weight", weight, hidden)
    _check_same_device("target", target, hidden)
    if token_weight is not None:
        _require_tensor("token_weight", token_weight)
        if not token_weight.is_floating_point():
            raise TypeError(f"token_weight must be a floating-point tensor, got {token_weight.dtype}")
        if tuple(token_weight.shape) != tuple(target.shape):
            raise ValueError(f"token_weight shape {tuple(token_weight.shape)} must equal target shape {tuple(target.shape)}")
        if token_weight.requires_grad:
            raise ValueError("token_weight must not require grad: the loss is not differentiable in the weights")
        _check_same_device("token_weight", token_weight, hidden)
    if bias is not None:
        _require_tensor("bias", bias)
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias.dtype ({bias.dtype}) must equal weight.dtype ({weight.dtype})")
        if tuple(bias.shape) != (vocab_size,):
            raise ValueError(f"bias must have shape [V] = ({vocab_size},), got {tuple(bias.shape)}")
        _check_same_device("bias", bias, hidden)
    if normalizer is not None:
        if options.reduction == "none":
            raise ValueError("normalizer applies to reduced losses; it cannot be combined with reduction='none'")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.dim() != 0:
                raise ValueError(f"normalizer must be a float or a 0-d tensor, got shape {tuple(normalizer.shape)}")
            if normalizer.requires_grad:
                raise ValueError("normalizer must not require grad")
            if normalizer.device != hidden.device and normalizer.device.type != "cpu":
                raise ValueError(f"normalizer is on {normalizer.device}, hidden on {hidden.device}")
        elif isinstance(normalizer, numbers.Real) and not isinstance(normalizer, bool):
            if not (math.isfinite(normalizer) and normalizer > 0):
                raise ValueError(f"normalizer must be finite and > 0, got {normalizer}")
        else:
            raise TypeError(f"normalizer must be a float or a 0-d tensor, got {type(normalizer).__name__}")


def _check_same_device(name: str, tensor: torch.Tensor, hidden: torch.Tensor) -> None:
    if tensor.device != hidden.device:
        raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}; move them to one device")


@dataclass(frozen=True)
class CountedTokens:
    """Which flattened tokens count: ``index`` (int64 ``[n_counted]``, ascending) into the ``N`` tokens."""

    index: torch.Tensor
    n_counted: int


def count_tokens(target: torch.Tensor, token_weight: torch.Tensor | None, vocab_size: int, ignore_index: int,
                 normalizer) -> CountedTokens:
    """Count the tokens that count and check the device values, with one host synchronisation.

    ``target`` is ``[N]`` (int32/int64); ``token_weight`` is ``[N]`` float32 or None. A token counts when its
    target != ``ignore_index`` and its weight > 0. Raises ValueError for a target outside ``[0, V)`` (other
    than ``ignore_index``), a negative or non-finite weight, or a tensor normalizer that is not finite and > 0.
    """
    labelled = target != ignore_index
    counted = labelled if token_weight is None else labelled & (token_weight > 0)
    flags = [counted.sum(), (labelled & ((target < 0) | (target >= vocab_size))).any()]
    if token_weight is not None:
        flags.append((~torch.isfinite(token_weight) | (token_weight < 0)).any())
    if isinstance(normalizer, torch.Tensor):
        norm = normalizer.to(device=target.device, dtype=torch.float64)
        flags.append(~(torch.isfinite(norm) & (norm > 0)))
    values = torch.stack([f.to(torch.int64) for f in flags]).tolist()  # the call's one host synchronisation
    n_counted, bad_target = values[0], values[1]
    if bad_target:
        bad = target[labelled & ((target < 0) | (target >= vocab_size))]
        raise ValueError(f"target has values outside [0, V={vocab_size}) that are not ignore_index={ignore_index}: "
                         f"e.g. {bad[:5].tolist()}")
    if token_weight is not None and values[2]:
        raise ValueError("token_weight must be finite and >= 0 everywhere")
    if isinstance(normalizer, torch.Tensor) and values[-1]:
        raise ValueError(f"normalizer must be finite and > 0, got {normalizer.item()}")
    # nonzero_static knows its output size, so it needs no second synchronisation.
    index = torch.nonzero_static(counted, size=n_counted).view(-1)
    return CountedTokens(index=index, n_counted=n_counted)
