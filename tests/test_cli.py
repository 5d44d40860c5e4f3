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
from fused_wce.trl_integration.commands import model as model_module
from fused_wce.trl_integration.commands import options, sft
from fused_wce.trl_integration.chat_data import build_tokenizer, load_default_dataset

ROOT = Path(__file__).parent.parent


def run_cli(*args, cwd, timeout=3600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    return subprocess.run([sys.executable, "-m", "fused_wce.trl_integration.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------ parsing
def test_bare_run_gets_cpu_safe_demo_defaults():
    script, training, model, dataset, weighting = sft.parse_sft_args([])
    assert model.model_name_or_path is None and script.dataset_name is None
    assert training.report_to in ("none", [], ["none"]) or not training.report_to
    assert training.learning_rate == options.DEMO_DEFAULTS["learning_rate"]
    assert training.gradient_checkpointing is False
    if not __import__("torch").cuda.is_available():
        assert training.use_cpu and not training.bf16
    assert weighting.role_weights is None and not weighting.full_sequence


def test_flags_and_yaml_override_the_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.0005\nper_device_train_batch_size: 3\nrole_weights: assistant=1,user=0.5\n"
                      "decay: 0.5\n")
    _, training, _, _, weighting = sft.parse_sft_args(["--config", str(config), "--per_device_train_batch_size", "2",
                                                   "--last_n", "2", "--full_sequence"])
    assert training.learning_rate == 5e-4  # YAML beats the demo default
    assert training.per_device_train_batch_size == 2  # the command line beats YAML
    assert (weighting.role_weights, weighting.decay, weighting.last_n, weighting.full_sequence) == (
        "assistant=1,user=0.5", 0.5, 2, True)


def test_a_given_model_keeps_trl_defaults():
    _, training, model, _, _ = sft.parse_sft_args(["--model_name_or_path", "some/model"])
    assert model.model_name_or_path == "some/model"
    assert training.learning_rate == 2e-5  # SFTConfig's default, not the demo's


def test_every_trl_sft_flag_is_accepted():
    from trl.scripts.sft import make_parser as trl_make_parser

    ours = {action.dest for action in sft.sft_parser()._actions}
    theirs = {action.dest for action in trl_make_parser()._actions}
    assert theirs <= ours
    assert {"role_weights", "full_sequence", "last_n", "decay"} <= ours


def test_help_and_unknown_command(capsys):
    assert cli.main([]) == 0 and {"sft", "compare"} <= set(capsys.readouterr().out.split())
    assert cli.main(["dpo"]) == 2


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _default_shown(text, flag):
    block = text[text.index(f"  {flag} "):]
    start = block.index("(default:") + 9
    return "".join(block[start:block.index(")", start)].split())  # argparse wraps long values at hyphens


def test_help_lists_project_flags_first_with_the_defaults_that_run(capsys):
    text = _help(["sft", "--help"], capsys)
    options = [line.split()[0] for line in text[text.index("options:"):].splitlines()[1:]
               if line.startswith("  --")]
    assert options[:5] == ["--role_weights", "--full_sequence", "--last_n", "--decay", "--adaptive"]
    assert "--curves" in options[:15] and options.index("--curves") < options.index("--dataset_name")
    # A bare run trains the demo model with DEMO_DEFAULTS: that is what --help shows.
    _, training, _, _, _ = sft.parse_sft_args([])
    assert _default_shown(text, "--learning_rate") == str(training.learning_rate) == "0.003"
    assert _default_shown(text, "--output_dir") == training.output_dir
    with_model = _help(["sft", "--help", "--model_name_or_path", "x"], capsys)
    assert _default_shown(with_model, "--learning_rate") == "2e-05"
    compare_help = _help(["compare", "--help"], capsys)
    assert _default_shown(compare_help, "--max_steps") == "60"
    assert compare_help.index("--schemes") < compare_help.index("--dataset_name")


def test_adaptive_flags_build_the_weighting():
    *_, flags = sft.parse_sft_args(["--adaptive", "role", "--adaptive_power", "2", "--adaptive_warmup_steps", "3"])
    weighting = flags.turn_weighting()
    assert (weighting.adaptive.groups, weighting.adaptive.power, weighting.adaptive.warmup_steps) == ("role", 2.0, 3)
    *_, flags = sft.parse_sft_args([])
    assert flags.turn_weighting().adaptive is None and flags.curves


@pytest.mark.parametrize("argv, error", [
    (["--frobnicate", "3"], "unrecognized arguments: --frobnicate 3"),
    (["--max_steps", "abc"], "argument --max_steps/--max-steps: invalid int value: 'abc'"),
])
def test_unknown_or_malformed_flag_is_a_usage_line_and_exit_2(capsys, argv, error):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "usage: fused-wce sft [--flag value ...]  (fused-wce sft --help lists every flag)",
        f"fused-wce sft: error: {error}"]


def test_bad_flag_value_is_said_in_flag_words(capsys):
    assert cli.main(["sft", "--decay", "-0.5"]) == 2
    assert capsys.readouterr().err.splitlines() == ["fused-wce sft: error: --decay must be a number in (0, 1], got -0.5"]


@pytest.mark.parametrize("line, match", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}', "message 1: unknown 'role'"),
    ('{"text": "no messages here"}', "no 'messages' key"),
    ('{"messages": [{"role": "assistant", "content": "x", "weight": -0.5}]}', "message 0 key 'weight'"),
    ('{"messages": [{"role": "assistant", "content": "x", "weight": "high"}]}', "message 0 key 'weight'"),
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
])
def test_bad_data_fails_before_the_model_in_one_line(tmp_path, capsys, monkeypatch, line, match):
    data = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data.write_text(f"{good}\n\n{line}\n{good}\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(model_module, "build_tiny_model", no_model)
    assert cli.main(["sft", "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fused-wce sft: error: {data}:3: ") and match in err[0], err


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_default_run_trains_prints_stages_and_compares(tmp_path):
    result = run_cli("sft", "--max_steps", "8", "--logging_steps", "4", "--holdout_size", "8",
                     "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    step_lines = [line for line in out.splitlines() if line.startswith("[fused-wce] step")]
    assert len(step_lines) == 2 and all("assistant" in line and "turn_last" in line and " turn_2 " in line
                                        for line in step_lines)
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
    with open(tmp_path / "out" / "loss_curves.csv") as handle:
        curves = handle.read().splitlines()
    assert curves[0].startswith("step,epoch,split,loss,") and "loss/turn_2" in curves[0]
    assert [line.split(",")[:3] for line in curves[1:]] == [["4", curves[1].split(",")[1], "train"],
                                                           ["8", curves[2].split(",")[1], "train"]]
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 10_000


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


def test_bad_jsonl_is_reported_before_transformers_is_imported(tmp_path):
    """A fresh process: the bad row is reported (one line, exit 2) before transformers or TRL is imported."""
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n')
    code = ("import sys; from fused_wce.trl_integration import cli; "
            f"status = cli.main(['sft', '--max_steps', '3', '--dataset_name', {str(data)!r}]); "
            "print(sorted(name for name in ('transformers', 'trl', 'datasets') if name in sys.modules)); "
            "sys.exit(status)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=3600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
    assert result.stderr.strip().splitlines() == [
        f"fused-wce sft: error: {data}:1: message 1: unknown 'role' 'bot'; expected one of "
        "['system', 'user', 'assistant', 'tool']"]


def test_jsonl_without_messages_fails_clearly(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "hello"}\n{"text": "world"}\n')
    result = run_cli("sft", "--dataset_name", str(data), "--max_steps", "1", "--holdout_size", "0",
                     "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"fused-wce sft: error: {data}:1: no 'messages' key (keys: ['text']); each row must be "
        '{"messages": [{"role": ..., "content": ...}, ...]}')
    assert "tiny Llama" not in result.stdout  # failed before any model was built
