"""The trainer of a command: a :class:`WeightedSFTTrainer` whose logs print as one line per step (per-role and
per-turn losses, adaptive multipliers), with the loss-curves callback."""
from __future__ import annotations

import math

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback


class StageLossPrinter(TrainerCallback):
    """Prints ``step | loss | acc | per-role | per-turn | multipliers`` on every log (main process only), and the
    run's summary at the end."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:
            print(f"[fused-wce] trained {state.global_step} steps in {logs['train_runtime']:.1f} s "
                  f"(mean loss {logs.get('train_loss', math.nan):.4f})", flush=True)
        for prefix in ("", "eval_"):
            loss = logs.get(f"{prefix}loss")
            if loss is None:
                continue
            line = f"[fused-wce] {'eval ' if prefix else ''}step {state.global_step:>5}  loss {loss:.4f}"
            accuracy = logs.get(f"{prefix}mean_token_accuracy")
            if accuracy is not None:
                line += f"  acc {accuracy:.3f}"
            stages = [f"{key[len(prefix) + 5:]} {value:.3f}" for key, value in logs.items()
                      if key.startswith(f"{prefix}loss/")]
            stages += [f"w:{key[7:]} {value:.2f}" for key, value in logs.items() if key.startswith("weight/")]
            print(line + ("  |  " + "  ".join(stages) if stages else ""), flush=True)


def make_trainer(model, tokenizer, training_args, model_args, train_dataset, eval_dataset, weighting,
                 curves: bool = True, print_stages: bool = True):
    """A :class:`WeightedSFTTrainer` with the :class:`StageLossPrinter` (instead of the raw log dicts when
    ``disable_tqdm``) and, with ``curves``, the :class:`LossCurvesCallback`."""
    from trl import get_peft_config, get_quantization_config

    from ..trainer.curves import LossCurvesCallback
    from ..trainer.sft_trainer import WeightedSFTTrainer

    callbacks = [StageLossPrinter()] if print_stages else []
    if curves:
        callbacks.append(LossCurvesCallback())
    trainer = WeightedSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
        callbacks=callbacks,
        weighting=weighting,
    )
    if training_args.disable_tqdm:  # the stage-loss printer reports every log instead of the raw dicts
        trainer.remove_callback(PrinterCallback)
    return trainer
