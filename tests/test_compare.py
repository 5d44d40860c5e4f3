"""`fused-wce compare` and `fused-wce evaluate`: flags, defaults, end-to-end runs (in process, tiny models)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from trl_helpers import tiny_model  # noqa: I001  (sets HF_HUB_OFFLINE first)

import torch

from fused_wce.trl_integration import cli
from fused_wce.trl_integration.chat_data import build_tokenizer
from fused_wce.trl_integration.commands import compare
from fused_wce.trl_integration.commands.model import build_model
from fused_wce.trl_integration.evaluation.results import DIFFERENCE_COLUMNS, RESULT_COLUMNS
from fused_wce.trl_integration.gguf_models import default_cache_dir
from fused_wce.trl_integration.history_data import HELDOUT_PATH


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()  # the commands run on one CPU thread; leave the session as it was
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from gguf_helpers import write_llama_gguf

    tokenizer = build_tokenizer()
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_llama_gguf(tiny_model("llama", tokenizer, seed=2, tie_word_embeddings=True), tokenizer, path)
    return path


def _csv(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return tuple(reader.fieldnames), list(reader)


# ------------------------------------------------------------------------------------------------ flags
def test_scheme_and_seed_parsing():
    schemes = compare.scheme_weightings(compare.CompareArguments())
    assert list(schemes) == list(compare.SCHEMES)
    assert schemes["full"].full_sequence and schemes["last_n"].last_n == 2 and schemes["decay"].decay == 0.5
    assert schemes["per_role"].role_weights == {"assistant": 1.0, "user": 0.3, "tool": 0.3}
    assert schemes["adaptive"].adaptive.groups == "turn"
    for bad, match in (("assistant,bogus", "unknown scheme"), ("full,full", "twice"), ("", "unknown")):
        with pytest.raises(ValueError, match=match):
            compare.scheme_weightings(compare.CompareArguments(schemes=bad))
    with pytest.raises(ValueError, match="--decay"):
        compare.scheme_weightings(compare.CompareArguments(decay=2.0))
    assert compare.parse_seeds(None, 42) == [42] and compare.parse_seeds("0, 1,2", 42) == [0, 1, 2]
    for bad in ("a,b", "1,1", ","):
        with pytest.raises(ValueError, match="--seeds"):
            compare.parse_seeds(bad, 0)


@pytest.mark.parametrize("argv, start", [
    (["--schemes", "assistant,nope"], "fused-wce compare: error: --schemes"),
    (["--seeds", "0,x"], "fused-wce compare: error: --seeds"),
    (["--holdout_size", "0"], "fused-wce compare: error: --holdout_size must be > 0"),
])
def test_bad_flags_fail_in_one_line(argv, start, capsys):
    assert cli.main(["compare", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(start) and "\n" not in err


def test_help_is_compare_s_own(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.split("options:")[0].count("Train the same model under several turn weightings") == 1
    assert "Weighted multi-turn SFT" not in text
    assert "holdout_size=32" in text and "num_train_epochs=4.0" in text  # the demo defaults a bare run uses


def test_schedule_and_no_checkpoints_also_with_a_model():
    """The compare schedule applies to any model; nothing is saved unless --save_models."""
    _, training, model, _, args = compare.parse_compare_args(["--model_name_or_path", "some/model"])
    assert model.model_name_or_path == "some/model"
    assert (training.max_steps, training.logging_steps, training.save_strategy) == (60, 10, "no")
    assert training.learning_rate == 2e-5 and args.holdout_size is None  # not the tiny model's demo values
    _, bare, _, _, bare_args = compare.parse_compare_args([])
    assert bare.learning_rate == 3e-3 and bare_args.holdout_size == 32 and not bare_args.save_models


def test_a_gguf_model_path_trains_as_a_plain_model(tiny_gguf):
    _, training, model_args, _, _ = compare.parse_compare_args(["--model_name_or_path", str(tiny_gguf)])
    model, tokenizer = build_model(model_args, training)
    assert isinstance(model, torch.nn.Module) and tokenizer.eos_token == "<|im_end|>"
    assert not hasattr(model.config, "quantization_config")


# ------------------------------------------------------------------------------------------------ runs
def test_compare_end_to_end_with_seeds(tmp_path, restore_threads):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--schemes", "assistant,full", "--seeds", "0,1", "--max_steps", "1",
                     "--logging_steps", "1", "--holdout_size", "3", "--per_device_train_batch_size", "2",
                     "--answers", "needs_history", "--max_new_tokens", "3", "--save_models",
                     "--output_dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    for heading in ("## Findings", "### Differences between models", "## Held-out loss", "## Context dependence",
                    "## Greedy answers"):
        assert heading in report
    assert "`full` - `assistant`:" in report and "mean over 2 seeds" in report
    columns, rows = _csv(out / "results.csv")
    assert columns == RESULT_COLUMNS
    assert {row["model"] for row in rows} == {"initial model", "assistant", "full"}
    assert {row["seed"] for row in rows if row["model"] == "full"} == {"mean", "0", "1"}
    assert {row["seed"] for row in rows if row["model"] == "initial model"} == {"mean", "0", "1"}  # seeded init
    cells = {(row["model"], row["seed"], row["metric"], row["group"]): row for row in rows}
    cell = cells[("full", "mean", "loss", "history/needed")]
    assert float(cell["ci_low"]) <= float(cell["value"]) <= float(cell["ci_high"])
    seeds = [float(cells[("full", seed, "loss", "history/needed")]["value"]) for seed in ("0", "1")]
    assert float(cell["value"]) == pytest.approx(sum(seeds) / 2, rel=1e-5)
    assert ("assistant", "mean", "answer_contains", "history/needed") in cells
    assert ("assistant", "mean", "answer_contains", "history/not_needed") not in cells  # --answers needs_history
    columns, differences = _csv(out / "differences.csv")
    assert columns == DIFFERENCE_COLUMNS and {(d["model"], d["baseline"]) for d in differences} == {
        ("assistant", "initial model"), ("full", "initial model"), ("full", "assistant")}
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for scheme in ("assistant", "full"):
        for seed in (0, 1):
            folder = out / scheme / f"seed_{seed}"
            assert (folder / "loss_curves.csv").exists() and (folder / "model.safetensors").exists()
            assert not list(folder.glob("checkpoint-*")) and not list(folder.rglob("optimizer.pt"))


def test_evaluate_end_to_end(tiny_gguf, tmp_path, restore_threads):
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model_name_or_path", str(tiny_gguf), "--max_conversations", "3",
                     "--max_new_tokens", "3", "--output_dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "`tiny.gguf`: context dependence" in report and "## Greedy answers" in report
    columns, rows = _csv(out / "results.csv")
    assert columns == RESULT_COLUMNS and {row["seed"] for row in rows} == {"mean"}
    answered = {row["group"] for row in rows if row["metric"] == "answer_exact"}
    assert answered == {"all", "history/needed", "history/not_needed"}
    messages = {row["group"]: int(row["messages"]) for row in rows if row["metric"] == "context_dependence"}
    held_out = [json.loads(line)["messages"] for line in HELDOUT_PATH.read_text().splitlines()[:3]]
    labelled = [m for c in held_out for m in c[3:] if m["role"] == "assistant" and m["needs_history"]]
    assert messages["history/needed"] == len(labelled)


@pytest.mark.parametrize("argv, last", [
    ([], "fused-wce evaluate: error: the following arguments are required: --model_name_or_path"),
    (["--model_name_or_path", "m", "--max_conversations", "0"],
     "fused-wce evaluate: error: --max_conversations must be >= 1, got 0"),
    (["--model_name_or_path", "/nonexistent/model"], "fused-wce evaluate: error: --model_name_or_path: cannot load"),
])
def test_evaluate_bad_flags(argv, last, capsys):
    try:
        code = cli.main(["evaluate", *argv])
    except SystemExit as exit_info:  # argparse: the usage, then one line naming the flag; exit status 2
        code = exit_info.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(last) and (len(lines) == 1 or lines[0].startswith("usage: fused-wce evaluate"))


def test_evaluate_names_a_bad_label(tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hi", "needs_history": "no"}]}) + "\n")
    assert cli.main(["evaluate", "--model_name_or_path", "m", "--dataset_name", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fused-wce evaluate: error: {data}: row 0: message 1: 'needs_history' must be true or false, "
                   "got 'no'")


SMOLLM2 = default_cache_dir() / "SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").is_file(),
                    reason=f"SmolLM2-135M-Instruct not fetched (`fused-wce fetch-model` puts it in {SMOLLM2})")
def test_the_pretrained_model_uses_the_history(tmp_path, restore_threads):
    """The metric's sanity check on the real model: context dependence clearly > 0 where the history is needed
    and far smaller elsewhere; greedy answers find the fact with the history, not without it."""
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model_name_or_path", str(SMOLLM2), "--max_conversations", "6",
                     "--answers", "needs_history", "--output_dir", str(out)]) == 0
    _, rows = _csv(out / "results.csv")
    value = {(row["metric"], row["group"]): float(row["value"]) for row in rows}
    needed, other = value[("context_dependence", "history/needed")], value[("context_dependence", "history/not_needed")]
    assert needed > 0.8 and needed > 3 * other
    assert value[("answer_contains", "history/needed")] > value[("answer_contains_without_history", "history/needed")]
    assert "the model uses the history where it is needed" in Path(out / "report.md").read_text()
