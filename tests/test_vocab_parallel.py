"""The vocabulary-parallel loss (a tensor-parallel LM head) against the one-process float64 reference.

In one process: the backends' slice passes (``slice_summaries``, ``slice_gradients``) over a partition of the
vocabulary, merged as the ranks merge them, equal the whole vocabulary's loss, stats and gradients (every path,
the Triton interpreter's included). In one launch of 3 processes (CPU, gloo; tests/vocab_parallel_worker.py)
every case runs on a group of 2 ranks and on 3: loss, per-token stats and gradients equal the float64
reference (DTensor and plain layouts, uneven slices, every reduction and variant, bf16, sequence parallelism,
both backends), bad layouts raise on every rank, and two training steps of a tiny LM with a tensor-parallel
head (``ColwiseParallel``, transformers' ``tp_plan="auto"``) equal one process. transformers' ``Trainer``
refuses a tensor-parallel model on CPU (accelerate's ``ParallelismConfig`` needs FSDP2, GPUs or DeepSpeed), so
the training steps call the patched model as ``WeightedSFTTrainer.compute_loss`` does.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fused_wce
from fused_wce.backends import backend_for
from fused_wce.custom_ops import counted_request
from fused_wce.loss_math import SliceSummary, finish_token_stats, merge_slice_summaries
from fused_wce.passes import KnownRowStats
from helpers import assert_close, make_problem, torch_eager_log_prob, torch_eager_same_dtype
from vocab_parallel_worker import (CASES, ERROR_CASES, GROUP_SIZES, LOG_PROB_CASES, SHAPE, TRAINING,
                                   build_training_model, case_problem, case_spec, log_prob_head_step, train_steps,
                                   training_batch)

TESTS = Path(__file__).parent
PROCESSES = max(GROUP_SIZES)
STAT_NAMES = ("token_loss", "lse", "entropy", "z_loss")
REFERENCE_OPTIONS = ("reduction", "ignore_index", "label_smoothing", "z_loss", "softcap", "logit_scale", "dft")


# ------------------------------------------------------------------------------------------ one process
@pytest.fixture
def path(every_plan_path):
    return every_plan_path


@pytest.mark.parametrize("options", [
    dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, logit_scale=0.8, dft=True),
], ids=["plain", "variants"])
def test_slices_merge_to_the_whole_vocabulary(path, options, poison):
    """Three uneven vocabulary slices, each summarised and differentiated alone (as three ranks would), merge
    into the whole vocabulary's per-token stats, and their gradients into its gradients."""
    device, backend = path[:2]
    problem = make_problem((2, 13), 40, 230, torch.float32, device, bias=True, seed=3)
    loss_options = fused_wce.LossOptions(backend=backend, compute_dtype=torch.float32, reduction="sum", **options)
    flat = (problem.hidden.detach().reshape(-1, 40), problem.weight.detach(), problem.bias.detach(),
            problem.target.reshape(-1), problem.token_weight.reshape(-1))
    request, index, counted_weight = counted_request(*flat, None, loss_options, lambda weight, _: weight,
                                                     (True, True, True))
    run = backend_for(backend, torch.device(device))
    slices = [slice(0, 90), slice(90, 101), slice(101, 230)]

    def sliced(rows: slice, **changes):
        return dataclasses.replace(request, weight=request.weight[rows], bias=request.bias[rows],
                                   target=request.target - rows.start, **changes)

    summaries = [run.slice_summaries(sliced(rows)) for rows in slices]
    stacked = SliceSummary(*(None if parts[0] is None else torch.stack(parts) for parts in zip(*summaries)))
    merged = merge_slice_summaries(stacked)
    stats = finish_token_stats(merged[:3], merged.target_logit, loss_options, merged.sum_logits, 230)
    coef = counted_weight * (merged.target_logit - stats.lse).exp() if loss_options.dft else counted_weight
    gradients = [run.slice_gradients(sliced(rows, coef=coef, grad_hidden_dtype=torch.float32), stats.lse, 230)
                 for rows in slices]

    ref = fused_wce.reference_linear_cross_entropy(*(problem.hidden, problem.weight, problem.target,
                                                     problem.token_weight), bias=problem.bias, reduction="sum",
                                                   return_stats=True, **options)
    ref_grads = torch.autograd.grad(ref.loss, (problem.hidden, problem.weight, problem.bias))
    token_loss = stats.token_loss * (merged.target_logit - stats.lse).exp() if loss_options.dft else stats.token_loss
    for name, actual in (("token_loss", token_loss), ("lse", stats.lse), ("entropy", stats.entropy)):
        assert_close(actual, getattr(ref, name).reshape(-1)[index], None, torch.float32, name)
    assert torch.equal(stats.is_top1, ref.is_top1.reshape(-1)[index])
    grad_hidden = torch.zeros_like(problem.hidden.detach().reshape(-1, 40))
    grad_hidden[index] = sum(g.hidden for g in gradients)
    assert_close(grad_hidden, ref_grads[0].reshape(-1, 40), None, torch.float32, "grad_hidden")
    assert_close(torch.cat([g.weight for g in gradients]), ref_grads[1], None, torch.float32, "grad_weight")
    assert_close(torch.cat([g.bias for g in gradients]), ref_grads[2], None, torch.float32, "grad_bias")


