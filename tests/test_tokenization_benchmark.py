"""`python -m benchmarks tokenization`: runs, tokenizes as TRL does, writes its tables (speed is not asserted)."""
from __future__ import annotations

import csv

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
