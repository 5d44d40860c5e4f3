"""Loss curves: the callback writes loss_curves.csv (stable columns, the logged values) and loss_curves.png."""
from __future__ import annotations

import csv

import pytest

from trl_helpers import sft_config, tiny_model  # noqa: I001  (sets HF_HUB_OFFLINE first)

from fused_wce.trl_integration import AdaptiveTurnWeights, TurnWeighting, WeightedSFTTrainer
from fused_wce.trl_integration.chat_data import build_tokenizer, load_default_dataset
from fused_wce.trl_integration.trainer.curves import (CSV_NAME, CURVE_COLUMNS, PNG_NAME, LossCurvesCallback,
                                                      curve_row, read_curves_csv)


def test_columns_are_stable():
    assert CURVE_COLUMNS[:4] == ("step", "epoch", "split", "loss")
    for name in ("loss/assistant", "loss/user", "loss/turn_1", "loss/turn_2", "loss/turn_5+", "loss/turn_last",
                 "weight/turn_1", "weight/assistant"):
        assert name in CURVE_COLUMNS
    assert len(set(CURVE_COLUMNS)) == len(CURVE_COLUMNS)
    assert curve_row(3, 0.5, {"train_runtime": 1.0, "train_loss": 2.0}) is None
    assert curve_row(3, 0.5, {"eval_loss": 2.0, "eval_loss/turn_2": 1.5})["loss/turn_2"] == 1.5


def test_training_writes_csv_and_png(tmp_path):
    tokenizer = build_tokenizer()
    dataset = load_default_dataset().select(range(40))
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5}, adaptive=AdaptiveTurnWeights())
    trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer),
                                 args=sft_config(tmp_path, max_steps=4, logging_steps=2, eval_strategy="steps",
                                                 eval_steps=2),
                                 train_dataset=dataset.select(range(32)), eval_dataset=dataset.select(range(32, 40)),
                                 processing_class=tokenizer, weighting=weighting, callbacks=[LossCurvesCallback()])
    trainer.train()
    with open(tmp_path / CSV_NAME, newline="") as handle:
        header = next(csv.reader(handle))
    assert tuple(header) == CURVE_COLUMNS

    rows = read_curves_csv(tmp_path / CSV_NAME)
    history = [entry for entry in trainer.state.log_history if "loss" in entry or "eval_loss" in entry]
    assert [(row["step"], row["split"]) for row in rows] == [
        (entry["step"], "eval" if "eval_loss" in entry else "train") for entry in history]
    assert [row["split"] for row in rows] == ["train", "eval", "train", "eval"]
    for row, entry in zip(rows, history):
        prefix = "eval_" if row["split"] == "eval" else ""
        logged = {key[len(prefix):]: value for key, value in entry.items() if key.startswith(prefix)}
        for column in ("loss", "loss/assistant", "loss/user", "loss/turn_1", "loss/turn_2", "weight/turn_2"):
            if column in logged:
                assert row[column] == pytest.approx(logged[column], rel=1e-5), column
            else:
                assert column not in row, column
        assert "loss/turn_1" in row and "loss/user" in row
        assert ("weight/turn_1" in row) == (row["split"] == "train")  # multipliers are a training quantity

    png = (tmp_path / PNG_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
