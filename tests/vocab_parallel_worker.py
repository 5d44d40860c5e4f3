"""Worker of tests/test_vocab_parallel.py: the vocabulary-parallel loss on 2 and 3 processes (CPU, gloo).

    TRITON_INTERPRET=1 python -m torch.distributed.run --standalone --nproc_per_node=3 \
        tests/vocab_parallel_worker.py OUT_DIR

(CPU tensors throughout: the ``backend="triton"`` cases need Triton's interpreter, with the test harness's
fixes of its gaps, tests/interpreter_fixes.py.)

Every case of :data:`CASES` runs on a group of 2 ranks (ranks 0 and 1; rank 2 waits) and on all 3 ranks. Each
rank builds the case's whole problem (:func:`case_problem`, seeded: the same on every rank), lays it out as the
case says (a DTensor weight ``Shard(0)``, or plain rows with ``process_group`` and ``vocab_start``; tokens
replicated or split for sequence parallelism), calls ``fused_wce.linear_cross_entropy``, backpropagates the
case's upstream gradient and writes what it got to ``OUT_DIR/rank<r>.pt``: ``{"<W>/<case>": {"loss", per-token
"token_loss", "lse", "entropy", "is_top1", "z_loss", gradients of its "hidden" tokens and of its "weight" and
"bias" rows, "rows": (first, stop) of its vocabulary slice, "tokens": (first, stop) of its flattened tokens,
"collectives": [(name, bytes of the output)] of the loss's forward and backward where the case records them} or
{"raised": message} or {"error": traceback}}``. The scenarios of :data:`TRAINING` train a tiny causal LM whose
LM head is tensor-parallel (``ColwiseParallel``; transformers' ``tp_plan="auto"``) with the fused loss of
``add_weighted_lm_head`` for two SGD steps and record the losses and the final parameters. The test computes
the single-process references itself from the same functions.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from helpers import end_distributed_worker, make_problem  # noqa: E402

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") == "1":  # the triton cases run interpreted
    import interpreter_fixes

    interpreter_fixes.install()

GROUP_SIZES = (2, 3)
VOCAB = 101
HIDDEN = 24
SHAPE = (2, 9)
# Plain-layout vocabulary slices (vocab_start, rows) per group size: uneven and not in rank order.
PLAIN_SLICES = {2: ((41, 60), (0, 41)), 3: ((61, 40), (0, 40), (40, 21))}
# Sequence-parallel token counts per rank (of the 18 flattened tokens): uneven.
TOKEN_SPLITS = {2: (10, 8), 3: (7, 4, 7)}
VARIANTS = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, logit_scale=0.8, dft=True)

# name -> what differs from the default (layout "dtensor", reduction "mean", float32, torch backend, weighted,
# no bias, both group sizes). "options" go to linear_cross_entropy as they are.
CASES = {
    "mean_bias": dict(bias=True, record_collectives=True),
    "sum_plain": dict(layout="plain", options=dict(reduction="sum")),
    "none": dict(options=dict(reduction="none")),
    "normalizer_plain": dict(layout="plain", bias=True, normalizer=7.5, options=dict(reduction="sum")),
    **{f"variant_{name}": dict(options={name: value}) for name, value in VARIANTS.items()},
    "variants_none_plain": dict(layout="plain", bias=True, options=dict(reduction="none", **VARIANTS)),
    "ignore_index_unweighted": dict(ignore_index=-1, weighted=False, options=dict(ignore_index=-1)),
    "bf16": dict(dtype=torch.bfloat16),
    "bf16_variants_plain": dict(layout="plain", dtype=torch.bfloat16, options=dict(reduction="sum", **VARIANTS)),
    "bf16_lean": dict(dtype=torch.bfloat16, bias=True, options=dict(lean_memory=True)),
    "fp32_master_autocast_bf16": dict(options=dict(compute_dtype=torch.bfloat16)),
    "sequence_parallel_plain": dict(layout="plain_sp", bias=True, options=dict(label_smoothing=0.1, z_loss=1e-3)),
    "sequence_parallel_dtensor_none": dict(layout="dtensor_sp", options=dict(reduction="none", dft=True)),
    "triton_mean_bias": dict(backend="triton", bias=True),
    "triton_variants_none_plain": dict(layout="plain", backend="triton", options=dict(reduction="none", **VARIANTS)),
    "triton_tiled_smoothing": dict(backend="triton", options=dict(logits_gemm="triton", label_smoothing=0.1)),
    "triton_bf16_lean_sp": dict(layout="plain_sp", backend="triton", dtype=torch.bfloat16,
                                options=dict(lean_memory=True, softcap=5.0)),
    "no_grad": dict(requires_grad=False, options=dict(z_loss=1e-3)),
    # torch.compile(fullgraph=True): the DTensor unwrapping traced, the op one node (2 ranks only: compile time).
    "compiled_fullgraph": dict(compiled=True, sizes=(2,), bias=True, options=dict(z_loss=1e-3)),
    "nothing_counted": dict(ignore_fraction=1.0),
    # Bad layouts: every rank raises the same error.
    "different_tokens_per_rank": dict(perturb_rank_targets=True),
    "slices_overlap": dict(layout="plain", overlap=True),
    "replicated_weight_dtensor": dict(layout="dtensor_replicate"),
}
ERROR_CASES = ("different_tokens_per_rank", "slices_overlap", "replicated_weight_dtensor")
# fused_wce.linear_log_prob (return_entropy=True) cases: the same layouts; "options" go to linear_log_prob.
LOG_PROB_CASES = {
    "log_prob_temperature_bias": dict(bias=True, options=dict(temperature=0.7)),
    "log_prob_transform_plain": dict(layout="plain", bias=True,
                                     options=dict(softcap=5.0, logit_scale=0.8, temperature=1.3)),
    "log_prob_ignore_index": dict(ignore_index=-1, options=dict(ignore_index=-1)),
    "log_prob_bf16": dict(dtype=torch.bfloat16, options=dict(temperature=0.7)),
    "log_prob_sequence_parallel_plain": dict(layout="plain_sp", bias=True, options=dict(temperature=0.7)),
    "log_prob_sequence_parallel_dtensor": dict(layout="dtensor_sp", options=dict(softcap=5.0)),
    "log_prob_triton_plain": dict(layout="plain", backend="triton", bias=True,
                                  options=dict(softcap=5.0, temperature=0.7)),
    "log_prob_no_grad": dict(requires_grad=False),
    "log_prob_compiled_fullgraph": dict(compiled=True, sizes=(2,), bias=True, options=dict(temperature=0.7)),
}
TRAINING = ("colwise_parallel_head", "transformers_tp_plan")
TRAINING_STEPS = 2
LEARNING_RATE = 0.5


def case_spec(name: str) -> dict:
    spec = dict(layout="dtensor", dtype=torch.float32, backend="torch", bias=False, weighted=True,
                ignore_index=-100, ignore_fraction=0.2, normalizer=None, requires_grad=True, compiled=False,
                sizes=GROUP_SIZES, options={})
    if name in LOG_PROB_CASES:
        spec.update(LOG_PROB_CASES[name], weighted=False)
        return spec
    spec.update(CASES[name])
    spec["options"] = dict(reduction="mean", **spec["options"]) if "reduction" not in spec["options"] else \
        dict(spec["options"])
    return spec


def case_problem(name: str):
    """The case's whole problem (seeded) and its upstream gradient (float64: ``[N]`` for reduction="none";
    a log-prob case's: ``([N], [N])`` for the log-probs and the entropies)."""
    spec = case_spec(name)
    seed = sorted(CASES).index(name) if name in CASES else 100 + sorted(LOG_PROB_CASES).index(name)
    problem = make_problem(SHAPE, HIDDEN, VOCAB, spec["dtype"], bias=spec["bias"], weighted=spec["weighted"],
                           ignore_index=spec["ignore_index"], ignore_fraction=spec["ignore_fraction"],
                           seed=seed, requires_grad=spec["requires_grad"])
    generator = torch.Generator().manual_seed(99)
    if name in LOG_PROB_CASES:
        return problem, tuple(torch.randn(SHAPE, generator=generator, dtype=torch.float64) * 2 for _ in range(2))
    upstream = (torch.randn(SHAPE, generator=generator, dtype=torch.float64)
                if spec["options"]["reduction"] == "none" else torch.tensor(0.75, dtype=torch.float64))
    return problem, upstream


