"""Resuming ``WeightedSFTTrainer`` from a checkpoint continues exactly as an uninterrupted run.

Adaptive weights (running averages, the per-group sums of the step that moves them next), the logged metrics and
the tokens seen are saved beside ``Trainer``'s state: training N steps equals training k, stopping, resuming and
training N - k (every logged value and every parameter, bit for bit). A process killed with SIGKILL while it saves
loses only the steps after its last complete checkpoint.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from resume_worker import SAVE_STEPS, make_trainer
from trl_helpers import logged

import torch
from transformers import TrainerCallback

MAX_STEPS = 8
TESTS = Path(__file__).parent
KEYS = ("loss", "grad_norm", "num_tokens", "entropy", "loss/assistant", "loss/user", "loss/turn_1",
        "weight/turn_1", "weight/turn_2")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """MAX_STEPS steps without interruption: (log history by step, parameters)."""
    trainer = make_trainer(tmp_path_factory.mktemp("straight"), MAX_STEPS)
    trainer.train()
    return _by_step(trainer), _parameters(trainer)


def _by_step(trainer) -> dict[int, dict]:
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {entry["step"]: {key: entry.get(key) for key in KEYS} for entry in history}


def _parameters(trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.model.named_parameters()}


def _assert_continues(resumed, straight) -> None:
    steps, parameters = straight
    got = _by_step(resumed)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in steps:
        assert got[step] == steps[step], step
    multipliers = [steps[step]["weight/turn_1"] for step in steps]
    assert len(set(multipliers)) > 2  # the adaptive weights moved from step to step
    for name, value in _parameters(resumed).items():
        assert torch.equal(value, parameters[name]), name


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_train_stop_resume_equals_straight_training(straight, tmp_path):
    first = make_trainer(tmp_path, MAX_STEPS, callbacks=[_StopAt(2 * SAVE_STEPS)])
    first.train()
    assert first.state.global_step == 2 * SAVE_STEPS
    resumed = make_trainer(tmp_path, MAX_STEPS)
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{2 * SAVE_STEPS}"))
    _assert_continues(resumed, straight)


def test_killed_while_saving_resumes_from_the_last_complete_checkpoint(straight, tmp_path):
    """SIGKILL in the middle of saving step 6's checkpoint: resume_from_checkpoint=True skips the cut checkpoint,
    resumes from step 4's, and only steps 5 and 6 are trained again."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                                      str(TESTS.parent)]))}
    kill_step = 3 * SAVE_STEPS
    run = subprocess.run([sys.executable, str(TESTS / "resume_worker.py"), str(tmp_path), str(MAX_STEPS),
                          str(kill_step)], env=env, capture_output=True, text=True, timeout=3600)
    assert run.returncode == -9, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / f"checkpoint-{kill_step}").is_dir()  # cut short: no trainer_state.json
    assert not (tmp_path / f"checkpoint-{kill_step}" / "trainer_state.json").exists()
    resumed = make_trainer(tmp_path, MAX_STEPS)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.log_history[0]["step"] == 1  # the history up to step 4 came from its checkpoint
    _assert_continues(resumed, straight)
