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


def materialised_linear_log_prob(hidden, weight, target, *, bias=None, temperature=1.0, softcap=None,
                                 logit_scale=1.0, return_entropy=False, ignore_index=-100, chunk_size=None,
                                 backend="auto", compute_dtype=None, dtype=torch.float32):
    """``fused_wce.linear_log_prob``'s definition with the logits materialised in ``dtype`` (float64 for a
    reference): per-token log p(target) of ``softcap(logit_scale * (hidden @ weight.T + bias)) / temperature``
    and, with ``return_entropy``, the entropy of each row; both 0 where ``target == ignore_index``."""
    del chunk_size, backend
    matmul_dtype = compute_dtype or hidden.dtype
    logits = torch.nn.functional.linear(hidden.to(matmul_dtype), weight.to(matmul_dtype),
                                        None if bias is None else bias.to(matmul_dtype)).to(dtype)
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_p = (logits / temperature).log_softmax(-1)
    counted = target != ignore_index
    log_prob = log_p.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    log_prob = torch.where(counted, log_prob, 0.0)
    if not return_entropy:
        return log_prob
    entropy = torch.where(counted, -(log_p.exp() * log_p).sum(-1), 0.0)
    return log_prob, entropy


# ------------------------------------------------------------------------------------------------------- GRPO
def arithmetic_prompts(n: int):
    """``n`` conversational prompts (a ``prompt`` column of one user message each) as a Dataset."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {2 * i + 1}?"}]}
                              for i in range(n)])


def fixed_rollout(tokenizer):
    """A GRPO ``rollout_func`` that returns the same completions for the same prompts, whatever the model: the
    k-th completion of a prompt in a call is 2-9 random tokens seeded by the prompt's ids and k, then EOS."""

    def rollout(prompts, trainer):
        prompt_ids, completion_ids, seen = [], [], {}
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            k = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            generator = torch.Generator().manual_seed(sum(i * (j + 1) for j, i in enumerate(ids)) * 31 + k)
            length = int(torch.randint(2, 10, (1,), generator=generator))
            completion = torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()
            prompt_ids.append(ids)
            completion_ids.append(completion + [tokenizer.eos_token_id])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


def token_parity_reward(completions, completion_ids, **kwargs):
    """A deterministic reward that varies within each group: from the completion's token ids and length."""
    return [float(sum(ids) % 13) / 6 - len(ids) / 5 for ids in completion_ids]


def grpo_config(output_dir, config_class=None, **overrides):
    """A GRPOConfig (or ``config_class``) for CPU runs in seconds: fp32, SGD at a constant rate without gradient
    clipping (so recorded gradients are the loss's), log every step, two optimizer steps per generation (so the
    second step's ratio differs from 1 and the clipping of the ratio is exercised)."""
    from trl import GRPOConfig

    values = dict(output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none", logging_steps=1,
                  max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                  optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", save_strategy="no", seed=0,
                  disable_tqdm=True, dataloader_num_workers=0, temperature=0.8, steps_per_generation=2,
                  epsilon=0.002, max_grad_norm=0.0)
    values.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return (config_class or GRPOConfig)(**values)


def gradient_recorder():
    """A TrainerCallback that keeps every parameter's gradient just before each optimizer step (``.grads``)."""
    from transformers import TrainerCallback

    class GradientRecorder(TrainerCallback):
        def __init__(self):
            self.grads: list[dict[str, torch.Tensor]] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads.append({name: param.grad.detach().clone() for name, param in model.named_parameters()
                               if param.grad is not None})

    return GradientRecorder()
