"""The data of a command: the shipped conversations, a local ``.jsonl``, a hub dataset or a mixture, split into
training and held-out conversations and checked row by row before any model is built."""
from __future__ import annotations

import os

from .options import UsageError


def load_datasets(script_args, dataset_args, holdout_size: int, seed: int):
    """(train, held-out or None): the shipped dataset, a local jsonl, a hub/local dataset, or a mixture.

    A local jsonl is checked row by row (ValueError naming ``file:line``); see
    :func:`~fused_wce.trl_integration.chat_data.load_jsonl_dataset`.
    """
    from datasets import Dataset, DatasetDict, IterableDataset, load_dataset

    from ..chat_data import load_default_dataset, load_jsonl_dataset

    if dataset_args.datasets:
        from trl import get_dataset

        loaded = get_dataset(dataset_args)
    elif script_args.dataset_name is None:
        loaded = load_default_dataset()
    elif _is_local_jsonl(script_args.dataset_name):
        loaded = load_jsonl_dataset(script_args.dataset_name)
    else:
        loaded = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                              streaming=script_args.dataset_streaming)

    if isinstance(loaded, (DatasetDict, dict)) or hasattr(loaded, "keys"):
        train = loaded[script_args.dataset_train_split]
        if script_args.dataset_test_split in loaded:
            return train, loaded[script_args.dataset_test_split]
    else:
        train = loaded
    if isinstance(train, IterableDataset) or holdout_size <= 0:
        return train, None
    if not isinstance(train, Dataset) or len(train) < 2 * holdout_size:
        holdout_size = len(train) // 10
        if holdout_size == 0:
            return train, None
    split = train.train_test_split(test_size=holdout_size, seed=seed, shuffle=True)
    return split["train"], split["test"]


def check_conversations(dataset, weighting, source: str) -> None:
    """Every row's ``messages`` through ``weighting.message_weights`` (roles, content, weights): ValueError
    ``{source}: row {i}: ...`` for the first bad one. Streaming datasets and ones without ``messages`` pass."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or "messages" not in dataset.column_names:
        return
    for index, messages in enumerate(dataset["messages"]):
        try:
            weighting.message_weights(messages)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{source}: row {index}: {error}") from None


def _is_local_jsonl(name) -> bool:
    return isinstance(name, str) and os.path.isfile(name) and name.endswith((".jsonl", ".json"))


def check_local_jsonl_early(argv: list[str]) -> None:
    """A local ``--dataset_name`` jsonl, checked row by row straight from the command line, before the flags are
    parsed (which imports transformers and TRL, a minute on a busy machine): :class:`UsageError` on a bad row.
    The full check after parsing still runs (it also covers a dataset named in a ``--config`` file)."""
    for position, arg in enumerate(argv):
        flag, has_value, value = arg.partition("=")
        if flag not in ("--dataset_name", "--dataset-name"):
            continue
        if not has_value:
            value = argv[position + 1] if position + 1 < len(argv) else None
        if _is_local_jsonl(value):
            from ..chat_data import read_jsonl_rows

            try:
                read_jsonl_rows(value)
            except ValueError as error:
                raise UsageError(_one_line(error)) from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def prepare_data(script_args, dataset_args, weighting, holdout_size: int, seed: int):
    """(train, held-out): loaded and checked before any model is built; :class:`UsageError` on bad data."""
    source = script_args.dataset_name or "the shipped dataset"
    try:
        train, holdout = load_datasets(script_args, dataset_args, holdout_size, seed)
        check_conversations(train, weighting, f"{source} (train split)")
        if holdout is not None:
            check_conversations(holdout, weighting, f"{source} (held-out split)")
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(_one_line(error)) from None
    return train, holdout
