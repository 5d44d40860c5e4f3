"""No tensor with N * V elements is ever allocated: the logits are never materialised."""
from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_wce
from conftest import INTERPRETING
from helpers import make_problem, run_inside_custom_op


@pytest.fixture
def path(every_plan_path):
    """Every execution path, and both logits plans of the Triton path."""
    return every_plan_path


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op produces (every allocation a torch op makes)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = run_inside_custom_op(self, func, args, kwargs)
        if inside is not None:
            return inside
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
    from fused_wce.budget import DEFAULT_CHUNK_BUDGET_BYTES, chunk_rows

    for bytes_per_logit in (2, 4):
        rows = chunk_rows(128256, bytes_per_logit, budget=DEFAULT_CHUNK_BUDGET_BYTES, multiple=128)
        assert rows % 128 == 0
        assert rows * 128256 * bytes_per_logit <= DEFAULT_CHUNK_BUDGET_BYTES < (rows + 128) * 128256 * bytes_per_logit


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created by torch ops during the mode (views and in-place results share an
    argument's storage and are not new; a storage is freed when its last tensor dies)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.peak_op = ""

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = run_inside_custom_op(self, func, args, kwargs)
        if inside is not None:
            return inside
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or (INTERPRETING and tensor.dtype == torch.uint8):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            weakref.finalize(storage, self._free, key)
            self.current += storage.nbytes()
            if self.current > self.peak:
                self.peak, self.peak_op = self.current, str(func)
        return out


OPTIONS = {
    "mean": dict(reduction="mean"),
    "sum+normalizer": dict(reduction="sum", normalizer=7.0),
    "none": dict(reduction="none"),
    "stats": dict(return_stats=True),
    "frozen_weight": dict(frozen="weight"),
    "frozen_hidden": dict(frozen="hidden"),
    "no_grad": dict(no_grad=True),
    "no_bias": dict(bias=False),
    "variants": dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, logit_scale=0.7, dft=True),
}


def _documented_bound(path, dtype, num_tokens, hidden_size, vocab_size, budget) -> tuple[int, int]:
    """(chunk term, O(N H + V H + N + V) term) of docs/design.md's allocation formulas, in bytes."""
    # every plan's chunk (or block) buffers fit the budget, counted in the compute dtype; the cuBLAS plan holds
    # those rows in fp32, the tiled plan adds its per-tile summaries
    b = torch.tensor([], dtype=dtype).element_size()
    chunk_term = budget
    if path[1] == "triton" and len(path) == 2:
        chunk_term = budget * 4 // b
    if len(path) == 3:
        chunk_term += 4 * (budget // (vocab_size * b)) * -(-vocab_size // 128) * 4
    # fp32 weight copy + fp32 grad_weight + grad_weight cast, gathered hidden + grad_hidden (fp32 upcast
    # chunk on CPU) + its scatter, per-token vectors (~16 [N] fp32/int64), per-vocabulary vectors ([V] bias terms)
    linear_term = 3 * vocab_size * hidden_size * 4 + 4 * num_tokens * hidden_size * 4 + 64 * num_tokens * 8 \
        + 8 * vocab_size * 4
    return chunk_term, linear_term


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_option_stays_within_the_budget(path, dtype, option, monkeypatch):
    """No [N, V] allocation on any path and option, and peak live bytes <= chunk budget + O(N H + V H)."""
    if path[:2] == ("cpu", "triton") and dtype == torch.float32 and option not in ("mean", "none"):
        pytest.skip("the interpreter runs every option in bf16; fp32 only the two gradient plans (time)")
    num_tokens, hidden_size, vocab_size = 320, 8, 900
    # the default chunk size from a (small) budget: well below the [N, V] logits
    budget = 16 * vocab_size * 8
    monkeypatch.setattr(fused_wce.budget, "DEFAULT_CHUNK_BUDGET_BYTES", budget)
    monkeypatch.setattr(fused_wce.budget, "CPU_CHUNK_BUDGET_BYTES", budget)
    kwargs = dict(OPTIONS[option])
    frozen, no_grad, with_bias = kwargs.pop("frozen", None), kwargs.pop("no_grad", False), kwargs.pop("bias", True)
    problem = make_problem((num_tokens,), hidden_size, vocab_size, dtype, path[0], bias=with_bias,
                           ignore_fraction=0.1, zero_weight_fraction=0.1, seed=3)
    if frozen:
        getattr(problem, frozen).requires_grad_(False)
    shapes, live = AllocationRecorder(), LiveBytes()
    with shapes, live:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            out = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                 problem.token_weight, bias=problem.bias, backend=path[1],
                                                 **kwargs)
        loss = out.loss if isinstance(out, fused_wce.LossOutput) else out
        if loss.requires_grad:
            loss.backward(torch.ones_like(loss))
        del out, loss
    name, shape = shapes.largest()
    assert torch.Size(shape).numel() < num_tokens * vocab_size, f"{name} allocated {shape}"
    chunk_term, linear_term = _documented_bound(path, dtype, num_tokens, hidden_size, vocab_size, budget)
    logits_bytes = num_tokens * vocab_size * 4
    assert chunk_term + linear_term < logits_bytes / 2  # the bound discriminates: [N, V] fp32 logits break it
    assert live.peak <= chunk_term + linear_term, (
        f"peak {live.peak} B (at {live.peak_op}) > chunk {chunk_term} B + linear {linear_term} B")