def test_log_prob_slices_merge_to_the_whole_vocabulary(path, poison):
    """The log-prob backward on three uneven vocabulary slices, each given the whole rows' lse and entropy (as
    three ranks are), with signed coefficients on log p and on the entropy: their gradients sum to the whole
    vocabulary's."""
    device, backend = path[:2]
    problem = make_problem((2, 13), 40, 230, torch.float32, device, bias=True, weighted=False, seed=4)
    options = fused_wce.LossOptions(backend=backend, compute_dtype=torch.float32, reduction="none",
                                    softcap=5.0).tempered(0.7)
    generator = torch.Generator().manual_seed(5)
    grad_log_prob, grad_entropy = (torch.randn(problem.target.shape, generator=generator, dtype=torch.float64)
                                   .to(device) for _ in range(2))
    ref = fused_wce.reference_linear_log_prob(problem.hidden, problem.weight, problem.target, bias=problem.bias,
                                              return_entropy=True, temperature=0.7, softcap=5.0)
    ref_grads = torch.autograd.grad((ref[0] * grad_log_prob).sum() + (ref[1] * grad_entropy).sum(),
                                    (problem.hidden, problem.weight, problem.bias))
    flat = (problem.hidden.detach().reshape(-1, 40), problem.weight.detach(), problem.bias.detach(),
            problem.target.reshape(-1), None)
    request, index, _ = counted_request(*flat, None, options, lambda weight, index: -grad_log_prob.reshape(-1)[index]
                                        .float(), (True, True, True))
    logits = (problem.hidden.detach().double().reshape(-1, 40) @ problem.weight.detach().double().T
              + problem.bias.detach().double())
    z = 5.0 * torch.tanh(logits / 5.0) / 0.7  # the whole rows' lse and entropy, as the forward gives every rank
    whole_lse = z.logsumexp(-1)[index].float()
    whole_entropy = ref[1].detach().reshape(-1)[index].float()
    run = backend_for(backend, torch.device(device))
    gradients = [run.slice_gradients(
        dataclasses.replace(request, weight=request.weight[rows], bias=request.bias[rows],
                            target=request.target - rows.start, grad_hidden_dtype=torch.float32,
                            entropy_coef=grad_entropy.reshape(-1)[index].float(),
                            known=KnownRowStats(whole_lse, whole_entropy)), whole_lse, 230)
                 for rows in (slice(0, 90), slice(90, 101), slice(101, 230))]
    grad_hidden = torch.zeros_like(flat[0])
    grad_hidden[index] = sum(g.hidden for g in gradients)
    assert_close(grad_hidden, ref_grads[0].reshape(-1, 40), None, torch.float32, "grad_hidden")
    assert_close(torch.cat([g.weight for g in gradients]), ref_grads[1], None, torch.float32, "grad_weight")
    assert_close(torch.cat([g.bias for g in gradients]), ref_grads[2], None, torch.float32, "grad_bias")


