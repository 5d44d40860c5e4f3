"""Dataset preparation of :class:`~fused_wce.trl_integration.trainer.sft_trainer.WeightedSFTTrainer`.

A conversational dataset (a ``messages`` or ``conversations`` column) is tokenized with
:func:`~fused_wce.trl_integration.chat_weights.tokenize.tokenize_with_weights`, which adds the per-token columns
of :mod:`~fused_wce.trl_integration.token_codes`; ``labels`` are the token ids where the weight is > 0 and -100
elsewhere. Truncation (``max_length``) and packing keep those columns aligned with ``input_ids`` (TRL itself
truncates and packs only ``input_ids``/``labels``); examples without a weighted target are dropped with a warning.
The ``dataset.map`` functions are module-level, so they pickle for ``num_proc > 1``.
"""
from __future__ import annotations

import json
import warnings
from typing import Any

from datasets import Dataset
from trl.data_utils import get_dataset_column_names, maybe_convert_to_chatml, pack_dataset
from trl.trainer.utils import global_then_local_main_first

from ..chat_weights.template_spans import ChatTemplateError
from ..chat_weights.tokenize import tokenize_with_weights
from ..token_codes import TOKEN_ROLES, TOKEN_TURN_INDEX, TOKEN_TURN_POSITIONS, TOKEN_WEIGHTS
from .collator import PER_TOKEN_COLUMNS


def weighted_dataset_kind(columns: list[str], formatting_func) -> str | None:
    """``"pretokenized"`` (``input_ids`` and ``token_weights``), ``"conversational"`` (``messages`` or
    ``conversations``, no formatting function) or ``None`` (a dataset TRL prepares itself)."""
    if "input_ids" in columns and TOKEN_WEIGHTS in columns:
        return "pretokenized"
    if "input_ids" not in columns and formatting_func is None and ("messages" in columns or "conversations" in columns):
        return "conversational"
    return None


def prepare_weighted_dataset(dataset, *, conversational: bool, tokenizer, weighting, chat_template, args,
                             packing: bool, dataset_name: str):
    """Tokenize (``conversational``: a ``messages`` or ``conversations`` column), label, truncate, drop unweighted
    examples, pack and shuffle ``dataset`` as ``args`` (an ``SFTConfig``) says. ``chat_template``: the template
    to tokenize with (TRL's training template with ``{% generation %}`` blocks under ``assistant_only_loss``) or
    None for the tokenizer's."""
    if isinstance(dataset, Dataset) and dataset.format["type"] == "custom":
        raise ValueError("WeightedSFTTrainer cannot prepare a dataset that uses `Dataset.with_transform()`; "
                         "materialise the transform with `Dataset.map()` first")
    with global_then_local_main_first():
        if conversational:
            dataset = _tokenized(dataset, tokenizer, weighting, chat_template, args, dataset_name)
        if "labels" not in get_dataset_column_names(dataset):
            dataset = dataset.map(_labels_from_weights,
                                  **_map_options(dataset, args, dataset_name, "Building labels for"))
        per_token = ["input_ids", "labels"] + [name for name in PER_TOKEN_COLUMNS
                                               if name in get_dataset_column_names(dataset)]
        if args.max_length is not None and not packing:
            dataset = _truncated(dataset, per_token, args, dataset_name)
        dataset = _without_unweighted_examples(dataset, args, dataset_name)
        if packing:
            dataset = _packed(dataset, per_token, args, dataset_name)
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    return dataset


def _map_options(dataset, args, dataset_name: str, what: str) -> dict[str, Any]:
    """Keyword arguments of ``dataset.map/filter``: ``num_proc`` and a ``desc`` (``IterableDataset`` takes neither)."""
    if not isinstance(dataset, Dataset):
        return {}
    return {"num_proc": args.dataset_num_proc, "desc": f"{what} {dataset_name} dataset"}


