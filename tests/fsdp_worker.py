"""Worker of tests/test_fsdp.py: the fused loss under FSDP2 / FSDP1 with the LM head as its own unit (CPU, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR SCENARIO...

Each rank builds the same tiny causal LM (seeded, fp32, untied head), patches it with ``add_weighted_lm_head``,
shards it, runs the patched forward on its half of a global batch with per-token weights and the global
normalizer (``sum`` of the weights over both ranks, as the trainer computes it), and backward. The main process
writes ``OUT_DIR/<scenario>.pt``: ``{"grads": full gradient of every parameter (name -> fp32 tensor), "loss": the
global loss, "seen": what reached fused_wce.linear_cross_entropy on rank 0, "structure": str(model),
"returned_dtype": the loss's dtype as the model returned it, "loss_dtype", "token_loss", "entropy": rank 0's after
``WeightedLMOutput.in_float32()`` (what the trainer logs)}``, or ``{"error": traceback}`` when the scenario
raised. Scenarios:

- ``fsdp2``: ``fully_shard`` on each decoder layer, on ``lm_head`` separately, then on the root (fp32);
- ``fsdp2_bf16``: the same with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``;
- ``fsdp2_bf16_output``: the same with ``output_dtype=bfloat16`` too (every unit's outputs cast, the head's
  returned tuple and the root's output included);
- ``fsdp2_head_in_root``: ``fully_shard`` on each decoder layer and the root only (the head's parameters are
  the root's, unsharded during the root's forward: accelerate's transformer-layer policy);
- ``fsdp1``: ``FullyShardedDataParallel`` with ``size_based_auto_wrap_policy`` (the head is its own unit),
  ``use_orig_params=True``; the model is patched after wrapping;
- ``fsdp1_bf16``: the same with ``MixedPrecision(param_dtype=bfloat16, reduce_dtype=float32,
  cast_forward_inputs=True)`` (the root casts its inputs too: ``cast_root_forward_inputs`` defaults to True);
- ``fsdp2_log_prob`` / ``fsdp1_log_prob``: the model patched with ``add_log_prob_lm_head`` (temperature 0.8,
  entropies), sharded as ``fsdp2`` / ``fsdp1``; the objective of :func:`log_prob_coefficients` (signed
  coefficients on the log-probabilities and the entropies) writes ``{"grads", "objective", "structure"}``;
- ``tp_head``: the head tensor-parallel along the hidden dimension (``RowwiseParallel``: a DTensor weight sharded
  ``Shard(1)`` inside its forward, a layout the loss cannot use; vocabulary-sharded heads are
  tests/test_vocab_parallel.py's): must raise; the message is written as ``{"raised": str(error)}``.

The batch, model and reference live in :func:`make_model` / :func:`make_batch`, imported by the test to compute
the single-process float64 reference.
"""
from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from helpers import end_distributed_worker  # noqa: E402

WORLD_SIZE = 2
ROWS_PER_RANK = 2
SEQ_LEN = 12
VOCAB = 160


