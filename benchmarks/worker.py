"""One benchmark task in its own process: ``python -m benchmarks.worker TASK.json`` (``-``: the task on stdin).

The parent (:mod:`benchmarks.runner`) starts one worker per task so that a crash (an illegal memory access
poisons a CUDA context) loses one task only. The worker prints one ``@@ROW {json}`` line per finished
measurement; the parent collects them. It writes no file.

Task kinds:

- ``"loss"``: time, peak memory and accuracy of providers on workloads (``device`` "cuda" or "cpu"). On CPU the
  workloads of one task share their inputs (a problem and its loss variants); the float64 reference is computed
  in the task, every row's peak memory is measured on its own call (:func:`benchmarks.measure.cpu_peak_above`), and the
  timed repeats go round the rows in turn, so that a burst of load from other processes hits every row alike.
- ``"interpreter"``: fused_wce's Triton path under ``TRITON_INTERPRET=1`` against the reference (checked only).
- ``"gemm"``: the device's GEMM rate with ``torch.mm``.
- ``"e2e"``: one SFT training step of a small model, stock TRL loss vs fused_wce (:mod:`benchmarks.e2e`).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import traceback

ROW_PREFIX = "@@ROW "


def emit(row: dict) -> None:
    print(ROW_PREFIX + json.dumps(row, default=str), flush=True)


def main(argv: list[str]) -> int:
    if argv[0] == "-":
        task = json.load(sys.stdin)
    else:
        with open(argv[0]) as handle:
            task = json.load(handle)
    if task["kind"] == "interpreter":
        # Before triton is imported anywhere: @triton.jit reads it when a kernel is defined.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    torch.manual_seed(task.get("seed", 0))
    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    kind = task["kind"]
    if kind == "loss":
        run_loss_task(task)
    elif kind == "interpreter":
        run_interpreter_task(task)
    elif kind == "gemm":
        run_gemm_task(task)
    elif kind == "e2e":
        from .e2e import run_e2e_task

        run_e2e_task(task, emit)
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    return 0


# --- loss tasks -----------------------------------------------------------------------------------------------
def run_loss_task(task: dict) -> None:
    if task["device"] == "cpu":
        run_cpu_loss_task(task)
        return
    import torch

    from .providers import PROVIDERS_BY_NAME, Unavailable
    from .workloads import Workload, make_inputs

    device = task["device"]
    deadline = task.get("deadline")
    inputs, inputs_key = None, None
    # Providers per workload (a batch of loss variants), or the same list for every workload.
    provider_lists = task.get("workload_providers") or [task["providers"]] * len(task["workloads"])
    for workload_dict, provider_names in zip(task["workloads"], provider_lists):
        workload = Workload.from_dict(workload_dict)
        modes = [mode for mode in task["modes"] if mode in workload.modes]
        # Loss variants of one problem share its inputs (the same tensors as its plain row would draw).
        key = dataclasses.replace(workload, variant="plain", headline=False)
        if key != inputs_key:
            inputs = None
            gc.collect()
            inputs = make_inputs(workload, device, seed=task.get("seed", 0), rotations=task.get("rotations", 1))
            inputs_key = key
        references = {}  # "weighted" / "uniform" -> Reference, computed on the GPU
        for name in provider_names:
            provider = PROVIDERS_BY_NAME[name]
            base = {"workload_params": workload.params(), "provider": name, "device": device,
                    "weights_support": provider.weights_support, "exact": provider.exact}
            reason = provider.variant_support(workload.loss_keywords)
            if reason is None:
                try:
                    loss_fn = provider.make(device, workload.loss_keywords)
                except Unavailable as error:
                    reason = str(error)
            if reason is not None:
                for mode in modes:
                    emit({**base, "mode": mode, "status": "skipped", "reason": reason})
                continue
            for mode in modes:
                if deadline is not None and time.time() > deadline:
                    emit({**base, "mode": mode, "status": "skipped", "reason": "time budget of the profile spent"})
                    continue
                row = {**base, "mode": mode}
                try:
                    row.update(measure_provider(task, workload, inputs, provider, loss_fn, mode, references))
                    row["status"] = "ok"
                except torch.cuda.OutOfMemoryError as error:
                    row.update(status="oom", reason=str(error).splitlines()[0][:300])
                except Exception as error:  # recorded, not fatal: the other providers still run
                    row.update(status="error", reason=f"{type(error).__name__}: {str(error)[:300]}",
                               traceback=traceback.format_exc()[-2000:])
                emit(row)
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
        del references
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def measure_provider(task, workload, inputs, provider, loss_fn, mode, references) -> dict:
    """One CUDA row: time, peak memory above the inputs and accuracy of ``provider`` on ``workload``."""
    import torch

    from . import measure
    from .providers import uniform_weights
    from .reference import relative_error, workload_reference

    backward = mode == "forward_backward"
    need_grad_weight = backward and not workload.frozen_head
    weights_kind = "uniform" if provider.weights_support == "uniform" else "weighted"
    token_weight = uniform_weights(inputs.token_weight) if weights_kind == "uniform" else inputs.token_weight
    target = inputs.target
    rotations = [inputs.hidden, *inputs.extra_hidden]
    weight = inputs.weight
    if backward:
        for hidden in rotations:
            hidden.requires_grad_(True)
        weight.requires_grad_(need_grad_weight)
    else:
        for hidden in rotations:
            hidden.requires_grad_(False)
        weight.requires_grad_(False)
    captured = {}

    def step(i: int, keep: bool = False) -> None:
        hidden = rotations[i % len(rotations)]
        if backward:
            hidden.grad = None
            weight.grad = None
            loss = loss_fn(hidden, weight, target, token_weight)
            loss.backward()
        else:
            with torch.no_grad():
                loss = loss_fn(hidden, weight, target, token_weight)
        if keep:
            captured["loss"] = loss.detach()
            if backward:
                captured["grad_hidden"] = hidden.grad
                captured["grad_weight"] = weight.grad

    def clear_grads():
        for hidden in rotations:
            hidden.grad = None
        weight.grad = None

    result = {"weights_used": weights_kind}
    # GPU: the reference first (on rotation 0), then warm-up (compilation, autotuning), the memory and accuracy
    # run, then the timed repeats.
    if weights_kind not in references:
        references[weights_kind] = workload_reference(workload, inputs.hidden.detach(), weight.detach(), target,
                                                      token_weight)
    start = time.perf_counter()
    for i in range(task["warmup"]):
        step(i)
        clear_grads()
    torch.cuda.synchronize()
    result["warmup_s"] = time.perf_counter() - start
    result["peak_memory_bytes"] = measure.cuda_peak_above(lambda: step(0, keep=True))
    accuracy = _accuracy(captured, references[weights_kind], backward, need_grad_weight, relative_error)
    captured.clear()
    clear_grads()
    times = measure.cuda_times(step, task["reps"])
    clear_grads()
    result.update(measure.summarize(times))
    result.update(accuracy)
    return result


def _accuracy(captured, reference, backward, need_grad_weight, relative_error) -> dict:
    loss = captured["loss"].double().cpu()
    ref_loss = reference.loss.double().cpu()
    out = {"loss": loss.item(), "ref_loss": ref_loss.item(),
           "loss_rel_err": (abs(loss - ref_loss) / abs(ref_loss).clamp_min(1e-30)).item()}
    if backward:
        out["grad_hidden_rel_err"] = relative_error(captured["grad_hidden"], reference.grad_hidden.to(
            captured["grad_hidden"].device))
        if need_grad_weight and reference.grad_weight is not None:
            out["grad_weight_rel_err"] = relative_error(captured["grad_weight"], reference.grad_weight.to(
                captured["grad_weight"].device))
    return out


# --- CPU loss tasks --------------------------------------------------------------------------------------------
SMALL_WARMUP_ROWS = 64


class _CpuRow:
    """One (workload, provider, mode) of a CPU task: its call on the shared inputs, and what was measured."""

    def __init__(self, workload, provider, loss_fn, mode, inputs):
        from .providers import uniform_weights

        self.workload, self.provider, self.loss_fn, self.mode, self.inputs = workload, provider, loss_fn, mode, inputs
        self.backward = mode == "forward_backward"
        self.need_grad_weight = self.backward and not workload.frozen_head
        self.weights_kind = "uniform" if provider.weights_support == "uniform" else "weighted"
        self.token_weight = (uniform_weights(inputs.token_weight) if self.weights_kind == "uniform"
                             else inputs.token_weight)
        self.rotations = [inputs.hidden, *inputs.extra_hidden]
        self.result = {"weights_used": self.weights_kind}
        self.wall_ms, self.cpu_ms = [], []

    def call(self, i: int, rows: slice = slice(None), keep: bool = False) -> dict:
        """One loss (+ backward) on hidden rotation ``i`` (``rows`` of it); returns loss and gradients if ``keep``."""
        import torch

        leaf, weight = self.rotations[i % len(self.rotations)], self.inputs.weight
        leaf.requires_grad_(self.backward)
        weight.requires_grad_(self.need_grad_weight)
        leaf.grad = weight.grad = None
        hidden = leaf
        target, token_weight = self.inputs.target, self.token_weight
        if rows != slice(None):
            hidden, target, token_weight = hidden[rows], target[rows], token_weight[rows]
        if self.backward:
            loss = self.loss_fn(hidden, weight, target, token_weight)
            loss.backward()
        else:
            with torch.no_grad():
                loss = self.loss_fn(hidden, weight, target, token_weight)
        out = {"loss": loss.detach(), "grad_hidden": leaf.grad, "grad_weight": weight.grad} if keep else {}
        leaf.grad = weight.grad = None
        return out


def run_cpu_loss_task(task: dict) -> None:
    """CPU rows of workloads that share one set of inputs (a problem and its loss variants), in one process.

    1. Per row, a call on the last ``SMALL_WARMUP_ROWS`` tokens (lazy initialisation: thread pool, BLAS buffers,
       kept for the process's life, so no row is charged for them), then the memory run: the peak of torch's
       allocations and the peak RSS above what was there before it (:func:`benchmarks.measure.cpu_peak_above`;
       the RSS one exact where the OS can reset its high-water mark), whose loss and gradients are compared
       with the float64 reference of the row's workload (computed here, once per workload and weight kind).
    2. The timed repeats, round-robin over the rows: repeat r of every row, then repeat r + 1; a burst of load
       from other processes then slows every row of the round, not one provider's every repeat.
    """
    import torch

    from . import measure
    from .providers import PROVIDERS_BY_NAME, Unavailable
    from .reference import relative_error
    from .workloads import Workload, make_inputs

    deadline = task.get("deadline")
    workloads = [Workload.from_dict(data) for data in task["workloads"]]
    provider_lists = task.get("workload_providers") or [task["providers"]] * len(workloads)
    inputs = make_inputs(workloads[0], "cpu", seed=task.get("seed", 0), rotations=task.get("rotations", 1))
    references = {}  # (workload name, weights kind) -> Reference
    rows = []
    for workload, provider_names in zip(workloads, provider_lists):
        modes = [mode for mode in task["modes"] if mode in workload.modes]
        for name in provider_names:
            provider = PROVIDERS_BY_NAME[name]
            base = {"workload_params": workload.params(), "provider": name, "device": "cpu",
                    "weights_support": provider.weights_support, "exact": provider.exact}
            reason = provider.variant_support(workload.loss_keywords)
            if reason is None:
                try:
                    loss_fn = provider.make("cpu", workload.loss_keywords)
                except Unavailable as error:
                    reason = str(error)
            for mode in modes:
                if reason is not None:
                    emit({**base, "mode": mode, "status": "skipped", "reason": reason})
                    continue
                row = _CpuRow(workload, provider, loss_fn, mode, inputs)
                row.result.update(base, mode=mode)
                rows.append(row)

    measured = []
    for row in rows:
        if deadline is not None and time.time() > deadline:
            row.result.update(status="skipped", reason="time budget of the profile spent")
            emit(row.result)
            continue
        try:
            if measure.rss_high_water_supported():  # (else the first call is the memory run: see rss_peak_above)
                tokens = row.workload.tokens
                row.call(0, rows=slice(max(0, tokens - SMALL_WARMUP_ROWS), tokens))
            kept = {}
            row.result.update(measure.cpu_peak_above(lambda: kept.update(row.call(0, keep=True))))
            key = (row.workload.name, row.weights_kind)
            if key not in references:
                references[key] = _cpu_reference(row.workload, inputs, row.token_weight)
            row.result.update(_accuracy(kept, references[key], row.backward, row.need_grad_weight, relative_error))
            kept.clear()
            measured.append(row)
        except Exception as error:  # recorded, not fatal: the other rows still run
            row.result.update(status="error", reason=f"{type(error).__name__}: {str(error)[:300]}",
                              traceback=traceback.format_exc()[-2000:])
            emit(row.result)
    references.clear()
    gc.collect()

    failed = set()
    for repeat in range(task["reps"]):
        if repeat > 0 and deadline is not None and time.time() > deadline:
            break  # every row has at least one repeat; the row's "repeats" says how many
        for row in measured:
            if id(row) in failed:
                continue
            try:
                wall, cpu = measure.timed_call(lambda: row.call(repeat + 1))
            except Exception as error:
                row.result.update(status="error", reason=f"{type(error).__name__}: {str(error)[:300]}",
                                  traceback=traceback.format_exc()[-2000:])
                failed.add(id(row))
                continue
            row.wall_ms.append(wall)
            row.cpu_ms.append(cpu)
    for row in measured:
        if id(row) not in failed:
            row.result.update(measure.summarize(row.wall_ms))
            row.result["cpu_time_ms"] = statistics.median(row.cpu_ms)
            # average busy threads of this process during a repeat (torch's thread count when nothing competes)
            row.result["busy_threads"] = sum(row.cpu_ms) / max(sum(row.wall_ms), 1e-9)
            row.result["threads"] = torch.get_num_threads()
            row.result["status"] = "ok"
        emit(row.result)


def _cpu_reference(workload, inputs, token_weight):
    """float64 reference (fused_wce.reference_linear_cross_entropy with the workload's loss variant, or the
    log-prob objective of fused_wce.reference_linear_log_prob) on hidden rotation 0: loss, and the gradients
    rounded to the inputs' dtype."""
    import fused_wce

    from .reference import Reference
    from .workloads import policy_objective

    hidden = inputs.hidden.detach().clone().requires_grad_(True)
    weight = inputs.weight.detach().clone().requires_grad_(not workload.frozen_head)
    if workload.objective == "log_prob":
        log_prob, entropy = fused_wce.reference_linear_log_prob(hidden, weight, inputs.target, return_entropy=True,
                                                                **workload.loss_keywords)
        loss = policy_objective(log_prob, entropy, inputs.target, token_weight.double())
    else:
        loss = fused_wce.reference_linear_cross_entropy(hidden, weight, inputs.target, token_weight,
                                                        **workload.loss_keywords)
    loss.backward()
    return Reference(loss=loss.detach(), grad_hidden=hidden.grad,
                     grad_weight=None if workload.frozen_head else weight.grad)


# --- the Triton path under the interpreter ----------------------------------------------------------------------
def run_interpreter_task(task: dict) -> None:
    """fused_wce(backend="triton") on CPU tensors under TRITON_INTERPRET=1 vs the float64 reference."""
    import fused_wce

    from .workloads import Workload, make_inputs

    workload = Workload.from_dict(task["workload"])
    inputs = make_inputs(workload, "cpu", seed=task.get("seed", 0))
    row = {"kind": "interpreter", "workload_params": workload.params(), "provider": "fused_wce[triton-interpreter]",
           "device": "cpu", "mode": "forward_backward", "weights_support": "in kernel", "weights_used": "weighted",
           "exact": True}
    try:
        results = {}
        for name, fn in (("triton", lambda h, w: fused_wce.linear_cross_entropy(
                h, w, inputs.target, inputs.token_weight, backend="triton")),
                         ("reference", lambda h, w: fused_wce.reference_linear_cross_entropy(
                             h, w, inputs.target, inputs.token_weight))):
            hidden = inputs.hidden.detach().clone().requires_grad_(True)
            weight = inputs.weight.detach().clone().requires_grad_(True)
            start = time.perf_counter()
            loss = fn(hidden, weight)
            loss.backward()
            results[name] = (loss.detach().double(), hidden.grad, weight.grad, time.perf_counter() - start)
        from .reference import relative_error

        loss, grad_hidden, grad_weight, seconds = results["triton"]
        ref_loss, ref_hidden, ref_weight, _ = results["reference"]
        row.update(status="ok", loss=loss.item(), ref_loss=ref_loss.item(),
                   loss_rel_err=(abs(loss - ref_loss) / abs(ref_loss)).item(),
                   grad_hidden_rel_err=relative_error(grad_hidden, ref_hidden),
                   grad_weight_rel_err=relative_error(grad_weight, ref_weight), interpreter_s=seconds)
    except Exception as error:
        row.update(status="error", reason=f"{type(error).__name__}: {str(error)[:300]}",
                   traceback=traceback.format_exc()[-2000:])
    emit(row)


# --- GEMM rate ------------------------------------------------------------------------------------------------
def run_gemm_task(task: dict) -> None:
    """The device's matmul rate with torch.mm: bf16 on CUDA (the card's GEMM rate), the workloads' dtype on CPU."""
    import torch

    from . import measure

    device = task["device"]
    dtype = getattr(torch, task["dtype"])
    size = task["size"]
    operands = [(torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device,
                                                                                  dtype=dtype)) for _ in range(3)]
    out = torch.empty(size, size, device=device, dtype=dtype)

    def step(i):
        a, b = operands[i % len(operands)]
        torch.mm(a, b, out=out)

    for i in range(task["warmup"]):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
        times = measure.cuda_times(step, task["reps"])
    else:
        times = measure.wall_times(step, task["reps"])
    stats = measure.summarize(times)
    flops = 2 * size ** 3
    emit({"kind": "gemm", "device": device, "dtype": task["dtype"], "size": size, **stats,
          "tflops": flops / (stats["time_ms"] * 1e-3) / 1e12})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