def token_range(layout: str, world_size: int, rank: int) -> tuple[int, int]:
    """This rank's flattened tokens: all of them, or its sequence-parallel part."""
    total = SHAPE[0] * SHAPE[1]
    if layout == "plain_sp":
        sizes = TOKEN_SPLITS[world_size]
        return sum(sizes[:rank]), sum(sizes[: rank + 1])
    if layout == "dtensor_sp":  # Shard(1) of [B, T, H]: torch.chunk along T; tokens are not contiguous overall
        raise ValueError("dtensor_sp tokens are a strided selection, see dtensor_sp_columns")
    return 0, total


def dtensor_sp_columns(world_size: int, rank: int) -> tuple[int, int]:
    """The sequence positions of this rank under ``Shard(1)`` (torch.chunk semantics)."""
    from torch.distributed.tensor import Shard

    size, start = Shard.local_shard_size_and_offset(SHAPE[1], world_size, rank)
    return start, start + size


def vocab_rows(layout: str, world_size: int, rank: int) -> tuple[int, int]:
    if layout.startswith("plain"):
        start, rows = PLAIN_SLICES[world_size][rank]
        return start, start + rows
    from torch.distributed.tensor import Shard

    rows, start = Shard.local_shard_size_and_offset(VOCAB, world_size, rank)
    return start, start + rows


