"""Worker of tests/test_hybrid.py::test_two_processes_equal_one_process (torchrun, CPU, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/hybrid_worker.py OUT_DIR MODEL_DIR SCENARIO...

Trains :func:`train` (the tiny Llama saved in MODEL_DIR, fixed completions, 2 SGD steps, GA 2) on 2 processes with
half the per-device batches of the single-process run the test makes in its own process, and writes, from the main
process, ``OUT_DIR/<scenario>.pt``: ``{"logs": {key: logged values}, "params": full parameters}``, or
``{"error": traceback}``. Scenarios: ``ddp`` (DistributedDataParallel) and ``fsdp2`` (FSDP2 through accelerate:
every decoder layer its own unit, the rest, LM head included, in the root's).
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl_helpers import arithmetic_prompts, fixed_rollout, grpo_config, logged, token_parity_reward  # noqa: E402

import torch  # noqa: E402

from helpers import end_distributed_worker  # noqa: E402

# Logged values that do not depend on how a step's sequences are split into micro-batches and ranks (TRL's kl,
# entropy and clip ratios are means per micro-batch, averaged over the micro-batches: they do).
LOGGED = ("loss", "hybrid/mu", "hybrid/grpo_loss", "hybrid/sft_loss", "loss/assistant", "loss/user", "reward")
def fsdp2_model(model_dir: str):
    """The tiny Llama sharded with FSDP2 at load time over the 2 CPU processes (transformers'
    ``from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))``; Trainer then neither wraps it in DDP nor
    shards it again): ``fully_shard`` on each decoder layer, on ``lm_head`` as its own unit (its parameters are
    unsharded only inside its own forward, where both fused heads run), then on the root."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    return AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(fsdp_size=2))


def train(out_dir, model_dir: str, per_device: int, sharded: bool = False):
    """The hybrid run of the test: per-device GRPO and SFT batches of ``per_device``, GA 2, mu 0.4, beta 0.1,
    ``loss_type="dapo"`` (normalised by the tokens of the whole generation batch, over ranks), turn weights with
    user turns at 0.3 and decay, p(1-p) reweighting; returns the trainer after 2 steps."""
    from fused_wce.trl_integration import TurnWeighting
    from fused_wce.trl_integration.chat_data import build_tokenizer, load_default_dataset
    from fused_wce.trl_integration.trainer.hybrid_config import HybridConfig
    from fused_wce.trl_integration.trainer.hybrid_trainer import HybridTrainer

    tokenizer = build_tokenizer()
    args = grpo_config(out_dir, HybridConfig, per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
                       sft_per_device_train_batch_size=per_device, sft_mu=0.4, beta=0.1,
                       sft_token_reweighting="p(1-p)", loss_type="dapo",
                       ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    trainer = HybridTrainer(fsdp2_model(model_dir) if sharded else model_dir, reward_funcs=token_parity_reward,
                            args=args, train_dataset=arithmetic_prompts(16), processing_class=tokenizer,
                            rollout_func=fixed_rollout(tokenizer),
                            sft_dataset=load_default_dataset().select(range(24)),
                            weighting=TurnWeighting(role_weights={"assistant": 1.0, "user": 0.3}, decay=0.5))
    trainer.train()
    return trainer


def result(trainer) -> dict:
    """Logged values and full parameters (gathered from FSDP shards; on every rank, used on the main one)."""
    from torch.distributed.tensor import DTensor

    model = trainer.accelerator.unwrap_model(trainer.model)
    params = {name: (param.full_tensor() if isinstance(param, DTensor) else param).detach().float().clone()
              for name, param in model.named_parameters()}
    return {"logs": {key: logged(trainer, key) for key in (*LOGGED, "kl")},
            "head_sharded": isinstance(model.lm_head.weight, DTensor), "params": params}


def main(out_dir: str, model_dir: str, scenarios: list[str]) -> None:
    import torch.distributed as dist

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for scenario in scenarios:
        try:
            if scenario not in ("ddp", "fsdp2"):
                raise ValueError(f"unknown scenario {scenario!r}")
            outcome = result(train(out / scenario, model_dir, per_device=2, sharded=scenario == "fsdp2"))
        except Exception:  # recorded for the test to show
            outcome = {"error": f"rank {os.environ.get('RANK')}:\n{traceback.format_exc()}"}
        if dist.is_initialized():
            errors = [None, None]
            dist.all_gather_object(errors, outcome.get("error"))
            if any(errors):
                outcome = {"error": "\n".join(error for error in errors if error)}
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(outcome, out / f"{scenario}.pt")
    end_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
