"""Shared helpers of the TRL-integration tests: tiny offline models, CPU-safe SFTConfigs, logged values."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def tiny_model(kind: str, tokenizer, seed: int = 0, **config_overrides):
    """A 2-layer causal LM of ``kind`` ("llama", "qwen2", "gemma2", "mixtral") over the tokenizer's vocabulary, seeded init."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                              MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "gemma2": (Gemma2Config, Gemma2ForCausalLM), "mixtral": (MixtralConfig, MixtralForCausalLM)}
    config_class, model_class = classes[kind]
    if kind == "gemma2":
        common.update(head_dim=8)
    if kind == "mixtral":  # a mixture of experts with its router load-balancing loss
        common.update(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)
    common.update(config_overrides)
    config = config_class(**common)
    torch.manual_seed(seed)
    return model_class(config)


def sft_config(output_dir, **overrides):
    """An SFTConfig that runs on 2 CPU cores in seconds: fp32, no checkpointing, no trackers, log every step."""
    from trl import SFTConfig

    values = dict(output_dir=str(output_dir), use_cpu=True, bf16=False, gradient_checkpointing=False,
                  report_to="none", logging_steps=1, max_steps=3, per_device_train_batch_size=4,
                  learning_rate=1e-3, save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
                  max_length=256)
    values.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing -> activation_checkpointing
        return SFTConfig(**values)


def logged(trainer, key: str) -> list[float]:
    """The values of ``key`` in the trainer's log history, in step order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]
