"""``fused-wce sft``: ``trl sft`` with turn-weighted, fused cross-entropy; ``fused-wce compare``: weightings side by side.

Takes every flag ``trl sft`` takes (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, ``DatasetMixtureConfig``;
``--config file.yaml`` too) plus the weighting flags::

    fused-wce sft                                   # tiny model, shipped dataset, offline, CPU, ~1 minute
    fused-wce sft --role_weights "assistant=1,user=0.1" --last_n 2 --decay 0.5
    fused-wce sft --adaptive turn                   # per-turn multipliers that follow each turn's running loss
    fused-wce sft --dataset_name chats.jsonl --model_name_or_path ./my-model --max_length 2048
    accelerate launch -m fused_wce.trl_integration.cli sft ...   # several processes
    fused-wce compare                               # the same model under several weightings: one report

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
import sys
from dataclasses import dataclass, field

HELP = """usage: fused-wce <command> [flags]

commands:
  sft      supervised fine-tuning with turn-weighted fused cross-entropy (every `trl sft` flag, plus
           --role_weights "assistant=1,user=0", --full_sequence, --last_n N, --decay D, --adaptive turn|role);
           writes loss_curves.csv/.png; `fused-wce sft --help`
  compare  train the same model under several weightings (full sequence, assistant only, last-N, decay, per-role,
           adaptive) on the same data and seed; writes report.md, results.csv and compare.png;
           `fused-wce compare --help`
"""


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
        from .adaptive import AdaptiveTurnWeights
        from .weighting import TurnWeighting

        adaptive = AdaptiveTurnWeights.from_cli(self.adaptive, self.adaptive_ema_decay, self.adaptive_power,
                                                self.adaptive_min_weight, self.adaptive_max_weight,
                                                self.adaptive_warmup_steps)
        return TurnWeighting.from_cli(self.role_weights, self.full_sequence, self.last_n, self.decay,
                                      adaptive=adaptive)


_HELP_DESCRIPTION = (
    "Weighted multi-turn SFT with a fused cross-entropy. The fused-wce flags come first; every `trl sft` flag "
    "follows. Defaults shown are those of a bare run (the built-in tiny model, CPU-safe without CUDA); with "
    "--model_name_or_path, SFTConfig's own defaults apply instead of the demo ones ({demo}).")


def make_parser(prog: str = "fused-wce sft", first=WeightingArguments):
    """The parser: ``first`` (the project's flags, so ``--help`` lists them first), then ``trl sft``'s."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    demo = ", ".join(f"{key}={value}" for key, value in DEMO_DEFAULTS.items())
    return TrlParser((first, ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig), prog=prog,
                     description=_HELP_DESCRIPTION.format(demo=demo))


def _platform_defaults() -> dict:
    """Defaults that make a bare run work here: CPU safe without CUDA, no trackers, a local output dir."""
    import torch

    # disable_tqdm: the stage-loss printer below replaces the progress bar and Trainer's raw log dicts.
    defaults = {"report_to": "none", "output_dir": os.path.join("outputs", "fused-wce-sft"), "disable_tqdm": True}
    if not torch.cuda.is_available():
        defaults.update(use_cpu=True, bf16=False, gradient_checkpointing=False)
    return defaults


# Demo defaults for the built-in tiny model (random init): a learning rate that moves it within a minute.
DEMO_DEFAULTS = {
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "num_train_epochs": 4.0,
    "per_device_train_batch_size": 8,
    "max_length": 512,
    "logging_steps": 10,
    "save_strategy": "no",
    "gradient_checkpointing": False,
    "dataset_num_proc": None,
}


def _wants_help(argv) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)


def _gives_model(argv) -> bool:
    return any(arg.split("=")[0] in ("--model_name_or_path", "--model-name-or-path") for arg in argv)