# -------------------------------------------------------------------------------------- 2 and 3 processes
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case and training scenario of tests/vocab_parallel_worker.py, one 3-process launch:
    ``({"<W>/<case>": [rank 0's result, rank 1's, ...]}, the launch's output directory)``."""
    out = tmp_path_factory.mktemp("vocab_parallel")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
               str(TESTS / "vocab_parallel_worker.py"), str(out)]
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=5400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"vocab_parallel_worker: {PROCESSES} processes in {time.perf_counter() - start:.1f} s")
    per_rank = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(PROCESSES)]
    merged = {key: [ranks[key] for ranks in per_rank if key in ranks] for key in per_rank[0]}
    for key, ranks in merged.items():
        errors = [result["error"] for result in ranks if "error" in result]
        assert not errors, f"{key}:\n" + "\n".join(errors)
    return merged, out


def _reference(name: str):
    """The float64 reference's outputs and gradients, and torch's same-dtype yardstick's, for a case."""
    spec = case_spec(name)
    problem, upstream = case_problem(name)
    options = spec["options"]
    kwargs = {key: options[key] for key in REFERENCE_OPTIONS if key in options}
    kwargs.update(normalizer=spec["normalizer"], return_stats=True)
    tensors = (problem.hidden, problem.weight, problem.target, problem.token_weight)
    ref = fused_wce.reference_linear_cross_entropy(*tensors, bias=problem.bias, **kwargs)
    compute_dtype = options.get("compute_dtype", spec["dtype"])
    eager_problem = dataclasses.replace(problem, hidden=problem.hidden.to(compute_dtype),
                                        weight=problem.weight.to(compute_dtype))
    eager = torch_eager_same_dtype(eager_problem, **kwargs)
    grads = eager_grads = None
    if spec["requires_grad"]:
        inputs = [t for t in (problem.hidden, problem.weight, problem.bias) if t is not None]
        grads = torch.autograd.grad(ref.loss, inputs, upstream)
        eager_grads = torch.autograd.grad(eager.loss, inputs, upstream.float())
    return problem, ref, eager, grads, eager_grads, compute_dtype


def _token_index(result: dict) -> torch.Tensor:
    """The flattened positions of a rank's per-token outputs."""
    rows, length = SHAPE
    if "columns" in result:
        return torch.arange(rows * length).view(rows, length)[:, slice(*result["columns"])].reshape(-1)
    return torch.arange(*result["tokens"])


def _assemble_tokens(ranks: list[dict], key: str, like: torch.Tensor) -> torch.Tensor:
    """Every rank's per-token ``key`` at its tokens' positions (sequence parallelism: each rank its own)."""
    out = torch.zeros(like.reshape(like.shape[0] * like.shape[1], *like.shape[2:]).shape, dtype=ranks[0][key].dtype)
    for result in ranks:
        out[_token_index(result)] = result[key].reshape(-1, *like.shape[2:])
    return out.view(like.shape)


def _per_token(ranks: list[dict], key: str, like: torch.Tensor) -> torch.Tensor:
    """A per-token output of the whole problem: rank 0's when every rank has every token (then every rank's must
    be bit-identical), else assembled from the ranks' parts."""
    if ranks[0]["layout"].endswith("_sp"):
        return _assemble_tokens(ranks, key, like)
    for result in ranks[1:]:
        assert torch.equal(result[key], ranks[0][key]), f"{key} differs between ranks"
    return ranks[0][key]


def _assert_top1(actual: torch.Tensor, expected: torch.Tensor, problem) -> None:
    """Top-1 may differ from the float64 reference only on near-ties that the input rounding can flip."""
    mismatch = actual != expected
    if mismatch.any():
        logits = problem.hidden.double() @ problem.weight.double().T
        if problem.bias is not None:
            logits = logits + problem.bias.double()
        gap = logits.amax(-1) - logits.gather(-1, problem.target.clamp_min(0)[..., None]).squeeze(-1)
        assert (gap[mismatch] < 1e-3 * logits.abs().amax()).all(), "is_top1 differs beyond near-ties"


