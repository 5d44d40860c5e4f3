"""A data collator that carries per-token loss weights, roles, turn positions and turn indices next to TRL's batch.

TRL's :class:`~trl.trainer.sft_trainer.DataCollatorForLanguageModeling` pads (or, padding-free, flattens)
``input_ids`` and ``labels`` only. :class:`WeightedDataCollator` extends it: the per-token columns that
:class:`~.sft_trainer.WeightedSFTTrainer` adds during dataset preparation are padded or
flattened exactly like ``labels``, so every position of the batch keeps its weight, role and turn position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad

from ..token_codes import TOKEN_ROLES, TOKEN_TURN_INDEX, TOKEN_TURN_POSITIONS, TOKEN_WEIGHTS

# Column name -> (padding value, dtype). Weights are float32 (the loss reads them as float32); roles, turn
# positions and turn indices are small codes, -1 meaning "none" (scaffolding, padding, or a dataset without
# messages). The turn index is the 0-based index of the token's message among the messages of its role.
PER_TOKEN_COLUMNS: dict[str, tuple[float | int, torch.dtype]] = {
    TOKEN_WEIGHTS: (0.0, torch.float32),
    TOKEN_ROLES: (-1, torch.int64),
    TOKEN_TURN_POSITIONS: (-1, torch.int64),
    TOKEN_TURN_INDEX: (-1, torch.int64),
}


@dataclass
class WeightedDataCollator(DataCollatorForLanguageModeling):
    """:class:`DataCollatorForLanguageModeling` plus the per-token columns of weighted SFT.

    Each example is a dict with ``input_ids`` (list of int) and optionally ``labels``, ``seq_lengths`` (packing),
    ``token_weights`` (list of float, one per token: the weight of *that* token as a prediction target),
    ``token_roles``, ``token_turn_positions`` and ``token_turn_index`` (lists of int codes, -1 = none). The batch
    has what the parent returns (``input_ids``, ``labels``, ``attention_mask`` or ``position_ids``/
    ``cu_seq_lens_*``...) plus:

    - ``token_weights``: float32 ``[B, T]``; 0 on padding and wherever ``labels == -100`` (so the padding-free
      sequence starts, which the parent masks, get no weight either). Without a ``token_weights`` column the
      weights are 1 exactly where ``labels != -100``: stock TRL's loss.
    - ``token_roles``, ``token_turn_positions`` and ``token_turn_index``: int64 ``[B, T]``, -1 on padding or
      when absent.

    With ``padding_free=True`` all columns are concatenated into one row, as the parent does with ``input_ids``.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        labels = batch["labels"]
        for name, (padding_value, dtype) in PER_TOKEN_COLUMNS.items():
            if name not in examples[0]:
                continue
            sequences = []
            for index, example in enumerate(examples):
                values = example[name]
                if len(values) != len(example["input_ids"]):
                    raise ValueError(
                        f"example {index} of the batch has {len(values)} `{name}` for {len(example['input_ids'])} "
                        "`input_ids`; per-token columns must stay aligned with the tokens (was the dataset "
                        "truncated or packed outside WeightedSFTTrainer?)"
                    )
                sequences.append(torch.as_tensor(values, dtype=dtype))
            if self.padding_free:
                sequences = [torch.cat(sequences, dim=0)]
            batch[name] = pad(sequences, padding_value=padding_value, padding_side="right",
                              pad_to_multiple_of=self.pad_to_multiple_of)

        not_labelled = labels == -100
        if TOKEN_WEIGHTS in batch:
            batch[TOKEN_WEIGHTS] = batch[TOKEN_WEIGHTS].masked_fill(not_labelled, 0.0)
        else:
            batch[TOKEN_WEIGHTS] = (~not_labelled).to(torch.float32)
        for name in (TOKEN_ROLES, TOKEN_TURN_POSITIONS, TOKEN_TURN_INDEX):
            if name not in batch:
                batch[name] = torch.full_like(labels, -1, dtype=torch.int64)
        return batch