def make_model(kind: str = "qwen2", dtype: torch.dtype = torch.float32):
    """A 2-layer causal LM (hidden 32, vocab 160, untied head: ``lm_head`` has its own weight), seeded init."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                 "llama": (LlamaConfig, LlamaForCausalLM)}[kind]
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return model_class(config).to(dtype)


def make_batch():
    """The global batch ``[WORLD_SIZE * ROWS_PER_RANK, SEQ_LEN]``: input_ids, attention_mask (right padding),
    shifted target (-100 on padding and a few positions) and float32 weights (zeros among them; values that bf16
    cannot represent, so a cast would show)."""
    generator = torch.Generator().manual_seed(1234)
    rows = WORLD_SIZE * ROWS_PER_RANK
    input_ids = torch.randint(3, VOCAB, (rows, SEQ_LEN), generator=generator)
    attention_mask = torch.ones(rows, SEQ_LEN, dtype=torch.long)
    attention_mask[1, -3:] = 0
    attention_mask[2, -5:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100  # a "prompt" that does not count
    target = labels[:, 1:]
    weight = torch.rand(rows, SEQ_LEN - 1, generator=generator) * 1.7 + 0.1
    weight[3, 2:6] = 0.0
    weight = weight * (target != -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target": target, "weight": weight}


def _rank_slice(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK]


class _Spy:
    """Wraps fused_wce.linear_cross_entropy and records what reached it (dtypes and exact values)."""

    def __init__(self, function):
        self.function, self.seen = function, None

    def __call__(self, hidden, weight, target, token_weight, **kwargs):
        from torch.distributed.tensor import DTensor

        normalizer = kwargs.get("normalizer")
        self.seen = {"hidden_dtype": str(hidden.dtype), "weight_dtype": str(weight.dtype),
                     "weight_shape": tuple(weight.shape), "weight_is_dtensor": isinstance(weight, DTensor),
                     "token_weight": token_weight.detach().clone(),
                     "normalizer": normalizer.detach().clone() if isinstance(normalizer, torch.Tensor) else normalizer}
        return self.function(hidden, weight, target, token_weight, **kwargs)


def _shard_fsdp2(model, mesh, mixed: bool, head_unit: bool = True, output_dtype=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=output_dtype)
              if mixed else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    if head_unit:
        fully_shard(model.lm_head, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _wrap_fsdp1(model, mixed: bool):
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    head_size = model.lm_head.weight.numel()  # 160 * 32 = 5120; a decoder layer has ~9k, the final norm 32
    policy = functools.partial(size_based_auto_wrap_policy, min_num_params=head_size)
    precision = (MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True)
                 if mixed else None)
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, mixed_precision=precision,
                                       device_id=torch.device("cpu"), use_orig_params=True)
    if not isinstance(model.lm_head, FullyShardedDataParallel):
        raise AssertionError(f"the size-based policy did not make lm_head its own FSDP unit:\n{wrapped}")
    return wrapped


def _full_grads_fsdp2(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.full_tensor().float().clone() for name, param in model.named_parameters()}


def _full_grads_fsdp1(wrapped) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
        return {name.replace("_fsdp_wrapped_module.", ""): param.grad.float().clone()
                for name, param in wrapped.named_parameters()}


def run_scenario(scenario: str, rank: int, mesh) -> dict:
    import fused_wce
    from fused_wce.trl_integration.trainer.lm_head import WeightedLossInputs, add_weighted_lm_head

    batch = make_batch()
    normalizer = batch["weight"].sum()  # the global normalizer, every rank's weights (float32)
    mine = {key: _rank_slice(value, rank) for key, value in batch.items()}
    model = make_model()
    spy = _Spy(fused_wce.linear_cross_entropy)
    fused_wce.linear_cross_entropy = spy
    try:
        if scenario in ("fsdp2", "fsdp2_bf16", "fsdp2_bf16_output", "fsdp2_head_in_root"):
            add_weighted_lm_head(model)  # as the trainer does: patched before sharding
            runner = _shard_fsdp2(model, mesh, scenario.startswith("fsdp2_bf16"),
                                  head_unit=scenario != "fsdp2_head_in_root",
                                  output_dtype=torch.bfloat16 if scenario == "fsdp2_bf16_output" else None)
        elif scenario in ("fsdp1", "fsdp1_bf16"):
            runner = _wrap_fsdp1(model, scenario == "fsdp1_bf16")
            add_weighted_lm_head(model)  # patched after wrapping: the head is found through its FSDP wrapper
        elif scenario == "tp_head":
            from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

            add_weighted_lm_head(model)
            runner = parallelize_module(model, mesh, {"lm_head": RowwiseParallel()})
        else:
            raise ValueError(f"unknown scenario {scenario!r}")

        inputs = WeightedLossInputs(mine["target"], mine["weight"], normalizer)
        try:
            output = runner(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"], fused_wce_loss=inputs)
        except RuntimeError as error:
            if scenario == "tp_head":
                return {"raised": str(error)}
            raise
        if scenario == "tp_head":
            raise AssertionError("a hidden-sharded (RowwiseParallel) head inside its forward did not raise")
        returned_dtype = str(output.loss.dtype)
        output = output.in_float32()  # as the trainer reads it
        # FSDP averages gradients over ranks; the normalizer already covers every rank's weights.
        (output.loss * WORLD_SIZE).backward()
        loss = output.loss.detach().clone()
        dist.all_reduce(loss)
        grads = _full_grads_fsdp1(runner) if scenario.startswith("fsdp1") else _full_grads_fsdp2(model)
        return {"grads": grads, "loss": loss.item(), "seen": spy.seen, "structure": str(runner),
                "sent_weight": mine["weight"], "sent_normalizer": normalizer, "returned_dtype": returned_dtype,
                "loss_dtype": str(output.loss.dtype), "token_loss": output.token_loss.clone(),
                "entropy": output.entropy.clone()}
    finally:
        fused_wce.linear_cross_entropy = spy.function


TEMPERATURE = 0.8


def log_prob_coefficients(batch):
    """Fixed upstream coefficients of the log-prob scenarios, as a policy-gradient loss makes them: signed per-token
    ``c`` on the log-probabilities, ``d`` on the entropies, and the global number of scored tokens ``n``; the
    objective is ``sum(c * log_prob + d * entropy) / n``."""
    scored = batch["target"] != -100
    return (batch["weight"] - 0.9) * scored, 0.3 * batch["weight"], scored.sum().float()


def run_log_prob_scenario(scenario: str, rank: int, mesh) -> dict:
    """``add_log_prob_lm_head`` (temperature 0.8, entropies) on the sharded model, the head its own unit: the
    objective of :func:`log_prob_coefficients` on this rank's rows, times the world size (FSDP averages)."""
    from fused_wce.trl_integration.trainer.log_prob_head import add_log_prob_lm_head

    batch = make_batch()
    coefficient, entropy_coefficient, count = log_prob_coefficients(batch)
    mine = {key: _rank_slice(value, rank) for key, value in batch.items()}
    model = make_model()
    if scenario == "fsdp2_log_prob":
        add_log_prob_lm_head(model, temperature=TEMPERATURE)
        runner = _shard_fsdp2(model, mesh, mixed=False)
    else:
        runner = _wrap_fsdp1(model, mixed=False)
        add_log_prob_lm_head(model, temperature=TEMPERATURE)  # patched after wrapping
    labels = torch.cat([torch.full_like(mine["target"][:, :1], -100), mine["target"]], dim=1)
    output = runner(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"], labels=labels,
                    fused_lm_head=True)
    objective = ((_rank_slice(coefficient, rank) * output.log_probs).sum()
                 + (_rank_slice(entropy_coefficient, rank) * output.entropy).sum()) / count
    (objective * WORLD_SIZE).backward()
    value = objective.detach().clone()
    dist.all_reduce(value)
    grads = _full_grads_fsdp1(runner) if scenario.startswith("fsdp1") else _full_grads_fsdp2(model)
    return {"grads": grads, "objective": value.item(), "structure": str(runner)}


def main(out_dir: str, scenarios: list[str]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for scenario in scenarios:
        try:
            run = run_log_prob_scenario if scenario.endswith("_log_prob") else run_scenario
            result = run(scenario, rank, mesh)
        except Exception:  # recorded for the test to show; the other scenarios still run
            result = {"error": f"rank {rank}:\n{traceback.format_exc()}"}
        errors = [None] * WORLD_SIZE
        dist.all_gather_object(errors, result.get("error"))
        if any(errors):
            result = {"error": "\n".join(error for error in errors if error)}
        if rank == 0:
            torch.save(result, out / f"{scenario}.pt")
        dist.barrier()
    end_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
