"""`fused-wce sft`: argument parsing (flags, YAML, defaults) in process; end-to-end runs in subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_helpers import tiny_model  # noqa: I001  (sets HF_HUB_OFFLINE first)

from fused_wce.trl_integration import cli
from fused_wce.trl_integration.chat_data import build_tokenizer, load_default_dataset

ROOT = Path(__file__).parent.parent


def run_cli(*args, cwd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    return subprocess.run([sys.executable, "-m", "fused_wce.trl_integration.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------ parsing
def test_bare_run_gets_cpu_safe_demo_defaults():
    script, training, model, dataset, weighting = cli.parse_args([])
    assert model.model_name_or_path is None and script.dataset_name is None
    assert training.report_to in ("none", [], ["none"]) or not training.report_to
    assert training.learning_rate == cli.DEMO_DEFAULTS["learning_rate"]
    assert training.gradient_checkpointing is False
    if not __import__("torch").cuda.is_available():
        assert training.use_cpu and not training.bf16
    assert weighting.role_weights is None and not weighting.full_sequence


def test_flags_and_yaml_override_the_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.0005\nper_device_train_batch_size: 3\nrole_weights: assistant=1,user=0.5\n"
                      "decay: 0.5\n")
    _, training, _, _, weighting = cli.parse_args(["--config", str(config), "--per_device_train_batch_size", "2",
                                                   "--last_n", "2", "--full_sequence"])
    assert training.learning_rate == 5e-4  # YAML beats the demo default
    assert training.per_device_train_batch_size == 2  # the command line beats YAML
    assert (weighting.role_weights, weighting.decay, weighting.last_n, weighting.full_sequence) == (
        "assistant=1,user=0.5", 0.5, 2, True)


def test_a_given_model_keeps_trl_defaults():
    _, training, model, _, _ = cli.parse_args(["--model_name_or_path", "some/model"])
    assert model.model_name_or_path == "some/model"
    assert training.learning_rate == 2e-5  # SFTConfig's default, not the demo's


def test_every_trl_sft_flag_is_accepted():
    from trl.scripts.sft import make_parser as trl_make_parser

    ours = {action.dest for action in cli.make_parser()._actions}
    theirs = {action.dest for action in trl_make_parser()._actions}
    assert theirs <= ours
    assert {"role_weights", "full_sequence", "last_n", "decay"} <= ours


def test_help_and_unknown_command(capsys):
    assert cli.main([]) == 0 and "sft" in capsys.readouterr().out
    assert cli.main(["dpo"]) == 2


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_default_run_trains_prints_stages_and_compares(tmp_path):
    result = run_cli("sft", "--max_steps", "8", "--logging_steps", "4", "--holdout_size", "8",
                     "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    step_lines = [line for line in out.splitlines() if line.startswith("[fused-wce] step")]
    assert len(step_lines) == 2 and all("assistant" in line and "turn_last" in line for line in step_lines)
    table = out[out.index("loss on held-out conversations"):].splitlines()
    rows = {line.split("  ")[0]: [float(v) for v in line.split()[-3:]] for line in table[2:5]}
    objective = "weighted objective (assistant=1; x message 'weight')"  # the shipped data has OpenAI weight keys
    assert set(rows) == {objective, "assistant-only CE (TRL assistant_only_loss)", "full-sequence CE (TRL default)"}
    for before, after, change in rows.values():
        assert change == pytest.approx(after - before, abs=2e-4)
    before, after, _ = rows["assistant-only CE (TRL assistant_only_loss)"]
    assert after < before  # 8 steps at the demo learning rate already teach something
    assert rows[objective][1] < rows[objective][0]
    assert (tmp_path / "out" / "config.json").exists()


def test_jsonl_dataset_local_model_and_yaml(tmp_path):
    tokenizer = build_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model("qwen2", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "chats.jsonl"
    with data.open("w") as handle:
        for messages in load_default_dataset().select(range(24))["messages"]:
            handle.write(json.dumps({"messages": messages}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 3\nlogging_steps: 1\nper_device_train_batch_size: 4\nlearning_rate: 0.001\n"
                      "max_length: 256\ngradient_checkpointing: false\n")
    result = run_cli("sft", "--config", str(config), "--model_name_or_path", str(model_dir), "--dataset_name",
                     str(data), "--role_weights", "assistant=1,user=0.5", "--holdout_size", "4",
                     "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    step_lines = [line for line in result.stdout.splitlines() if line.startswith("[fused-wce] step")]
    assert len(step_lines) == 3 and all(" user " in line for line in step_lines)
    assert "weighted objective (assistant=1,user=0.5; x message 'weight')" in result.stdout


def test_jsonl_without_messages_fails_clearly(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "hello"}\n{"text": "world"}\n')
    result = run_cli("sft", "--dataset_name", str(data), "--max_steps", "1", "--holdout_size", "0",
                     "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode != 0
    assert "messages" in result.stderr[-2000:]
