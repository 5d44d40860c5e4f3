"""Offline tokenizers for the real chat templates in tests/chat_templates (see its README)."""
from __future__ import annotations

import functools
from pathlib import Path

TEMPLATE_DIR = Path(__file__).with_name("chat_templates")

# Control tokens of every template family (special, as in the real tokenizers) ...
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
    "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
]
# ... and tags the real tokenizers add as ordinary (non-special) tokens.
ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
]
# (bos, eos) per family, as their tokenizers define them.
BOS_EOS = {
    "qwen": (None, "<|im_end|>"), "smollm2": (None, "<|im_end|>"), "phi4": (None, "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"), "mistral": ("<s>", "</s>"), "gemma": ("<bos>", "<eos>"),
    "phi3": ("<s>", "<|endoftext|>"), "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}


@functools.lru_cache(maxsize=None)
def _backend_json(corpus: tuple[str, ...]) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(corpus) * 3, trainer=trainer)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in ADDED_TOKENS])
    return tokenizer.to_str()


def read_template(name: str) -> str:
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def family_tokenizer(template_name: str, family: str, corpus: tuple[str, ...]):
    """A fast tokenizer (byte-level BPE trained on ``corpus``, all template control tokens added) with the
    template ``template_name`` and the bos/eos tokens of ``family``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    bos, eos = BOS_EOS[family]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json(corpus)), bos_token=bos, eos_token=eos,
        pad_token="<|endoftext|>", chat_template=read_template(template_name), padding_side="right")
