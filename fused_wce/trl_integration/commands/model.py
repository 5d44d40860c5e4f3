"""The model and tokenizer of a command: the tiny demo Llama and the shipped tokenizer without
``--model_name_or_path``, a ``.gguf`` file de-quantised (:mod:`~fused_wce.trl_integration.gguf_models`), else the
named model (loaded by the trainer) and its tokenizer; and the CPU thread setting of the commands."""
from __future__ import annotations

import os

from ..gguf_models import is_gguf, load_gguf_model, load_gguf_tokenizer


def build_tiny_model(tokenizer, seed: int, max_length: int | None):
    """A 2-layer Llama with hidden size 128 over ``tokenizer``'s vocabulary, tied embeddings, seeded init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(max_length or 0, 2048),
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def one_cpu_thread(use_cpu: bool) -> None:
    """On CPU, run torch on one intra-op thread unless OMP_NUM_THREADS says otherwise.

    The tiny demo model's matrices (hidden 128) are too small to split: measured on 2 shared cores, 10 demo steps
    took 2.4 s on one thread and 23 s on two (the threads wait on each other whenever another process holds a
    core). A 135M model on the same busy cores: one 220-token forward took 2.2-3.0 s on one thread, 6-17 s on two.
    On an idle machine, set OMP_NUM_THREADS to the number of cores. Results are the same either way.
    """
    import torch

    if "OMP_NUM_THREADS" not in os.environ and (use_cpu or not torch.cuda.is_available()):
        torch.set_num_threads(1)


def load_tokenizer(model_name_or_path: str, revision=None, trust_remote_code=False):
    """The model's tokenizer, or the shipped one (with a notice) where the model has none."""
    from transformers import AutoTokenizer

    from ..chat_data import build_tokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name_or_path, revision=revision,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        print(f"[fused-wce] no tokenizer at {model_name_or_path} ({type(error).__name__}); "
              "using the shipped tokenizer (its vocabulary must match the model's)")
        return build_tokenizer()


def build_model(model_args, training_args):
    """(model or its name for the trainer to load, tokenizer): the tiny demo Llama without a model path."""
    from ..chat_data import build_tokenizer

    if model_args.model_name_or_path is None:
        one_cpu_thread(training_args.use_cpu)
        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, training_args.seed, training_args.max_length)
        return model, tokenizer
    if is_gguf(model_args.model_name_or_path):
        return load_gguf_model(model_args.model_name_or_path, model_args.dtype), load_gguf_tokenizer(
            model_args.model_name_or_path)
    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    model = model_args.model_name_or_path
    return model, load_tokenizer(model, model_args.model_revision, training_args.trust_remote_code)


def load_model(model_name_or_path: str, dtype=None):
    """(model, tokenizer) of a local checkpoint folder, a model name or a ``.gguf`` file, in eval mode, on CUDA
    when there is one. ``dtype``: a torch dtype or its name (default: the checkpoint's)."""
    import torch
    from transformers import AutoModelForCausalLM

    if is_gguf(model_name_or_path):
        model, tokenizer = load_gguf_model(model_name_or_path, dtype), load_gguf_tokenizer(model_name_or_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype or "auto")
        tokenizer = load_tokenizer(model_name_or_path)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


def unwrap_model(trainer):
    """The PreTrainedModel under DDP/PEFT wrappers (LoRA layers stay injected, so they still apply)."""
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if is_peft_model(model) else model
