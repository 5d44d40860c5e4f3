"""``fused-wce sft``: ``trl sft`` with turn-weighted, fused cross-entropy.

Takes every flag ``trl sft`` takes (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, ``DatasetMixtureConfig``;
``--config file.yaml`` too) plus the weighting flags::

    fused-wce sft                                   # tiny model, shipped dataset, offline, CPU, ~1 minute
    fused-wce sft --role_weights "assistant=1,user=0.1" --last_n 2 --decay 0.5
    fused-wce sft --adaptive turn                   # per-turn multipliers that follow each turn's running loss
    fused-wce sft --dataset_name chats.jsonl --model_name_or_path ./my-model --max_length 2048
    accelerate launch -m fused_wce.trl_integration.cli sft ...   # several processes

Without ``--model_name_or_path`` a tiny Llama is built from a config (hidden 128, 2 layers, the vocabulary of the
shipped tokenizer) and trained with demo defaults (higher learning rate, a few hundred steps at most); without
``--dataset_name`` the shipped multi-turn conversations are used. On a machine without CUDA the defaults are CPU
safe (``use_cpu``, no bf16, no gradient checkpointing); ``report_to`` defaults to ``none``. Explicit flags and
YAML values always win over these defaults.

While training it prints the loss per role, per turn position and per turn index; at the end it writes those
curves to ``loss_curves.csv`` / ``loss_curves.png`` in the output directory and prints a table comparing, on a
held-out slice, the weighted objective with the stock losses (assistant-only CE, as TRL's
``assistant_only_loss=True`` computes it, and full-sequence CE) before and after training. A local ``.jsonl``
dataset is checked row by row before any model is built; a bad row stops the run with one line naming
``file:line``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ..chat_weights.adaptive import AdaptiveTurnWeights
from ..chat_weights.tokenize import tokenize_with_weights
from ..chat_weights.turn_weighting import TurnWeighting
from .data import prepare_data
from .model import build_model, unwrap_model
from .options import UsageError, make_parser, parse_args
from .training import make_trainer

PROG = "fused-wce sft"


@dataclass
class WeightingArguments:
    """Flags of ``fused-wce sft`` beyond ``trl sft``'s."""

    role_weights: str | None = field(default=None, metadata={
        "help": 'Per-role loss weights, e.g. "assistant=1,user=0.1,system=0,tool=0". Default: assistant only.'})
    full_sequence: bool = field(default=False, metadata={
        "help": "Train on every token (scaffolding included), like TRL without assistant_only_loss."})
    last_n: int | None = field(default=None, metadata={
        "help": "Only the last N turns of each weighted role get weight (earlier turns get 0)."})
    decay: float | None = field(default=None, metadata={
        "help": "Weight earlier turns by decay**k, k = turns before the last one of that role (0 < decay <= 1)."})
    adaptive: str | None = field(default=None, metadata={
        "help": 'Adaptive turn weights: "turn" (per turn index: turn 1, 2, ..., 5+) or "role": during training '
                "each counted token's weight is multiplied by its group's multiplier, proportional to a running "
                "average (EMA) of the group's loss, with token-weighted mean 1. Default: off."})
    adaptive_ema_decay: float = field(default=0.9, metadata={
        "help": "--adaptive: weight of the old average in the EMA, in [0, 1)."})
    adaptive_power: float = field(default=1.0, metadata={
        "help": "--adaptive: multipliers proportional to EMA loss ** power (0: all 1)."})
    adaptive_min_weight: float = field(default=0.25, metadata={"help": "--adaptive: smallest multiplier, in (0, 1]."})
    adaptive_max_weight: float = field(default=4.0, metadata={"help": "--adaptive: largest multiplier, >= 1."})
    adaptive_warmup_steps: int = field(default=0, metadata={
        "help": "--adaptive: optimizer steps with every multiplier 1 before the first adaptation."})
    holdout_size: int = field(default=32, metadata={
        "help": "Conversations held out (never trained on) for the final comparison table; 0 disables it."})
    curves: bool = field(default=True, metadata={
        "help": "Write loss_curves.csv and loss_curves.png (loss per role, turn index and turn position, each "
                "logged step) into output_dir at each save and at the end."})

    def turn_weighting(self):
        """The :class:`TurnWeighting` these flags describe (ValueError naming the flag when one is bad)."""
        adaptive = AdaptiveTurnWeights.from_cli(self.adaptive, self.adaptive_ema_decay, self.adaptive_power,
                                                self.adaptive_min_weight, self.adaptive_max_weight,
                                                self.adaptive_warmup_steps)
        return TurnWeighting.from_cli(self.role_weights, self.full_sequence, self.last_n, self.decay,
                                      adaptive=adaptive)


