"""What a ``WeightedSFTTrainer`` checkpoint holds beside ``Trainer``'s own, and which checkpoint to resume from.

``Trainer`` saves the model, optimizer, scheduler, RNG states and ``trainer_state.json``. The weighted trainer
keeps more: the adaptive multipliers and their running averages (and the per-group sums of the step that will move
them next), the logged metrics of the window since the last log and the number of tokens trained on. They go to
``fused_wce_state.json`` in the checkpoint, written before ``Trainer`` writes ``trainer_state.json``: a checkpoint
with ``trainer_state.json`` is complete, one without it was cut short (a process killed while saving) and is not
resumed from. Plain JSON: Python writes floats exactly (shortest repr), so a resumed run continues bit for bit.
"""
from __future__ import annotations

import json
import os
import re

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

STATE_NAME = "fused_wce_state.json"
FORMAT = 1
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_dir(output_dir, global_step: int) -> str:
    """Where ``Trainer`` writes the checkpoint of ``global_step``."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")


def last_complete_checkpoint(output_dir) -> str | None:
    """The ``checkpoint-<step>`` directory of ``output_dir`` with the largest step that ``Trainer`` finished
    writing (it has ``trainer_state.json``), or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, TRAINER_STATE_NAME)):
            steps.append((int(match.group(1)), name))
    return os.path.join(output_dir, max(steps)[1]) if steps else None


def write_state(checkpoint_dir, state: dict) -> None:
    """``state`` (plain Python values) to ``checkpoint_dir/fused_wce_state.json``, atomically."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = os.path.join(checkpoint_dir, STATE_NAME)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump({"format": FORMAT, **state}, handle)
    os.replace(path + ".tmp", path)


def read_state(checkpoint_dir) -> dict | None:
    """The state :func:`write_state` wrote in ``checkpoint_dir``, or None when there is none."""
    path = os.path.join(checkpoint_dir, STATE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: format {state.get('format')!r}, this version reads format {FORMAT}")
    return state