@pytest.mark.parametrize("size, name", [(size, name) for name in CASES if name not in ERROR_CASES
                                        for size in case_spec(name)["sizes"]])
def test_case_matches_one_process_reference(results, size, name):
    ranks = results[0][f"{size}/{name}"]
    assert len(ranks) == size
    problem, ref, eager, grads, eager_grads, dtype = _reference(name)
    reduced = case_spec(name)["options"]["reduction"] != "none"
    loss = _per_token(ranks, "loss", problem.target) if not reduced else ranks[0]["loss"]
    if reduced:
        assert all(torch.equal(result["loss"], loss) for result in ranks), "the loss differs between ranks"
    assert_close(loss, ref.loss, eager.loss, dtype, "loss")
    for name_ in STAT_NAMES:
        if getattr(ref, name_) is None:
            assert ranks[0][name_] is None
            continue
        assert_close(_per_token(ranks, name_, problem.target), getattr(ref, name_), getattr(eager, name_), dtype,
                     name_)
    _assert_top1(_per_token(ranks, "is_top1", problem.target), ref.is_top1, problem)
    _assert_gradients(ranks, problem, grads, eager_grads, dtype)


def _assert_gradients(ranks: list[dict], problem, grads, eager_grads, dtype) -> None:
    """The ranks' gradients, assembled (hidden: every rank's tokens, or the same on every rank; weight and bias:
    each rank its rows), against the reference's ``grads`` with ``eager_grads`` as the yardstick."""
    if grads is None:
        assert "hidden" not in ranks[0]
        return
    grad_hidden = _per_token(ranks, "hidden", problem.hidden)
    assert grad_hidden.dtype == problem.hidden.dtype
    assert_close(grad_hidden, grads[0], eager_grads[0], dtype, "grad_hidden")
    rows = [result["rows"] for result in ranks]
    assert sorted(rows)[0][0] == 0 and all(a[1] == b[0] for a, b in zip(sorted(rows), sorted(rows)[1:]))
    for i, key in enumerate(("weight", "bias")[: len(grads) - 1], start=1):
        full = torch.zeros_like(grads[i], dtype=ranks[0][key].dtype)
        for result in ranks:
            full[slice(*result["rows"])] = result[key]
        assert_close(full, grads[i], eager_grads[i], dtype, f"grad_{key}")


@pytest.mark.parametrize("size, name", [(size, name) for name in LOG_PROB_CASES
                                        for size in case_spec(name)["sizes"]])
def test_log_prob_case_matches_one_process_reference(results, size, name):
    """linear_log_prob on a vocabulary-parallel head: every rank's log-probs and entropies of its tokens, and the
    gradients for signed upstream gradients of both, equal the one-process float64 reference."""
    ranks = results[0][f"{size}/{name}"]
    assert len(ranks) == size
    spec = case_spec(name)
    problem, upstream = case_problem(name)
    variant = {key: spec["options"][key] for key in ("temperature", "softcap", "logit_scale", "ignore_index")
               if key in spec["options"]}
    ref = fused_wce.reference_linear_log_prob(problem.hidden, problem.weight, problem.target, bias=problem.bias,
                                              return_entropy=True, **variant)
    dtype = spec["dtype"]
    eager = torch_eager_log_prob(problem, **variant) if dtype != torch.float32 else (None, None)
    for i, key in enumerate(("log_prob", "entropy")):
        assert_close(_per_token(ranks, key, problem.target), ref[i], eager[i], dtype, key)
    grads = eager_grads = None
    if spec["requires_grad"]:
        inputs = [t for t in (problem.hidden, problem.weight, problem.bias) if t is not None]

        def objective(log_prob, entropy, grad_dtype):
            return sum((value * grad.to(grad_dtype)).sum() for value, grad in zip((log_prob, entropy), upstream))

        grads = torch.autograd.grad(objective(*ref, torch.float64), inputs)
        eager_grads = ((None,) * len(inputs) if eager[0] is None
                       else torch.autograd.grad(objective(*eager, torch.float32), inputs))
    _assert_gradients(ranks, problem, grads, eager_grads, dtype)


