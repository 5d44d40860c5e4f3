"""Flags and defaults shared by the commands: ``trl sft``'s parser with a command's own flags first, CPU-safe
platform defaults and the demo defaults of a run without ``--model_name_or_path``."""
from __future__ import annotations

import contextlib
import os
import warnings


class UsageError(Exception):
    """Bad flags or data, found before any model is built: printed as one line, exit status 2."""


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

SFT_DESCRIPTION = "Weighted multi-turn SFT with a fused cross-entropy."
_HELP_DEFAULTS = (
    " The fused-wce flags come first; every `trl sft` flag follows. Defaults shown are those of a bare run (the "
    "built-in tiny model, CPU-safe without CUDA); with --model_name_or_path, SFTConfig's own defaults apply instead "
    "of the demo ones ({demo}).")


def make_parser(prog: str, first, description: str = SFT_DESCRIPTION, demo: dict | None = None):
    """The parser: ``first`` (the command's own flags dataclass, so ``--help`` lists them first), then
    ``trl sft``'s. The help text is ``description`` and the demo defaults ``demo`` (default
    :data:`DEMO_DEFAULTS`) that a bare run uses."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    shown = ", ".join(f"{key}={value}" for key, value in (demo or DEMO_DEFAULTS).items())
    # A one-line usage: argparse prints it above every flag error (the generated one runs to ~150 lines).
    return TrlParser((first, ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig), prog=prog,
                     usage="%(prog)s [--flag value ...]  (%(prog)s --help lists every flag)",
                     description=description + _HELP_DEFAULTS.format(demo=shown))


def _platform_defaults() -> dict:
    """Defaults that make a bare run work here: CPU safe without CUDA, no trackers, a local output dir."""
    import torch

    # disable_tqdm: the stage-loss printer replaces the progress bar and Trainer's raw log dicts.
    defaults = {"report_to": "none", "output_dir": os.path.join("outputs", "fused-wce-sft"), "disable_tqdm": True}
    if not torch.cuda.is_available():
        defaults.update(use_cpu=True, bf16=False, gradient_checkpointing=False)
    return defaults


def _wants_help(argv) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)


def _gives_model(argv) -> bool:
    return any(arg.split("=")[0] in ("--model_name_or_path", "--model-name-or-path") for arg in argv)


def parse_args(argv: list[str], prog: str, first, extra_defaults=None, demo_defaults=None,
               description: str = SFT_DESCRIPTION):
    """Parse ``argv`` (after the command name) into (script, training, model, dataset, ``first``) arguments.

    Two passes: the first finds out whether a model was given; without one, the demo defaults are set before the
    second. Defaults are parser defaults, so YAML (``--config``) and command-line values override them. ``--help``
    shows the defaults a bare run uses (or, with ``--model_name_or_path`` on the line, those a model run uses).
    ``first`` is the dataclass of the command's own flags (returned last); ``extra_defaults`` apply to every run,
    ``demo_defaults`` on top of :data:`DEMO_DEFAULTS` to bare runs (``fused-wce compare`` uses both);
    ``description`` heads ``--help``.
    """
    demo = {**DEMO_DEFAULTS, **(extra_defaults or {}), **(demo_defaults or {})}
    parser = make_parser(prog, first, description, {**DEMO_DEFAULTS, **(demo_defaults or {})})
    parser.set_defaults(**{**_platform_defaults(), **(extra_defaults or {})})
    if _wants_help(argv) and not _gives_model(argv):
        parser.set_defaults(**demo)  # argparse prints help and exits here
    with checkpointing_alias_notice_silenced():
        parsed = _parse_known_only(parser, argv)
        if parsed[3].model_name_or_path is None:
            parser.set_defaults(**demo)
            parsed = _parse_known_only(parser, argv)
    project, script, training, model, dataset = parsed
    return script, training, model, dataset, project


def _parse_known_only(parser, argv):
    """The parsed dataclasses; an unknown flag (or ``--config`` key) is a usage error: the usage line, one error
    line and exit status 2, as for any other bad flag."""
    *parsed, config_unknown, argv_unknown = parser.parse_args_and_config(
        list(argv), return_remaining_strings=True, separate_remaining_strings=True)
    if argv_unknown:
        parser.error(f"unrecognized arguments: {' '.join(argv_unknown)}")
    if config_unknown:
        parser.error(f"--config: unrecognized keys: {' '.join(config_unknown)}")
    return parsed


@contextlib.contextmanager
def checkpointing_alias_notice_silenced():
    """Silence transformers' notice that ``gradient_checkpointing`` is a deprecated alias while training arguments
    are built. Our CPU/demo default sets ``gradient_checkpointing`` (the name ``trl sft`` users pass); setting
    ``activation_checkpointing`` instead would silently override a user's ``--gradient_checkpointing``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
