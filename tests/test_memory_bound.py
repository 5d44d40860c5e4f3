"""No tensor with N * V elements is ever allocated: the logits are never materialised."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_wce
from conftest import INTERPRETING
from helpers import make_problem


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op produces (every allocation a torch op makes)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.set_.source_Storage:
            return out  # re-points a tensor at existing storage: no allocation
        for tensor in torch.utils._pytree.tree_leaves(out):
            # Triton's CPU interpreter copies each kernel argument's untyped (uint8) storage around a launch;
            # a GPU launch makes no such copy, and fused_wce itself never creates uint8 tensors.
            if isinstance(tensor, torch.Tensor) and not (INTERPRETING and tensor.dtype == torch.uint8):
                self.shapes.append((str(func), tuple(tensor.shape)))
        return out

    def largest(self):
        return max(self.shapes, key=lambda item: torch.Size(item[1]).numel())


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_allocation_of_n_times_v(path, reduction, dtype):
    # N > H so that the legitimate O(V * H) gradient buffers are smaller than N * V.
    num_tokens, hidden_size, vocab_size, chunk = 96, 24, 700, 16
    problem = make_problem((num_tokens,), hidden_size, vocab_size, dtype, path[0], bias=True,
                           ignore_fraction=0.0, zero_weight_fraction=0.0)
    recorder = AllocationRecorder()
    with recorder:
        loss = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                              problem.token_weight, bias=problem.bias, reduction=reduction,
                                              chunk_size=chunk, backend=path[1])
        loss.backward(torch.ones_like(loss))
    name, shape = recorder.largest()
    assert torch.Size(shape).numel() < num_tokens * vocab_size, f"{name} allocated {shape}"
    # and the chunk bound holds: nothing [V]-wide has more than chunk rows
    wide = [s for _, s in recorder.shapes if len(s) == 2 and s[1] == vocab_size]
    assert wide and all(s[0] <= 2 * chunk for s in wide), wide


def test_default_chunk_follows_budget():
    from fused_wce._passes import DEFAULT_CHUNK_BUDGET_BYTES, PassRequest, chunk_rows

    weight = torch.empty(128256, 8, dtype=torch.bfloat16)
    request = PassRequest(hidden=torch.empty(0, 8), weight=weight, bias=None, target=torch.empty(0))
    rows = chunk_rows(request, bytes_per_element=2, multiple=128)
    assert rows % 128 == 0 and rows * 128256 * 2 <= DEFAULT_CHUNK_BUDGET_BYTES < (rows + 128) * 128256 * 2