# -------------------------------------------------------------------------------------------- loss cases
def run_case(name: str, group, mesh) -> dict:
    import fused_wce

    spec = case_spec(name)
    problem, upstream = case_problem(name)
    layout, options = spec["layout"], dict(spec["options"])
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    target, token_weight = problem.target, problem.token_weight
    if spec.get("perturb_rank_targets"):
        target = target.clone()
        target[0, 0] = (target[0, 0].clamp_min(0) + 1 + rank) % VOCAB  # a different token on every rank
    hidden, weight, bias, target, token_weight, layout_kwargs = _rank_tensors(spec, problem, target, token_weight,
                                                                              group, mesh)
    kwargs = dict(bias=bias, backend=spec["backend"], return_stats=True, normalizer=spec["normalizer"], **options,
                  **layout_kwargs)
    loss_function = torch.compile(fused_wce.linear_cross_entropy, fullgraph=True) if spec["compiled"] \
        else fused_wce.linear_cross_entropy
    collectives = _CollectiveLog() if spec.get("record_collectives") else None
    try:
        with torch.set_grad_enabled(spec["requires_grad"]), collectives or contextlib.nullcontext():
            out = loss_function(hidden, weight, target, token_weight, **kwargs)
    except (ValueError, TypeError) as error:
        if name in ERROR_CASES:
            return {"raised": f"{type(error).__name__}: {error}"}
        raise
    if name in ERROR_CASES:
        raise AssertionError(f"{name}: no error")
    result = {name_: getattr(out, name_) for name_ in ("loss", "token_loss", "lse", "entropy", "is_top1", "z_loss")}
    result = {key: None if value is None else _local(value).detach().clone() for key, value in result.items()}
    if spec["requires_grad"]:
        grad_output = upstream.float()
        if options["reduction"] == "none":
            grad_output = _local_tokens(grad_output, layout, world_size, rank)
        with collectives or contextlib.nullcontext():
            out.loss.backward(grad_output)
        result.update(_rank_gradients(hidden, weight, bias))
    if collectives is not None:
        result["collectives"] = collectives.calls
    return {**result, **_rank_layout(layout, world_size, rank)}


def run_log_prob_case(name: str, group, mesh) -> dict:
    """A :data:`LOG_PROB_CASES` case: ``linear_log_prob(return_entropy=True)`` on this rank's layout, then the
    backward of ``sum(g_lp * log_prob + g_H * entropy)`` for the case's upstream gradients of its tokens."""
    import fused_wce

    spec = case_spec(name)
    problem, upstream = case_problem(name)
    layout, world_size, rank = spec["layout"], dist.get_world_size(group), dist.get_rank(group)
    hidden, weight, bias, target, _, layout_kwargs = _rank_tensors(spec, problem, problem.target,
                                                                   problem.token_weight, group, mesh)
    log_prob_function = torch.compile(fused_wce.linear_log_prob, fullgraph=True) if spec["compiled"] \
        else fused_wce.linear_log_prob
    with torch.set_grad_enabled(spec["requires_grad"]):
        log_prob, entropy = log_prob_function(hidden, weight, target, bias=bias, return_entropy=True,
                                              backend=spec["backend"], **spec["options"], **layout_kwargs)
    result = {"log_prob": log_prob.detach().clone(), "entropy": entropy.detach().clone()}
    if spec["requires_grad"]:
        grad_log_prob, grad_entropy = (_local_tokens(g.float(), layout, world_size, rank) for g in upstream)
        ((log_prob * grad_log_prob).sum() + (entropy * grad_entropy).sum()).backward()
        result.update(_rank_gradients(hidden, weight, bias))
    return {**result, **_rank_layout(layout, world_size, rank)}


