"""`fused-wce compare`: the measurements by hand, scheme parsing, and a small end-to-end run (in process)."""
from __future__ import annotations

import csv

import pytest

from trl_helpers import tiny_model  # noqa: I001  (sets HF_HUB_OFFLINE first)

import torch

from fused_wce.trl_integration import cli
from fused_wce.trl_integration.commands import compare, compare_measure
from fused_wce.trl_integration.chat_data import build_tokenizer


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()  # the demo model runs on one CPU thread; leave the session as it was
    yield
    torch.set_num_threads(threads)


def _mean_loss(model, tokenizer, messages, ordinal):
    """Mean CE of the ``ordinal``-th assistant message's tokens given ``messages``, from the full logits."""
    from fused_wce.trl_integration import TurnWeighting, tokenize_with_weights

    encoded = tokenize_with_weights(tokenizer, messages, TurnWeighting())
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    positions = [t for t in range(1, ids.shape[1])
                 if encoded["token_roles"][t] == 2 and encoded["token_turn_index"][t] == ordinal]
    losses = torch.nn.functional.cross_entropy(logits[[t - 1 for t in positions]], ids[0, positions], reduction="none")
    return float(losses.mean()), len(positions)


def test_measure_by_hand(restore_threads):
    torch.set_num_threads(1)  # a tiny model: one thread is faster on a busy machine
    tokenizer = build_tokenizer()
    model = tiny_model("llama", tokenizer)
    conversation = [
        {"role": "system", "content": "Answer briefly and exactly."},
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "3 + 4 = 8.", "weight": 0},
        {"role": "user", "content": "That is wrong. Please try again."},
        {"role": "assistant", "content": "3 + 4 = 7.", "weight": 1},
        {"role": "user", "content": "Convert 2 km to m."},
        {"role": "assistant", "content": "2 km = 2000 m."},
    ]
    measured = compare_measure.measure(model, tokenizer, [conversation], max_length=None)
    full, local = measured["context_full"], measured["context_no_history"]
    assert "turn/turn_1" not in full.values  # turn 1 has no history (and weight 0 here)
    # Turn 2 (the correction): without history = system + "That is wrong..." + the answer.
    with_history, n = _mean_loss(model, tokenizer, conversation[:5], 1)
    without, n_local = _mean_loss(model, tokenizer, [conversation[0]] + conversation[3:5], 0)
    assert n == n_local and full.values["turn/turn_2"][1:] == [n, 1]
    assert full.mean("turn/turn_2") == pytest.approx(with_history, rel=1e-5)
    assert local.mean("turn/turn_2") == pytest.approx(without, rel=1e-5)
    # Turn 3 likewise, its own exchange only.
    with_history, _ = _mean_loss(model, tokenizer, conversation, 2)
    without, _ = _mean_loss(model, tokenizer, [conversation[0]] + conversation[5:], 0)
    assert full.mean("turn/turn_3") == pytest.approx(with_history, rel=1e-5)
    assert local.mean("turn/turn_3") == pytest.approx(without, rel=1e-5)
    # The held-out losses leave the weight-0 message out: assistant = turns 2 and 3 only.
    losses = measured["loss"]
    assert "turn/turn_1" not in losses.values and losses.values["role/assistant"][1] == sum(
        losses.values[f"turn/turn_{k}"][1] for k in (2, 3))
    rows = compare_measure.result_rows("x", "after", measured)
    assert {row["metric"] for row in rows} == {"loss", "loss_with_history", "loss_without_history",
                                               "context_dependence"}


def test_scheme_parsing():
    args = compare.CompareArguments()
    schemes = compare.scheme_weightings(args)
    assert list(schemes) == list(compare.SCHEMES)
    assert schemes["full"].full_sequence and schemes["last_n"].last_n == 2 and schemes["decay"].decay == 0.5
    assert schemes["per_role"].role_weights == {"assistant": 1.0, "user": 0.3, "tool": 0.3}
    assert schemes["adaptive"].adaptive.groups == "turn"
    for bad, match in (("assistant,bogus", "unknown scheme"), ("full,full", "twice"), ("", "unknown")):
        with pytest.raises(ValueError, match=match):
            compare.scheme_weightings(compare.CompareArguments(schemes=bad))
    with pytest.raises(ValueError, match="--decay"):
        compare.scheme_weightings(compare.CompareArguments(decay=2.0))


def test_bad_flags_fail_in_one_line(capsys):
    assert cli.main(["compare", "--schemes", "assistant,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fused-wce compare: error: --schemes") and "\n" not in err


def test_end_to_end(tmp_path, restore_threads):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--schemes", "assistant,full,adaptive", "--max_steps", "2", "--logging_steps", "1",
                     "--holdout_size", "12", "--per_device_train_batch_size", "4", "--max_length", "256",
                     "--output_dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    for heading in ("## Held-out loss per assistant turn", "## Held-out loss per role",
                    "## Context dependence per assistant turn"):
        assert heading in report
    assert "| initial model |" in report and "| adaptive |" in report
    with open(out / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == compare_measure.RESULT_COLUMNS
        rows = list(reader)
    assert {row["scheme"] for row in rows} == {"initial model", "assistant", "full", "adaptive"}
    assert {row["stage"] for row in rows} == {"before", "after"}
    before = {row["group"]: float(row["value"]) for row in rows if row["scheme"] == "initial model"
              and row["metric"] == "loss"}
    after = {row["group"]: float(row["value"]) for row in rows if row["scheme"] == "assistant"
             and row["metric"] == "loss"}
    assert after["role/assistant"] < before["role/assistant"]  # 2 steps at the demo learning rate teach something
    assert any(row["metric"] == "context_dependence" for row in rows)
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for scheme in ("assistant", "full", "adaptive"):
        assert (out / scheme / "loss_curves.csv").exists() and (out / scheme / "loss_curves.png").exists()