def _tokenized(dataset, tokenizer, weighting, chat_template, args, dataset_name: str):
    if "messages" not in get_dataset_column_names(dataset):
        dataset = dataset.map(maybe_convert_to_chatml, remove_columns="conversations",
                              **_map_options(dataset, args, dataset_name, "Converting to ChatML"))
    return dataset.map(_tokenize_example, with_indices=True,
                       fn_kwargs={"tokenizer": tokenizer, "weighting": weighting, "chat_template": chat_template,
                                  "dataset_name": dataset_name},
                       **_map_options(dataset, args, dataset_name, "Tokenizing (with turn weights)"))


def _truncated(dataset, per_token: list[str], args, dataset_name: str):
    if args.truncation_mode == "keep_start":
        window = slice(None, args.max_length)
    elif args.truncation_mode == "keep_end":
        window = slice(-args.max_length, None)
    else:
        raise ValueError(f"Unsupported truncation_mode {args.truncation_mode!r}: expected 'keep_start' or 'keep_end'")
    return dataset.map(_truncate, fn_kwargs={"columns": per_token, "window": window},
                       **_map_options(dataset, args, dataset_name, "Truncating"))


def _without_unweighted_examples(dataset, args, dataset_name: str):
    """A sequence whose targets all have weight 0 (or label -100) teaches nothing: drop it, loudly."""
    size_before = len(dataset) if isinstance(dataset, Dataset) else None
    dataset = dataset.filter(_has_weighted_target,
                             **_map_options(dataset, args, dataset_name, "Dropping unweighted examples from"))
    if size_before is not None and len(dataset) < size_before:
        warnings.warn(
            f"WeightedSFTTrainer dropped {size_before - len(dataset)} of {size_before} {dataset_name} examples "
            "with no weighted target token (every weight 0 after weighting/truncation)", stacklevel=5)
        if len(dataset) == 0:
            raise ValueError(f"No {dataset_name} example has a token with weight > 0: nothing to train on. "
                             "Check the weighting (role_weights, last_n) and max_length.")
    return dataset


def _packed(dataset, per_token: list[str], args, dataset_name: str):
    if args.max_length is None:
        raise ValueError("When packing is enabled, `max_length` can't be `None`.")
    dataset = dataset.select_columns(per_token)
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    return pack_dataset(dataset, args.max_length, args.packing_strategy,
                        _map_options(dataset, args, dataset_name, "Packing"))


# ------------------------------------------------------------------------------ dataset.map functions (picklable)
def _tokenize_example(example, index, tokenizer, weighting, chat_template=None, dataset_name="train"):
    """One conversation's tokens and per-token columns; a bad row raises its error prefixed with the row index."""
    try:
        tools = example.get("tools")
        if isinstance(tools, str):
            tools = json.loads(tools)
        encoded = tokenize_with_weights(tokenizer, example["messages"], weighting, tools=tools,
                                        chat_template=chat_template,
                                        template_kwargs=example.get("chat_template_kwargs") or None)
    except (ValueError, TypeError) as error:  # bad messages or weights, a template that cannot segment them
        kind = next(kind for kind in (ChatTemplateError, ValueError, TypeError) if isinstance(error, kind))
        raise kind(f"{dataset_name} dataset row {index}: {error}") from error
    return {
        "input_ids": encoded["input_ids"],
        TOKEN_WEIGHTS: [float(w) for w in encoded[TOKEN_WEIGHTS]],
        TOKEN_ROLES: encoded[TOKEN_ROLES],
        TOKEN_TURN_POSITIONS: encoded[TOKEN_TURN_POSITIONS],
        TOKEN_TURN_INDEX: encoded[TOKEN_TURN_INDEX],
    }


def _labels_from_weights(example):
    return {"labels": [token if weight > 0 else -100
                       for token, weight in zip(example["input_ids"], example[TOKEN_WEIGHTS], strict=True)]}


def _truncate(example, columns, window):
    return {name: example[name][window] for name in columns}


def _has_weighted_target(example):
    # Position 0 is never a prediction target (causal shift), so its weight cannot train anything.
    return any(label != -100 and weight > 0
               for label, weight in zip(example["labels"][1:], example[TOKEN_WEIGHTS][1:], strict=True))