def _rank_tensors(spec: dict, problem, target, token_weight, group, mesh):
    """This rank's hidden, weight, bias, target and token_weight in the case's layout (leaves requiring grad as
    the case says), and the keywords that describe a plain layout (process_group, vocab_start,
    sequence_parallel)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    layout, world_size, rank = spec["layout"], dist.get_world_size(group), dist.get_rank(group)

    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_(spec["requires_grad"])

    first, stop = vocab_rows(layout, world_size, rank)
    kwargs = {}
    hidden = leaf(problem.hidden)
    if layout in ("dtensor", "dtensor_sp", "dtensor_replicate"):
        placement = Replicate() if layout == "dtensor_replicate" else Shard(0)
        weight = leaf(distribute_tensor(problem.weight.detach(), mesh, [placement]))
        bias = None if problem.bias is None else leaf(distribute_tensor(problem.bias.detach(), mesh, [placement]))
        if layout == "dtensor_sp":
            hidden = leaf(distribute_tensor(problem.hidden.detach(), mesh, [Shard(1)]))
            target = distribute_tensor(target, mesh, [Shard(1)])
            token_weight = None if token_weight is None else distribute_tensor(token_weight, mesh, [Shard(1)])
    else:
        starts = PLAIN_SLICES[world_size]
        if spec.get("overlap"):
            starts = tuple((start + (i == 1), rows) for i, (start, rows) in enumerate(starts))  # rank 1: one row late
        weight = leaf(problem.weight.detach()[first:stop])
        bias = None if problem.bias is None else leaf(problem.bias.detach()[first:stop])
        kwargs.update(process_group=group, vocab_start=starts[rank][0])
        if layout == "plain_sp":
            tokens = slice(*token_range(layout, world_size, rank))
            hidden = leaf(problem.hidden.detach().flatten(0, 1)[tokens])
            target = target.flatten()[tokens]
            token_weight = None if token_weight is None else token_weight.flatten()[tokens]
            kwargs.update(sequence_parallel=True)
    return hidden, weight, bias, target, token_weight, kwargs


def _rank_gradients(hidden, weight, bias) -> dict:
    return dict(hidden=_local(hidden.grad), weight=_local(weight.grad), bias=None if bias is None else _local(bias.grad))


def _rank_layout(layout: str, world_size: int, rank: int) -> dict:
    """Where this rank's outputs sit in the whole problem: its vocabulary rows and its tokens."""
    where = dict(rows=vocab_rows(layout, world_size, rank), layout=layout)
    if layout == "dtensor_sp":
        where["columns"] = dtensor_sp_columns(world_size, rank)
    else:
        where["tokens"] = token_range(layout, world_size, rank)
    return where


class _CollectiveLog:
    """While active, records every all-gather, all-reduce and reduce-scatter: ``(name, output bytes)``."""

    NAMES = ("all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor")

    def __init__(self):
        self.calls, self._saved = [], {}

    def __enter__(self):
        for name in self.NAMES:
            function = self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._recording(name, function))
        return self

    def _recording(self, name, function):
        def call(*args, **kwargs):
            output = args[0]  # (output, input) for the gathers and scatters; the tensor for all_reduce
            self.calls.append((name, output.numel() * output.element_size()))
            return function(*args, **kwargs)
        return call

    def __exit__(self, *exc):
        for name, function in self._saved.items():
            setattr(dist, name, function)


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _local_tokens(per_token: torch.Tensor, layout: str, world_size: int, rank: int) -> torch.Tensor:
    if layout == "plain_sp":
        return per_token.flatten()[slice(*token_range(layout, world_size, rank))]
    if layout == "dtensor_sp":
        return per_token[:, slice(*dtensor_sp_columns(world_size, rank))]
    return per_token


# ------------------------------------------------------------------------------------------- training
def tp_model_config(world_size: int):
    """A tiny Llama whose attention heads and vocabulary split over ``world_size`` ranks (V uneven)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=161, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=64,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def training_batch(vocab_size: int):
    """input_ids/attention_mask ``[4, 12]``, shifted targets (-100 on padding and a prompt) and float32 weights."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, vocab_size, (4, 12), generator=generator)
    attention_mask = torch.ones(4, 12, dtype=torch.long)
    attention_mask[1, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100
    target = labels[:, 1:]
    weight = (torch.rand(4, 11, generator=generator) * 1.7 + 0.1) * (target != -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target": target, "weight": weight}


def train_steps(model, batch) -> list[float]:
    """``TRAINING_STEPS`` SGD steps of the patched model's fused weighted loss (``WeightedSFTTrainer``'s
    ``compute_loss`` call: ``model(**inputs, fused_wce_loss=WeightedLossInputs(...))``); returns the losses."""
    from fused_wce.trl_integration.trainer.lm_head import WeightedLossInputs

    losses = []
    inputs = WeightedLossInputs(batch["target"], batch["weight"], batch["weight"].sum())
    for _ in range(TRAINING_STEPS):
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], fused_wce_loss=inputs)
        output.loss.backward()
        losses.append(output.loss.item())
        with torch.no_grad():
            for param in model.parameters():
                param.add_(param.grad, alpha=-LEARNING_RATE)
                param.grad = None
    return losses


