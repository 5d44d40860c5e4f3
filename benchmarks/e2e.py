"""End-to-end row: one SFT training step of a small causal LM built from a config (random weights).

Compared, on the same model, batch and optimizer:

- ``hf_model_loss``: stock transformers, ``model(input_ids, labels=labels).loss`` (materialised logits);
- ``trl_fused_lm_head``: stock TRL 1.16 SFTTrainer's loss: ``trl.trainer.utils.add_fused_lm_head`` patches the
  forward; ``model(..., labels=labels, fused_lm_head=True)`` and ``-(log_probs).sum() / label_mask.sum()``
  (SFTTrainer.compute_loss's default);
- ``fused_wce``: the backbone's last hidden states and ``lm_head.weight`` into ``fused_wce.linear_cross_entropy``
  with the per-token weights (the public API; ``fused_wce.trl_integration.WeightedSFTTrainer`` runs the same call
  inside its patched forward, but importing the trainer is not needed to time the loss it computes).

A step is forward + backward + ``AdamW.step()`` + ``zero_grad``. Peak memory is above the model, its optimizer
state (created by a warm-up step) and the batch: CUDA ``max_memory_allocated``; CPU the peak of torch's
allocations during the step, and beside it the step's exact peak RSS (``benchmarks.measure.cpu_peak_above``). GPU: a Qwen2.5-0.5B-sized config in bf16; CPU: a small config.
"""
from __future__ import annotations

import copy
import gc
import time

IGNORE_INDEX = -100

GPU_CONFIG = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)
CPU_CONFIG = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=True)
SMOKE_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=True)
CONFIGS = {"gpu": GPU_CONFIG, "cpu": CPU_CONFIG, "smoke": SMOKE_CONFIG}
E2E_PROVIDERS = ("hf_model_loss", "trl_fused_lm_head", "fused_wce")


def build_batch(batch_size: int, seq_len: int, vocab: int, counted_fraction: float, device, generator):
    """input_ids ``[B, T]``; labels with -100 on the prompt part of each 512-token exchange; weights ``[B, T]``."""
    import torch

    from .workloads import EARLY_TURN_WEIGHT, TURN_TOKENS, counted_mask

    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    counted = counted_mask(seq_len, counted_fraction).expand(batch_size, seq_len).to(device)
    labels = torch.where(counted, input_ids, IGNORE_INDEX)
    turn = torch.arange(seq_len, device=device) // TURN_TOKENS
    weights = torch.where(counted & ((turn % 4) < 2), EARLY_TURN_WEIGHT, counted.float())
    return input_ids, labels, weights


def run_e2e_task(task: dict, emit) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from . import measure

    device = task["device"]
    dtype = getattr(torch, task["dtype"])
    config = Qwen2Config(**CONFIGS[task["config"]])
    config._attn_implementation = "sdpa"
    torch.manual_seed(task.get("seed", 0))
    with torch.device(device):  # initialised where it runs: 0.5B parameters take long to initialise on a CPU
        base_model = Qwen2ForCausalLM(config).to(dtype=dtype)
    n_params = sum(p.numel() for p in base_model.parameters())
    generator = torch.Generator().manual_seed(task.get("seed", 0))
    input_ids, labels, weights = build_batch(task["batch_size"], task["seq_len"], config.vocab_size,
                                             task["counted_fraction"], device, generator)
    common = {"kind": "e2e", "device": device, "dtype": task["dtype"], "n_params": n_params,
              "batch_size": task["batch_size"], "seq_len": task["seq_len"],
              "counted_fraction": task["counted_fraction"], "model_config": task["config"]}
    for name in task["providers"]:
        if task.get("deadline") and time.time() > task["deadline"]:
            emit({**common, "provider": name, "status": "skipped", "reason": "time budget of the profile spent"})
            continue
        row = {**common, "provider": name}
        model = optimizer = loss_fn = None
        try:
            model = copy.deepcopy(base_model)  # every provider starts from the same weights
            model.train()
            loss_fn, note = _loss_function(name, model, input_ids, labels, weights)
            row["loss_note"] = note
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

            def step(_i=0):
                loss = loss_fn()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step.loss = loss.detach()

            for _ in range(task["warmup"]):  # creates the optimizer state, compiles kernels
                step()
            if device == "cuda":
                torch.cuda.synchronize()
                row["peak_memory_bytes"] = measure.cuda_peak_above(step)
                times = measure.cuda_times(step, task["reps"])
            else:
                # Peak of torch's allocations during one step above what was allocated before it (model, optimizer
                # state, batch), and the step's exact peak RSS above the RSS before it: the allocator's free pages
                # are returned first, so nothing the warm-up or an earlier provider freed can absorb this step's
                # allocations (benchmarks.measure.cpu_peak_above).
                row.update(measure.cpu_peak_above(step))
                if not measure.rss_high_water_supported():  # sampled RSS after a warm-up sees only what is new
                    row["peak_rss_bytes"] = None
                times = measure.wall_times(step, task["reps"])
            row.update(measure.summarize(times))
            row["loss"] = step.loss.float().item()
            row["status"] = "ok"
        except Exception as error:  # one failing provider must not lose the others' rows
            import traceback

            row.update(status="oom" if "out of memory" in str(error).lower() else "error",
                       reason=f"{type(error).__name__}: {str(error)[:300]}", traceback=traceback.format_exc()[-2000:])
        emit(row)
        model = optimizer = loss_fn = step = None  # this provider's model and state go before the next one's
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def _loss_function(name: str, model, input_ids, labels, weights):
    """A zero-argument closure computing the step's loss with ``name``, and a note on what it computes."""
    if name == "hf_model_loss":
        return (lambda: model(input_ids=input_ids, labels=labels).loss,
                "transformers ForCausalLMLoss: full logits, fp32 upcast, mean over labelled tokens (unweighted)")
    if name == "trl_fused_lm_head":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer 1.16 does

        def trl_loss():
            outputs = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
            return -outputs.log_probs.sum() / outputs.label_mask.sum().clamp(min=1)

        return trl_loss, "TRL 1.16 SFTTrainer: add_fused_lm_head + -(log_probs).sum()/label_mask.sum() (unweighted)"
    if name == "fused_wce":
        import fused_wce

        def fused_loss():
            hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
            return fused_wce.linear_cross_entropy(hidden, model.lm_head.weight, labels[:, 1:], weights[:, 1:])

        return fused_loss, "base-model hidden states + fused_wce.linear_cross_entropy(lm_head.weight), per-token weights"
    raise ValueError(f"unknown end-to-end provider {name!r}")