def parse_sft_args(argv: list[str]):
    """(script, training, model, dataset, :class:`WeightingArguments`) of ``fused-wce sft`` (see
    :func:`~fused_wce.trl_integration.commands.options.parse_args`)."""
    return parse_args(argv, prog=PROG, first=WeightingArguments)


def sft_parser():
    """The parser of ``fused-wce sft``: its flags, then every ``trl sft`` flag."""
    return make_parser(PROG, WeightingArguments)


def stock_comparison(weighting) -> dict:
    """The weightings of the final table: the run's objective and the two stock TRL losses."""
    return {
        f"weighted objective ({weighting.describe()})": weighting,
        "assistant-only CE (TRL assistant_only_loss)": TurnWeighting.stock_trl(assistant_only_loss=True),
        "full-sequence CE (TRL default)": TurnWeighting.stock_trl(assistant_only_loss=False),
    }


def evaluate_losses(model, tokenizer, conversations, weightings: dict, max_length: int | None) -> dict:
    """``{name: sum(w_i l_i) / sum(w_i)}`` over ``conversations`` for each named TurnWeighting (nan if no weight).

    One backbone forward per conversation (no padding), the loss from the fused head; tokens shifted causally.
    """
    import torch

    import fused_wce

    sums = {name: [0.0, 0.0] for name in weightings}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        for messages in conversations:
            encoded = {name: tokenize_with_weights(tokenizer, messages, weighting)
                       for name, weighting in weightings.items()}
            input_ids = next(iter(encoded.values()))["input_ids"][:max_length]
            if len(input_ids) < 2:
                continue
            ids = torch.tensor([input_ids], device=device)
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
            hidden = hidden.to(head.weight.dtype)
            target = ids[0, 1:]
            for name, tokens in encoded.items():
                if tokens["input_ids"][:max_length] != input_ids:
                    raise RuntimeError("weightings tokenized the same conversation differently")
                weight = torch.tensor(tokens["token_weights"][:max_length][1:], dtype=torch.float32, device=device)
                loss_sum = fused_wce.linear_cross_entropy(hidden, head.weight, target, weight,
                                                          bias=getattr(head, "bias", None), reduction="sum")
                sums[name][0] += float(loss_sum)
                sums[name][1] += float(weight[weight > 0].sum())
    model.train(was_training)
    return {name: (total / count if count > 0 else math.nan) for name, (total, count) in sums.items()}


def format_comparison(before: dict, after: dict) -> str:
    rows = [("loss on held-out conversations", "before", "after", "change")]
    for name in before:
        b, a = before[name], after[name]
        rows.append((name, f"{b:.4f}", f"{a:.4f}", f"{a - b:+.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main_sft(argv: list[str]) -> int:
    script_args, training_args, model_args, dataset_args, weighting_args = parse_sft_args(argv)
    try:
        weighting = weighting_args.turn_weighting()
    except ValueError as error:
        raise UsageError(str(error)) from None
    train_dataset, holdout = prepare_data(script_args, dataset_args, weighting, weighting_args.holdout_size,
                                          training_args.seed)

    model, tokenizer = build_model(model_args, training_args)
    if model_args.model_name_or_path is None:
        print(f"[fused-wce] tiny Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"vocab {len(tokenizer)}) built from a config; shipped tokenizer")

    trainer = make_trainer(model, tokenizer, training_args, model_args, train_dataset, holdout, weighting,
                           curves=weighting_args.curves)
    main_process = trainer.accelerator.is_main_process
    if main_process:
        print(f"[fused-wce] weighting: {weighting.describe()}")
        if hasattr(trainer.train_dataset, "__len__"):  # not for streaming datasets
            print(f"[fused-wce] {len(trainer.train_dataset)} training sequences"
                  + (f", {len(holdout)} held out" if holdout is not None else ""), flush=True)

    comparison = None
    if holdout is not None and main_process and "messages" in holdout.column_names:
        comparison = stock_comparison(weighting)
        conversations = holdout["messages"]
        before = evaluate_losses(unwrap_model(trainer), trainer.processing_class, conversations, comparison,
                                 training_args.max_length)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if main_process:
        print(f"[fused-wce] model saved to {training_args.output_dir}")
        if weighting_args.curves:
            from ..trainer.curves import CSV_NAME, PNG_NAME

            print(f"[fused-wce] loss curves: {os.path.join(training_args.output_dir, CSV_NAME)}, "
                  f"{os.path.join(training_args.output_dir, PNG_NAME)}")
    if comparison is not None:
        after = evaluate_losses(unwrap_model(trainer), trainer.processing_class, conversations, comparison,
                                training_args.max_length)
        print("\n" + format_comparison(before, after) + "\n", flush=True)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):
        trainer.end()
    return 0
