"""Worker of tests/test_resume.py: a short adaptive-weighting run that checkpoints every 2 steps.

    python tests/resume_worker.py OUT_DIR MAX_STEPS KILL_STEP

trains in ``OUT_DIR`` and kills its own process with SIGKILL while it saves the checkpoint of ``KILL_STEP``
(after the model is written, before the optimizer and ``trainer_state.json``): the checkpoint is left cut short,
as a machine that dies mid-save leaves it. :func:`make_trainer` builds the same trainer in the test process.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from trl_helpers import sft_config, tiny_model  # noqa: E402  (sets HF_HUB_OFFLINE first)

SAVE_STEPS = 2


def make_trainer(output_dir, max_steps: int, callbacks=None):
    """The adaptive-weighting trainer of the resume tests: tiny Llama, 2 x 2 accumulated micro-batches a step."""
    from fused_wce.trl_integration import AdaptiveTurnWeights, TurnWeighting, WeightedSFTTrainer
    from fused_wce.trl_integration.chat_data import build_tokenizer, load_default_dataset

    tokenizer = build_tokenizer()
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.3},
                              adaptive=AdaptiveTurnWeights(ema_decay=0.5, power=2.0))
    args = sft_config(output_dir, max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                      learning_rate=3e-3, save_strategy="steps", save_steps=SAVE_STEPS, max_length=128)
    return WeightedSFTTrainer(tiny_model("llama", tokenizer), weighting=weighting, args=args,
                              train_dataset=load_default_dataset().select(range(40)), processing_class=tokenizer,
                              callbacks=callbacks)


def main(output_dir: str, max_steps: int, kill_step: int) -> None:
    trainer = make_trainer(output_dir, max_steps)
    save_model = trainer.save_model

    def save_model_then_die(path=None, *args, **kwargs):
        save_model(path, *args, **kwargs)
        if path is not None and os.path.basename(os.path.normpath(path)) == f"checkpoint-{kill_step}":
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.save_model = save_model_then_die
    trainer.train()
    raise SystemExit(f"training ended without reaching the checkpoint of step {kill_step}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
