"""`fused-wce hybrid`: parsing, usage errors (one line, exit 2, before any model), the prompts and rewards it
builds from conversations, and a short run on a small dataset that writes its curves."""
from __future__ import annotations

import csv
import json

import pytest

import trl_helpers  # noqa: F401, I001  (sets HF_HUB_OFFLINE first)

from fused_wce.trl_integration import cli
from fused_wce.trl_integration.chat_data import load_default_dataset
from fused_wce.trl_integration.commands import hybrid
from fused_wce.trl_integration.commands import model as model_module
from fused_wce.trl_integration.commands.hybrid_data import (answer_reward, final_answer, format_reward,
                                                            prompts_from_conversations)
from fused_wce.trl_integration.commands.options import make_parser
from fused_wce.trl_integration.trainer.hybrid_config import HybridConfig


def test_bare_run_gets_the_demo_defaults():
    _, training, model, _, flags = hybrid.parse_hybrid_args([])
    assert model.model_name_or_path is None
    assert (training.sft_mu, training.sft_mu_end, training.sft_mu_schedule) == (0.9, 0.1, "cosine")
    assert training.max_steps == hybrid.HYBRID_DEMO_DEFAULTS["max_steps"]
    assert training.learning_rate == hybrid.HYBRID_DEMO_DEFAULTS["learning_rate"]
    assert flags.rewards == "answer,format" and flags.curves
    _, training, _, _, _ = hybrid.parse_hybrid_args(["--model_name_or_path", "some/model"])
    assert training.learning_rate == 1e-6 and training.sft_mu == 0.5  # GRPOConfig's and HybridConfig's own


def test_every_trl_grpo_flag_but_its_reward_options_is_accepted():
    from trl.scripts.grpo import make_parser as trl_make_parser

    parser = make_parser(hybrid.PROG, hybrid.HybridArguments, config_class=HybridConfig)
    ours = {action.dest for action in parser._actions}
    theirs = {action.dest for action in trl_make_parser()._actions} - {"reward_model_name_or_path", "reward_funcs"}
    assert theirs <= ours
    assert {"role_weights", "last_n", "decay", "rewards", "sft_mu", "sft_token_reweighting"} <= ours


@pytest.mark.parametrize("flags, match", [
    (["--sft_mu", "1.5"], "sft_mu must be a number in [0, 1]"),
    (["--sft_mu_schedule", "step"], "sft_mu_schedule must be one of"),
    (["--sft_token_reweighting", "p2"], "sft_token_reweighting must be one of"),
    (["--rewards", "answer,bogus"], "--rewards"),
    (["--role_weights", "bot=1"], "bot"),
])
def test_bad_flags_are_one_line_and_exit_2_before_any_model(tmp_path, capsys, monkeypatch, flags, match):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the flags were checked")

    monkeypatch.setattr(model_module, "build_tiny_model", no_model)
    assert cli.main(["hybrid", *flags, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fused-wce hybrid: error: ") and match in err[0], err


def test_data_without_checkable_answers_is_a_usage_error(tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello there"}]}) + "\n")
    assert cli.main(["hybrid", "--dataset_name", str(data), "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkable final answer" in err[0]


def test_prompts_and_rewards_from_the_shipped_conversations():
    """Every checkable assistant reply of the shipped data gives a prompt (its context) and an answer the reply
    itself earns full reward for; wrong answers marked weight 0 and tool calls give none."""
    conversations = load_default_dataset()["messages"]
    rows = prompts_from_conversations(conversations)
    replies = sum(1 for messages in conversations for m in messages[1:] if m["role"] == "assistant")
    assert 0.6 * replies < len(rows) < replies
    for row in rows:
        assert row["prompt"][-1]["role"] in ("user", "tool")
        assert final_answer(row["reference"]) == row["answer"]
    references = [[{"role": "assistant", "content": row["reference"]}] for row in rows]
    answers, expert = [row["answer"] for row in rows], [row["reference"] for row in rows]
    assert answer_reward(references, answers) == [1.0] * len(rows)
    assert format_reward(references, expert) == [0.5] * len(rows)
    assert final_answer('<tool_call>{"name": "calculator"}</tool_call>') is None
    assert final_answer("You are welcome.") is None and final_answer("It is rainy in Lima, -3 C.") == "-3"
    completions = [[{"role": "assistant", "content": text}] for text in
                   ("It is 36417.", "It is 364170.", "-3 C it is.", "3 C.", "Oslo", "in Oslo.\nmore")]
    assert answer_reward(completions, ["36417", "36417", "-3", "-3", "Oslo", "Oslo"]) == [1, 0, 1, 0, 1, 1]
    assert format_reward(completions, ["36417."] * 6) == [0.5, 0.5, 0.5, 0.5, 0.0, 0.0]


def test_short_run_prints_terms_and_writes_curves(tmp_path, capsys):
    """A few steps on 12 shipped conversations with beta > 0 (the reference model is built from the saved initial
    model): one printed line per logged step with mu, both terms, the reward and per-role SFT losses; the curves
    CSV has them per step, the PNG and the model are written."""
    data = tmp_path / "chats.jsonl"
    rows = [json.dumps({"messages": [{k: v for k, v in m.items() if v is not None} for m in messages]})
            for messages in load_default_dataset().select(range(12))["messages"]]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert cli.main(["hybrid", "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "3",
                     "--logging_steps", "1", "--per_device_train_batch_size", "4", "--max_completion_length", "8",
                     "--sft_per_device_train_batch_size", "4", "--beta", "0.1", "--role_weights",
                     "assistant=1,user=0.2"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[fused-wce] step")]
    assert len(printed) == 3
    assert all(f" {key} " in line for line in printed for key in ("mu", "grpo", "sft", "reward", "user"))
    with open(out / "loss_curves.csv", newline="") as handle:
        curves = list(csv.DictReader(handle))
    assert [row["step"] for row in curves] == ["1", "2", "3"]
    mus = [float(row["hybrid/mu"]) for row in curves]
    assert mus[0] > mus[1] > mus[2] >= 0.1  # the demo's cosine decay from 0.9 to 0.1 over max_steps
    for row in curves:
        loss, mu = float(row["loss"]), float(row["hybrid/mu"])
        terms = (1 - mu) * float(row["hybrid/grpo_loss"]) + mu * float(row["hybrid/sft_loss"])
        assert loss == pytest.approx(terms, rel=1e-4, abs=1e-6)
        assert float(row["loss/assistant"]) > 0 and float(row["loss/user"]) > 0 and row["reward"] != ""
    assert (out / "loss_curves.png").stat().st_size > 0
    assert (out / "initial_model" / "config.json").is_file() and (out / "model.safetensors").is_file()