@pytest.mark.parametrize("size", GROUP_SIZES)
@pytest.mark.parametrize("name, message", [
    ("different_tokens_per_rank", "the same tokens on every rank"),
    ("slices_overlap", "tile [0, V) without gaps or overlaps"),
    ("replicated_weight_dtensor", "needs Shard(0)"),
])
def test_bad_layout_raises_on_every_rank(results, size, name, message):
    ranks = results[0][f"{size}/{name}"]
    assert len(ranks) == size and all(message in result["raised"] for result in ranks), ranks
    assert all(result["raised"] == ranks[0]["raised"] for result in ranks)


@pytest.mark.parametrize("size, scenario", [(size, scenario) for size in GROUP_SIZES for scenario in TRAINING
                                            if scenario != "transformers_tp_plan" or size == max(GROUP_SIZES)])
def test_training_with_tensor_parallel_head_equals_one_process(results, size, scenario):
    """Two SGD steps of the patched model (the loss of ``WeightedSFTTrainer``) with its head sharded by
    vocabulary over the group: every rank's losses and final parameters equal one process's."""
    ranks = results[0][f"{size}/{scenario}"]
    out = results[1]
    model = build_training_model(scenario, 1, out / "tp_checkpoint")
    from fused_wce.trl_integration.trainer.lm_head import add_weighted_lm_head

    add_weighted_lm_head(model)
    losses = train_steps(model, training_batch(model.config.vocab_size))
    vocab_rows = sorted(result["layout"]["local_rows"] for result in ranks)
    assert sum(vocab_rows) == model.config.vocab_size and vocab_rows[-1] - vocab_rows[0] <= 1
    for result in ranks:
        assert result["layout"]["placements"] == "(Shard(dim=0),)" and result["layout"]["mesh_size"] == size
        assert result["losses"] == pytest.approx(losses, rel=1e-5)
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["params"][name], param.detach(), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("size", GROUP_SIZES)
def test_log_prob_head_with_tensor_parallel_head_equals_one_process(results, size):
    """GRPO's fused head (``add_log_prob_lm_head``) on a model whose LM head is sharded by vocabulary
    (``ColwiseParallel``): every rank's log-probs, entropies and parameter gradients equal one process's."""
    from fused_wce.trl_integration.trainer.log_prob_head import add_log_prob_lm_head

    model = build_training_model("colwise_parallel_head", 1, None)
    add_log_prob_lm_head(model, temperature=0.8)
    expected = log_prob_head_step(model, training_batch(model.config.vocab_size))
    for result in results[0][f"{size}/log_prob_head"]:
        for key in ("log_probs", "entropy"):
            torch.testing.assert_close(result[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------- roofline
def test_roofline_rank_flops_equal_a_count_of_one_ranks_computation():
    """benchmarks/roofline_vocab_parallel.py: one rank's FLOPs are the GEMMs of its slice passes (counted by
    torch's FlopCounterMode on the PyTorch path, whose slice passes run the same GEMMs as the modelled plan:
    summaries, then logits, dW and dX per slab); gathering the head runs the one-process loss on every rank."""
    from benchmarks.roofline import CARDS, Problem, predict
    from benchmarks.roofline_vocab_parallel import gather_head_rank, vocab_parallel_rank
    from test_roofline import counted_gemm_flops

    tokens, hidden_size, vocab, counted = 48, 24, 200, 30
    for tp in (2, 3, 8):
        rows = -(-vocab // tp)  # the first (largest) slice
        problem = make_problem((tokens,), hidden_size, rows, torch.float32, ignore_fraction=0.0,
                               zero_weight_fraction=0.0, weighted=False, seed=tp)
        problem.target[counted:] = -100
        options = fused_wce.LossOptions(compute_dtype=torch.float32)
        flat = (problem.hidden.detach(), problem.weight.detach(), None, problem.target, None)

        def one_rank():
            request, _, counted_weight = counted_request(*flat, None, options, lambda weight, _: weight,
                                                         (True, True, False))
            run = backend_for("torch", torch.device("cpu"))
            summary = run.slice_summaries(request)
            run.slice_gradients(request, summary.row_max + summary.sum_exp.log(), vocab)

        whole = Problem("small", hidden_size, vocab, tokens, counted, 4)
        assert vocab_parallel_rank(whole, tp)[0].flops == counted_gemm_flops(one_rank)
        assert gather_head_rank(whole, tp)[0].flops == predict("fused_wce", whole, CARDS["H200"]).flops


@pytest.mark.parametrize("size", GROUP_SIZES)
def test_roofline_communication_equals_the_collectives_of_a_run(results, size):
    """The model's bytes per rank are those of the collectives a run makes (recorded by the worker in the
    forward and backward of a DTensor case), at the ring's per-rank cost."""
    from benchmarks.roofline import Problem
    from benchmarks.roofline_vocab_parallel import all_gather_bytes, all_reduce_bytes, vocab_parallel_rank

    problem, _ = case_problem("mean_bias")
    counted = int(((problem.target != -100) & (problem.token_weight > 0)).sum())
    for result in results[0][f"{size}/mean_bias"]:
        ring = {"all_gather_into_tensor": all_gather_bytes, "all_reduce": all_reduce_bytes}
        assert {name for name, _ in result["collectives"]} == set(ring)
        sent = sum(ring[name](nbytes, size) for name, nbytes in result["collectives"])
        whole = Problem("mean_bias", problem.hidden.shape[-1], problem.weight.shape[0], problem.target.numel(),
                        counted, 4)
        assert vocab_parallel_rank(whole, size)[1] == pytest.approx(sent)


def test_roofline_per_rank_peak_and_time_against_gathering_the_head():
    """Llama-3-8B and Gemma-3-27B, N = M = 16384, bf16, H200: a rank of the vocabulary-parallel loss needs less
    memory, compute and time the more ranks share the head; gathering the head costs every rank the one-process
    loss's peak plus the gathered [V, H], whatever the group."""
    from benchmarks.roofline import CARDS, Problem, predict
    from benchmarks.roofline_vocab_parallel import MODELS, rank_plan

    h200 = CARDS["H200"]
    for model, (hidden_size, vocab) in MODELS.items():
        one_process = predict("fused_wce", Problem("whole", hidden_size, vocab, 16384, 16384), h200)
        sliced = [rank_plan("vocab_parallel", model, tp, h200) for tp in (2, 4, 8)]
        lean = [rank_plan("vocab_parallel_lean", model, tp, h200) for tp in (2, 4, 8)]
        for default, lean_plan in zip(sliced, lean):  # lean: no fp32 [V/W, H], the same GEMMs
            assert lean_plan.prediction.flops == default.prediction.flops
            assert lean_plan.prediction.peak_bytes < default.prediction.peak_bytes
        gathered = [rank_plan("gather_head", model, tp, h200) for tp in (2, 4, 8)]
        for earlier, later in zip(sliced, sliced[1:]):
            assert later.prediction.peak_bytes < earlier.prediction.peak_bytes
            assert later.prediction.time_s < earlier.prediction.time_s
            assert later.comm_bytes > earlier.comm_bytes  # the dX all-reduce approaches 2 M H 4 bytes
        for plan in gathered:
            assert plan.prediction.peak_bytes == one_process.peak_bytes + vocab * hidden_size * 2
            assert plan.prediction.time_s > one_process.time_s
        for vp, gather in zip(sliced, gathered):
            assert vp.prediction.peak_bytes < gather.prediction.peak_bytes / 2
            assert vp.prediction.time_s + vp.comm_s < gather.prediction.time_s + gather.comm_s


def test_roofline_vocab_parallel_subcommand_writes_its_table(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "benchmarks", "roofline", "--vocab-parallel", "--out",
                                str(tmp_path)], capture_output=True, text=True, cwd=TESTS.parent, timeout=5400)
    assert completed.returncode == 0, completed.stderr
    with open(tmp_path / "vocab_parallel.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(row["model"], row["tp"], row["plan"]) for row in rows} == {
        (model, str(tp), plan) for model in ("Llama-3-8B", "Gemma-3-27B") for tp in (2, 4, 8)
        for plan in ("vocab_parallel", "vocab_parallel_lean", "gather_head")}
