"""benchmarks.static: compiled resources and occupancy of every kernel, without a GPU.

The static report is run on a small subset (two kernels, their candidate configs, sm_80 and sm_90) through its
command line, as a user runs it; every shipped specialisation is compiled by tests/test_aot_compile.py. Occupancy
is checked against arithmetic done by hand.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.static import CSV_COLUMNS, TARGETS, family_of, occupancy, shipped_failures

ROOT = Path(__file__).resolve().parents[1]
SUBSET = r"^vocab_partials\[store_logits,no_bias,plain,bf16\]$|^combine\[plain\]$"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.static", "--targets", "80", "90", "--only", SUBSET,
                           "--jobs", "2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "static_report.csv") as file:
        rows = list(csv.DictReader(file))
    return rows, (out / "static_report.md").read_text(), proc.stdout


@pytest.mark.slow
def test_report_columns_and_coverage(report):
    rows, markdown, _ = report
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["kernel"] for r in rows} == {"vocab_partials[store_logits,no_bias,plain,bf16]", "combine[plain]"}
    # each target: the shipped config of both kernels, plus candidates around them
    for target in ("sm_80", "sm_90"):
        here = [r for r in rows if r["target"] == target]
        assert sum(r["shipped"] == "True" for r in here) == 2
        assert sum(r["role"] == "candidate" for r in here) >= 10
    assert "**shipped**" in markdown and "## Candidate configs" in markdown


@pytest.mark.slow
def test_shipped_configs_do_not_spill_and_use_tensor_cores(report):
    rows, markdown, _ = report
    for row in (r for r in rows if r["shipped"] == "True"):
        where = f"{row['kernel']} on {row['target']}"
        assert row["verdict"] == "ok", where
        assert int(row["spill_store_bytes"]) == int(row["spill_load_bytes"]) == int(row["stack_bytes"]) == 0, where
        if row["kernel"].startswith("vocab_partials"):
            assert row["mma"] == ("wgmma" if row["target"] == "sm_90" else "mma.sync"), where
        assert 0 < int(row["regs"]) <= 255 and int(row["blocks_per_sm"]) >= 1, where
    assert "all compile with 0 spills" in markdown


@pytest.mark.slow
def test_report_detects_spills_and_occupancy_limits(report):
    """The checks can fail: neighbours of the shipped configs that spill are reported as such (sm_80's mma.sync
    keeps a 128 x 128 logit tile's fragments in registers), and the verdict logic turns them into failures when
    marked shipped."""
    rows, _, _ = report
    spilling = {(r["target"], r["kernel"], r["block_m"], r["block_n"]) for r in rows if "spills" in r["verdict"]}
    assert ("sm_80", "vocab_partials[store_logits,no_bias,plain,bf16]", "128", "128") in spilling
    for row in rows:
        if "spills" in row["verdict"]:
            assert int(row["spill_store_bytes"]) + int(row["stack_bytes"]) > 0
    flagged = [dict(r, shipped=True) for r in rows if "spills" in r["verdict"]]
    assert len(shipped_failures(flagged)) == len(flagged)


def test_occupancy_by_hand():
    h100, a100 = TARGETS[90], TARGETS[80]
    # 217 registers -> 6944 per warp -> 7168 (28 x 256): 65536 // 7168 = 9 warps -> one 8-warp block
    occ = occupancy(217, 8, 96 * 1024, h100)
    assert (occ["blocks_by_regs"], occ["blocks_per_sm"], occ["limiter"], occ["occupancy_pct"]) == (1, 1, "registers", 12)
    # 96 KiB + 1 KiB reserved: 228 KiB // 97 KiB = 2 blocks by shared memory
    assert occ["blocks_by_shared"] == 2
    # 64 registers, 4 warps: 65536 // 2048 = 32 warps -> 8 blocks; 16 KiB + 1 KiB: 164 // 17 = 9 -> registers
    occ = occupancy(64, 4, 16 * 1024, a100)
    assert (occ["blocks_by_regs"], occ["blocks_by_shared"], occ["blocks_per_sm"]) == (8, 9, 8)
    # 32 registers, 2 warps, no shared memory: threads allow 32 blocks, the block limit is 32
    assert occupancy(32, 2, 0, a100)["blocks_per_sm"] == 32
    # more shared memory than one block may have: does not launch
    occ = occupancy(128, 4, 200 * 1024, a100)
    assert occ["blocks_per_sm"] == 0 and occ["limiter"] == "shared (does not launch)"
    # sm_100 tensor memory: 256 columns of 512 -> 2 blocks
    assert occupancy(100, 4, 1024, TARGETS[100], tmem_columns=256)["blocks_by_tmem"] == 2


def test_family_names():
    assert family_of("vocab_partials[store_logits,bias,smoothing+z_loss,bf16]") == "vocab_partials[store_logits,bf16]"
    assert family_of("softmax_grad[plain,fp16]") == "softmax_grad[fp16]"
    assert family_of("combine[z_loss]") == "combine"