def parse_args(argv: list[str], prog: str = "fused-wce sft", first=WeightingArguments, extra_defaults=None,
               demo_defaults=None):
    """Parse ``argv`` (after ``sft``) into (script, training, model, dataset, weighting) arguments.

    Two passes: the first finds out whether a model was given; without one, the demo defaults are set before the
    second. Defaults are parser defaults, so YAML (``--config``) and command-line values override them. ``--help``
    shows the defaults a bare run uses (or, with ``--model_name_or_path`` on the line, those a model run uses).
    ``first`` is the dataclass of the command's own flags (returned last); ``extra_defaults`` apply to every run,
    ``demo_defaults`` on top of :data:`DEMO_DEFAULTS` to bare runs (``fused-wce compare`` uses both).
    """
    demo = {**DEMO_DEFAULTS, **(extra_defaults or {}), **(demo_defaults or {})}
    import warnings

    parser = make_parser(prog, first)
    parser.set_defaults(**{**_platform_defaults(), **(extra_defaults or {})})
    if _wants_help(argv) and not _gives_model(argv):
        parser.set_defaults(**demo)  # argparse prints help and exits here
    with warnings.catch_warnings():
        # Our CPU/demo default sets `gradient_checkpointing` (the name `trl sft` users pass); transformers calls it a
        # deprecated alias. Setting `activation_checkpointing` instead would silently override a user's
        # --gradient_checkpointing, so the alias stays and its notice is silenced here.
        warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
        parsed = parser.parse_args_and_config(list(argv))
        if parsed[3].model_name_or_path is None:
            parser.set_defaults(**demo)
            parsed = parser.parse_args_and_config(list(argv))
    project, script, training, model, dataset = parsed
    return script, training, model, dataset, project


def build_tiny_model(tokenizer, seed: int, max_length: int | None):
    """A 2-layer Llama with hidden size 128 over ``tokenizer``'s vocabulary, tied embeddings, seeded init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(max_length or 0, 2048),
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _one_cpu_thread_for_the_tiny_model(training_args) -> None:
    """On CPU, run the tiny demo model on one intra-op thread unless OMP_NUM_THREADS says otherwise.

    Its matrices (hidden 128) are too small to split: measured on 2 shared cores, 10 demo steps took 2.4 s on one
    thread and 23 s on two (the threads wait on each other whenever another process holds a core). Results are
    the same either way.
    """
    import torch

    if "OMP_NUM_THREADS" not in os.environ and (training_args.use_cpu or not torch.cuda.is_available()):
        torch.set_num_threads(1)


def load_tokenizer(model_name_or_path: str, revision=None, trust_remote_code=False):
    from transformers import AutoTokenizer

    from .chat_data import build_tokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name_or_path, revision=revision,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        print(f"[fused-wce] no tokenizer at {model_name_or_path} ({type(error).__name__}); "
              "using the shipped tokenizer (its vocabulary must match the model's)")
        return build_tokenizer()


def load_datasets(script_args, dataset_args, holdout_size: int, seed: int):
    """(train, held-out or None): the shipped dataset, a local jsonl, a hub/local dataset, or a mixture.

    A local jsonl is checked row by row (ValueError naming ``file:line``); see :func:`load_jsonl_dataset`.
    """
    from datasets import Dataset, DatasetDict, IterableDataset, load_dataset

    from .chat_data import load_default_dataset, load_jsonl_dataset

    if dataset_args.datasets:
        from trl import get_dataset

        loaded = get_dataset(dataset_args)
    elif script_args.dataset_name is None:
        loaded = load_default_dataset()
    elif os.path.isfile(script_args.dataset_name) and script_args.dataset_name.endswith((".jsonl", ".json")):
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


def stage_loss_callback():
    """A TrainerCallback printing ``step | loss | per-role | per-turn`` on every log (main process only)."""
    from transformers import TrainerCallback

    class StageLossPrinter(TrainerCallback):
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

    return StageLossPrinter()


def evaluate_losses(model, tokenizer, conversations, weightings: dict, max_length: int | None) -> dict:
    """``{name: sum(w_i l_i) / sum(w_i)}`` over ``conversations`` for each named TurnWeighting (nan if no weight).

    One backbone forward per conversation (no padding), the loss from the fused head; tokens shifted causally.
    """
    import torch

    import fused_wce

    from .weighting import tokenize_with_weights

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


class UsageError(Exception):
    """Bad flags or data, found before any model is built: printed as one line, exit status 2."""


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


def prepare_data(script_args, dataset_args, weighting, holdout_size: int, seed: int):
    """(train, held-out): loaded and checked before any model is built; :class:`UsageError` on bad data."""
    source = script_args.dataset_name or "the shipped dataset"
    try:
        train, holdout = load_datasets(script_args, dataset_args, holdout_size, seed)
        check_conversations(train, weighting, f"{source} (train split)")
        if holdout is not None:
            check_conversations(holdout, weighting, f"{source} (held-out split)")
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(" ".join(str(error).split())) from None  # one line, whatever the message
    return train, holdout


def build_model(model_args, training_args):
    """(model or its name for the trainer to load, tokenizer): the tiny demo Llama without a model path."""
    from .chat_data import build_tokenizer

    if model_args.model_name_or_path is None:
        _one_cpu_thread_for_the_tiny_model(training_args)
        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, training_args.seed, training_args.max_length)
        return model, tokenizer
    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    model = model_args.model_name_or_path
    return model, load_tokenizer(model, model_args.model_revision, training_args.trust_remote_code)


def make_trainer(model, tokenizer, training_args, model_args, train_dataset, eval_dataset, weighting,
                 curves: bool = True, print_stages: bool = True):
    """A :class:`WeightedSFTTrainer` with the stage-loss printer (instead of the progress bar when
    ``disable_tqdm``) and, with ``curves``, the :class:`LossCurvesCallback`."""
    from trl import get_peft_config, get_quantization_config

    from .trainer import WeightedSFTTrainer

    callbacks = [stage_loss_callback()] if print_stages else []
    if curves:
        from .curves import LossCurvesCallback

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
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def stock_comparison(weighting) -> dict:
    """The weightings of the final table: the run's objective and the two stock TRL losses."""
    from .weighting import TurnWeighting

    return {
        f"weighted objective ({_describe(weighting)})": weighting,
        "assistant-only CE (TRL assistant_only_loss)": TurnWeighting(role_weights={"assistant": 1.0},
                                                                     message_weight_key=None),
        "full-sequence CE (TRL default)": TurnWeighting(full_sequence=True, message_weight_key=None),
    }


