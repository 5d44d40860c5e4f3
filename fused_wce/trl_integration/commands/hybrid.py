"""``fused-wce hybrid``: GRPO on prompts mixed with weighted multi-turn SFT on expert conversations, one step.

Each optimizer step minimises ``(1 - mu) * GRPO + mu * SFT`` (:class:`~..trainer.hybrid_trainer.HybridTrainer`):
the GRPO term on completions sampled for prompts taken from the conversations
(:mod:`.hybrid_data`: the context before each checkable assistant reply, scored by rule-based rewards), the SFT
term the turn-weighted cross-entropy of the expert conversations themselves. Takes every ``trl grpo`` flag but
its reward options (``GRPOConfig``: ``--num_generations``, ``--beta``, ``--loss_type``, ``--temperature``...), the
SFT term's (``--sft_mu``, ``--sft_mu_end``, ``--sft_mu_schedule``, ``--sft_mu_warmup_steps``,
``--sft_token_reweighting``, ``--sft_per_device_train_batch_size``...), the turn-weighting flags of
``fused-wce sft`` and ``--rewards``::

    fused-wce hybrid                                  # tiny model, shipped conversations, offline, CPU
    fused-wce hybrid --sft_mu 0.5 --sft_mu_schedule constant --sft_token_reweighting "p(1-p)"
    fused-wce hybrid --dataset_name chats.jsonl --model_name_or_path ./my-model --beta 0.04

Without ``--model_name_or_path`` the tiny Llama of ``fused-wce sft`` is built from a config and trained with demo
defaults (:data:`HYBRID_DEMO_DEFAULTS`: mu decaying from 0.9 to 0.1 over the run, as CHORD decays it); without
``--dataset_name`` the shipped conversations are the expert data. Prints one line per logged step (loss, mu, both
terms, mean reward, the SFT term's loss per role and turn) and writes ``loss_curves.csv`` / ``.png`` and the
model into the output directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .data import prepare_data
from .hybrid_data import REWARDS, prompts_from_conversations, reward_functions
from .model import build_model
from .options import TurnWeightingFlags, UsageError, parse_args

PROG = "fused-wce hybrid"

# A bare run: the tiny demo Llama, 40 steps of 2 prompts x 4 completions and 8 expert conversations each.
HYBRID_DEMO_DEFAULTS = {
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 4,
    "max_steps": 40,
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 24,
    "sft_per_device_train_batch_size": 8,
    "sft_mu": 0.9,
    "sft_mu_end": 0.1,
    "sft_mu_schedule": "cosine",
    "logging_steps": 5,
    "save_strategy": "no",
    "gradient_checkpointing": False,
}

_DESCRIPTION = (
    "GRPO mixed with weighted multi-turn SFT, both through a fused LM head: each step minimises (1 - mu) * GRPO + "
    "mu * SFT. --rewards replaces the reward options of `trl grpo`; the SFT term's flags are --sft_*.")


@dataclass
class HybridArguments(TurnWeightingFlags):
    """Flags of ``fused-wce hybrid`` beyond ``trl grpo``'s: the expert conversations' turn weights, the rewards."""

    rewards: str = field(default="answer,format", metadata={
        "help": f"Comma-separated rule-based rewards of the sampled completions, among {', '.join(REWARDS)}: "
                "answer (1 when the expert reply's final answer appears), format (0.5 for one sentence, no tool "
                "call, at most twice the expert's length)."})
    curves: bool = field(default=True, metadata={
        "help": "Write loss_curves.csv and loss_curves.png (loss, mu, both terms, reward, the SFT term per role "
                "and turn, each logged step) into output_dir at each save and at the end."})


def parse_hybrid_args(argv: list[str]):
    """(script, training: ``HybridConfig``, model, dataset, :class:`HybridArguments`) of ``fused-wce hybrid``."""
    from ..trainer.hybrid_config import HybridConfig

    return parse_args(argv, prog=PROG, first=HybridArguments, description=_DESCRIPTION, config_class=HybridConfig,
                      trl_command="trl grpo", base_demo=HYBRID_DEMO_DEFAULTS,
                      extra_defaults={"output_dir": os.path.join("outputs", "fused-wce-hybrid")})


def _policy_for_reference(model, tokenizer, training_args):
    """GRPOTrainer builds the reference model (``beta > 0``) from the policy's path: save a model built here (the
    demo model) into the output directory first and pass that path."""
    if isinstance(model, str) or training_args.beta == 0.0:
        return model
    path = os.path.join(training_args.output_dir, "initial_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main_hybrid(argv: list[str]) -> int:
    try:
        script_args, training_args, model_args, dataset_args, hybrid_args = parse_hybrid_args(argv)
    except ValueError as error:  # HybridConfig's checks of the --sft_* values
        raise UsageError(" ".join(str(error).split())) from None
    try:
        weighting = hybrid_args.turn_weighting()
    except ValueError as error:
        raise UsageError(str(error)) from None
    rewards = reward_functions(hybrid_args.rewards)
    conversations, _ = prepare_data(script_args, dataset_args, weighting, 0, training_args.seed)
    if "messages" not in getattr(conversations, "column_names", []):
        raise UsageError("hybrid needs conversations (a `messages` column) as expert data and prompt source")
    from datasets import Dataset

    prompts = prompts_from_conversations(conversations["messages"])
    if not prompts:
        raise UsageError("no assistant reply of the conversations has a checkable final answer (a number or a "
                         "capitalised last word) to build prompts and rewards from")

    model, tokenizer = build_model(model_args, training_args)
    tokenizer.padding_side = "left"  # GRPO left-pads the prompts it generates from
    if model_args.model_name_or_path is None:
        print(f"[fused-wce] tiny Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"vocab {len(tokenizer)}) built from a config; shipped tokenizer")
    model = _policy_for_reference(model, tokenizer, training_args)
    trainer = _make_trainer(model, tokenizer, training_args, model_args, Dataset.from_list(prompts), conversations,
                            weighting, rewards, hybrid_args.curves)
    if trainer.accelerator.is_main_process:
        print(f"[fused-wce] expert data: {len(trainer.sft_dataset)} conversations, weighting: {weighting.describe()}; "
              f"{len(prompts)} prompts, rewards: {hybrid_args.rewards}; mu {training_args.sft_mu}"
              + (f" -> {training_args.sft_mu_end} ({training_args.sft_mu_schedule})"
                 if training_args.sft_mu_schedule != "constant" else " (constant)"), flush=True)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        print(f"[fused-wce] model saved to {training_args.output_dir}")
        if hybrid_args.curves:
            from ..trainer.curves import CSV_NAME, PNG_NAME

            print(f"[fused-wce] loss curves: {os.path.join(training_args.output_dir, CSV_NAME)}, "
                  f"{os.path.join(training_args.output_dir, PNG_NAME)}")
    return 0


def _make_trainer(model, tokenizer, training_args, model_args, prompts, conversations, weighting, rewards,
                  curves: bool):
    """A :class:`HybridTrainer` printing one line per log (instead of the raw dicts when ``disable_tqdm``) and,
    with ``curves``, writing the loss curves."""
    from transformers.trainer_callback import PrinterCallback
    from trl import get_peft_config

    from ..trainer.curves import LossCurvesCallback
    from ..trainer.hybrid_trainer import HybridTrainer
    from .training import StageLossPrinter

    callbacks = [StageLossPrinter()] + ([LossCurvesCallback()] if curves else [])
    trainer = HybridTrainer(model, rewards, training_args, train_dataset=prompts, processing_class=tokenizer,
                            peft_config=get_peft_config(model_args), callbacks=callbacks, sft_dataset=conversations,
                            weighting=weighting)
    if training_args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
    return trainer
