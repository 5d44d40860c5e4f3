"""`python -m benchmarks tokenization`: runs, tokenizes as TRL does, writes its tables (speed is not asserted)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmarks import cli


def test_tokenization_benchmark_writes_its_tables(tmp_path):
    assert cli.main(["tokenization", "--messages", "2", "12", "--min-seconds", "0", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "tokenization.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["messages"]) for row in rows] == [2, 12]
    assert 0 < int(rows[0]["tokens"]) < int(rows[1]["tokens"])
    for row in rows:
        assert float(row["trl_conversations_per_cpu_s"]) > 0 and float(row["weighted_conversations_per_cpu_s"]) > 0
    assert (tmp_path / "tokenization.md").read_text().count("\n") == 4


def test_another_chat_template(tmp_path):
    """--chat-template: the same measurement with Qwen3's training template (tokens as TRL's, else it raises)."""
    template = Path(__file__).parent / "chat_templates" / "qwen3_training.jinja"
    assert cli.main(["tokenization", "--messages", "10", "--min-seconds", "0", "--chat-template", str(template),
                     "--out", str(tmp_path)]) == 0
    with open(tmp_path / "tokenization.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert int(row["messages"]) == 10 and int(row["tokens"]) > 0


def test_unreadable_chat_template_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tokenization", "--chat-template", str(tmp_path / "missing.jinja"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--chat-template: cannot read" in capsys.readouterr().err