def main_sft(argv: list[str]) -> int:
    script_args, training_args, model_args, dataset_args, weighting_args = parse_args(argv)
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
        print(f"[fused-wce] weighting: {_describe(weighting)}")
        if hasattr(trainer.train_dataset, "__len__"):  # not for streaming datasets
            print(f"[fused-wce] {len(trainer.train_dataset)} training sequences"
                  + (f", {len(holdout)} held out" if holdout is not None else ""), flush=True)

    comparison = None
    if holdout is not None and main_process and "messages" in holdout.column_names:
        comparison = stock_comparison(weighting)
        conversations = holdout["messages"]
        before = evaluate_losses(_unwrap(trainer), trainer.processing_class, conversations, comparison,
                                 training_args.max_length)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if main_process:
        print(f"[fused-wce] model saved to {training_args.output_dir}")
        if weighting_args.curves:
            from .curves import CSV_NAME, PNG_NAME

            print(f"[fused-wce] loss curves: {os.path.join(training_args.output_dir, CSV_NAME)}, "
                  f"{os.path.join(training_args.output_dir, PNG_NAME)}")
    if comparison is not None:
        after = evaluate_losses(_unwrap(trainer), trainer.processing_class, conversations, comparison,
                                training_args.max_length)
        print("\n" + format_comparison(before, after) + "\n", flush=True)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):
        trainer.end()
    return 0


def _describe(weighting) -> str:
    if weighting.full_sequence:
        return "full sequence"
    parts = [",".join(f"{role}={value:g}" for role, value in weighting.role_weights.items())]
    if weighting.last_n is not None:
        parts.append(f"last {weighting.last_n}")
    if weighting.decay is not None:
        parts.append(f"decay {weighting.decay:g}")
    if weighting.weight_fn is not None:
        parts.append("weight_fn")
    if weighting.message_weight_key is not None:
        parts.append(f"x message {weighting.message_weight_key!r}")
    if getattr(weighting, "adaptive", None) is not None:
        parts.append(weighting.adaptive.describe())
    return "; ".join(parts)


def _unwrap(trainer):
    """The PreTrainedModel under DDP/PEFT wrappers (LoRA layers stay injected, so they still apply)."""
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if is_peft_model(model) else model


COMMANDS = ("sft", "compare")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fused-wce: unknown command {command!r}\n\n{HELP}", file=sys.stderr)
        return 2
    try:
        if command == "compare":
            from .compare import main_compare

            return main_compare(rest)
        return main_sft(rest)
    except UsageError as error:
        print(f"fused-wce {command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m ...cli` runs this file as __main__; go through the package module so that the classes the
    # subcommands raise (UsageError) are the ones main() catches.
    from fused_wce.trl_integration.cli import main as package_main

    raise SystemExit(package_main())
