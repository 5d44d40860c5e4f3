"""What the evaluation asks of a model: per-token losses of token sequences (one batched forward) and greedy
replies (one batched ``generate``, or continuations of a cached forward when the prompts are its prefixes)."""
from __future__ import annotations

import math

import numpy as np

END_OF_TURN = "<|im_end|>"


def token_losses(model, sequences: list[list[int]], keep_cache: bool = False):
    """For each token sequence a float64 array: entry ``t`` the cross-entropy of token ``t`` given tokens ``< t``
    (entry 0 nan), from the model's own logits (any softcap or scale it applies included). One forward over the
    sequences right-padded into a batch (a causal model's losses do not depend on what follows). With
    ``keep_cache`` (one sequence): ``(losses, the forward's key/value cache)``. No gradients."""
    import torch

    device = next(model.parameters()).device
    width = max(len(ids) for ids in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence, device=device)
        mask[row, :len(sequence)] = 1
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, use_cache=keep_cache)
        losses = torch.nn.functional.cross_entropy(output.logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                                   reduction="none").double().cpu().numpy()
    losses = [np.concatenate([[math.nan], losses[row, :len(sequence) - 1]]) for row, sequence in enumerate(sequences)]
    return (losses, output.past_key_values) if keep_cache else losses


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Tokens of ``messages`` with the chat template's generation prompt (what the model replies to)."""
    return list(tokenizer.apply_chat_template(_plain(messages), add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def greedy_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, cache=None) -> list[str]:
    """The model's greedy reply to each token sequence of ``prompts``, decoded without special tokens, trimmed.

    One batched ``generate`` (prompts left-padded); with ``cache`` (one prompt), a key/value cache of its first
    tokens to continue from."""
    import torch
    from transformers import GenerationConfig

    if not prompts:
        return []
    stop = _stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(prompts):
        ids[row, width - len(sequence):] = torch.tensor(sequence, device=device)
        mask[row, width - len(sequence):] = 1
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)
    output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, past_key_values=cache)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]


def _shareable(cache) -> bool:
    """Whether prefixes of ``cache`` can be cut out with ``crop``: plain full-attention layers only."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def replies_in_context(model, tokenizer, prompts: list[list[int]], full_ids: list[int], cache,
                       max_new_tokens: int) -> list[str]:
    """Greedy replies to ``prompts``, prefixes of ``full_ids`` whose forward left ``cache``: each continues from
    the cache cut to its prompt (no prompt is run through the model again). Falls back on
    :func:`greedy_replies` when a prompt is not a prefix or the cache cannot be cut."""
    import copy

    if cache is None or not _shareable(cache) or any(p != full_ids[:len(p)] for p in prompts):
        return greedy_replies(model, tokenizer, prompts, max_new_tokens)
    replies = []
    for prompt in prompts:
        prefix = copy.deepcopy(cache)
        prefix.crop(len(prompt) - 1 - prefix.get_seq_length())  # negative: drop that many tokens at the end
        replies += greedy_replies(model, tokenizer, [prompt], max_new_tokens, cache=prefix)
    return replies


def _plain(messages: list[dict]) -> list[dict]:
    """Messages with only ``role`` and ``content`` (labels and weights are not for the template)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]