def build_training_model(scenario: str, world_size: int, checkpoint: Path | None):
    """The scenario's model, unsharded (``checkpoint`` None) or tensor-parallel over the current group."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if scenario == "colwise_parallel_head":
        torch.manual_seed(0)
        return LlamaForCausalLM(tp_model_config(world_size))
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                **({} if world_size == 1 else {"tp_plan": "auto"}))


def run_training(scenario: str, group, mesh, out: Path) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from fused_wce.trl_integration.trainer.lm_head import add_weighted_lm_head

    world_size = dist.get_world_size(group)
    checkpoint = out / "tp_checkpoint"
    model = build_training_model(scenario, world_size, checkpoint)
    add_weighted_lm_head(model)
    if scenario == "colwise_parallel_head":
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    head = model.lm_head.weight
    layout = {"placements": str(head.placements), "local_rows": head.to_local().shape[0],
              "mesh_size": head.device_mesh.size()}
    losses = train_steps(model, training_batch(model.config.vocab_size))
    params = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for name, p in model.named_parameters()}
    return {"losses": losses, "params": params, "layout": layout}


def log_prob_head_step(model, batch) -> dict:
    """One backward through ``add_log_prob_lm_head``'s fused call (temperature 0.8, entropies), TRL's GRPO call
    convention: the objective ``sum(a * log_probs + 0.1 * a * entropy)`` with signed per-sequence ``a``.
    Returns the per-token outputs and every parameter's gradient (whole tensors)."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[0, :4] = -100
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                   fused_lm_head=True)
    advantage = torch.tensor([1.5, -0.7, 0.4, -1.2])[:, None]
    (advantage * output.log_probs + 0.1 * advantage * output.entropy).sum().backward()
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for name, p in model.named_parameters()}
    return {"log_probs": output.log_probs.detach().clone(), "entropy": output.entropy.detach().clone(),
            "grads": grads}


def run_log_prob_head(group, mesh) -> dict:
    """:func:`log_prob_head_step` with the LM head sharded by vocabulary over the group (``ColwiseParallel``)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from fused_wce.trl_integration.trainer.log_prob_head import add_log_prob_lm_head

    model = build_training_model("colwise_parallel_head", dist.get_world_size(group), None)
    add_log_prob_lm_head(model, temperature=0.8)
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    return log_prob_head_step(model, training_batch(model.config.vocab_size))


def save_checkpoint(out: Path) -> None:
    """The seeded model transformers' tp_plan loads (written once, by rank 0)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tp_model_config(3)).save_pretrained(out / "tp_checkpoint")


# ------------------------------------------------------------------------------------------------ main
def _run_recorded(function, *args) -> dict:
    try:
        return function(*args)
    except Exception:  # recorded for the test to show; the other cases still run
        return {"error": f"rank {dist.get_rank()}:\n{traceback.format_exc()}"}


def main(out_dir: str) -> None:
    from torch.distributed.device_mesh import DeviceMesh

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_checkpoint(out)
    dist.barrier()
    groups = {3: dist.group.WORLD, 2: dist.new_group([0, 1])}
    meshes = {size: DeviceMesh.from_group(group, "cpu") for size, group in groups.items()
              if rank < size}
    results = {}
    for size in GROUP_SIZES:
        if rank < size:
            for name in CASES:
                if size in case_spec(name)["sizes"]:
                    results[f"{size}/{name}"] = _run_recorded(run_case, name, groups[size], meshes[size])
            for name in LOG_PROB_CASES:
                if size in case_spec(name)["sizes"]:
                    results[f"{size}/{name}"] = _run_recorded(run_log_prob_case, name, groups[size], meshes[size])
            for scenario in TRAINING:
                if scenario == "transformers_tp_plan" and size != world:
                    continue  # from_pretrained(tp_plan=) shards over the whole world
                results[f"{size}/{scenario}"] = _run_recorded(run_training, scenario, groups[size], meshes[size], out)
            results[f"{size}/log_prob_head"] = _run_recorded(run_log_prob_head, groups[size], meshes[size])
        dist.barrier()
    torch.save(results, out / f"rank{rank}.pt")
    end_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1])
