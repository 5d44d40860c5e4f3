"""benchmarks.static (compiled resources and occupancy, no GPU) and benchmarks.roofline (predicted time and memory).

The static report is run on a small subset (two kernels, their candidate configs, sm_80 and sm_90) through its
command line, as a user runs it; every shipped specialisation is compiled by tests/test_aot_compile.py. Occupancy
and the roofline are checked against arithmetic done by hand.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import roofline
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


# --- roofline ---------------------------------------------------------------------------------------------------------
H, V, N, M = 4096, 128256, 16384, 8192  # Llama-3-8B, 16384 tokens, half counted
H200 = roofline.CARDS["H200"]


def test_roofline_main_target_by_hand():
    problem = roofline.Problem.model("Llama-3-8B", N, 0.5)
    assert (problem.hidden, problem.vocab, problem.tokens, problem.counted) == (H, V, N, M)
    gemm = 2 * M * H * V  # 8.61e12 FLOPs, 10.9 ms at 790 TFLOP/s
    fused = roofline.predict("fused_wce", problem, H200)
    assert fused.flops == 3 * gemm
    assert fused.compute_s == pytest.approx(3 * gemm / 790e12)  # 32.7 ms
    assert fused.time_s >= fused.compute_s and fused.time_s < 1.1 * fused.compute_s  # compute-bound
    # 8 chunks of 1024 rows (256 MiB // (V * 2) = 1046 -> 1024); weight read 3x per chunk... the dW GEMM phase:
    # logits M V 2 + hidden M H 2 + fp32 dW read and written per chunk 8 * 2 * V H 4
    dw_bytes = M * V * 2 + M * H * 2 + 8 * 2 * V * H * 4
    dw_phase = dict((name, t) for name, t, _ in fused.phase_times)["dW += dlogits^T @ X (fp32)"]
    assert dw_phase == pytest.approx(max(gemm / 790e12, dw_bytes / 4.3e12))
    # peak: backward casts: fp32 dW + bf16 dW + dX on M rows + dX scattered to N rows
    assert fused.peak_bytes == V * H * 4 + V * H * 2 + M * H * 2 + N * H * 2

    # every row, 6 N H V: Liger and eager do twice the work of fused_wce at 50% counted
    assert roofline.predict("liger", problem, H200).flops == 6 * N * H * V
    assert roofline.predict("torch_eager", problem, H200).flops == 6 * N * H * V
    # recompute in backward on counted rows: 8 M H V
    assert roofline.predict("trl_chunked", problem, H200).flops == 8 * M * H * V
    assert roofline.predict("cce_exact", problem, H200).flops == 8 * M * H * V
    # torch's chunked op with reduction="none" recomputes in backward on all rows: 8 N H V
    assert roofline.predict("torch_chunked", problem, H200).flops == 8 * N * H * V
    # eager's peak: three fp32 [N, V] tensors in log_softmax_backward
    assert roofline.predict("torch_eager", problem, H200).peak_bytes == 12 * N * V


def test_roofline_matches_published_peer_memory():
    """Liger (H200, H 4096, V 128256, N 8192, bf16): 1129 MiB published (peers.md); CCE (A100, Gemma-2-2B, N 8192):
    1164 MB published. The model's tensors should land within 10%."""
    liger = roofline.predict("liger", roofline.Problem("l", 4096, 128256, 8192, 8192), H200)
    assert liger.peak_bytes / roofline.MIB == pytest.approx(1129, rel=0.10)
    cce = roofline.predict("cce", roofline.Problem("g", 2304, 256000, 8192, 8192), roofline.CARDS["A100"])
    assert cce.peak_bytes / 1e6 == pytest.approx(1164, rel=0.10)


def test_roofline_frozen_head_and_compare():
    trainable = roofline.predict("fused_wce", roofline.Problem.model("Llama-3-8B", N, 0.5), H200)
    frozen = roofline.predict("fused_wce", roofline.Problem.model("Llama-3-8B", N, 0.5, frozen_head=True), H200)
    assert frozen.flops == 2 * trainable.flops / 3
    assert frozen.peak_bytes < trainable.peak_bytes - V * H * 4
    row = roofline.compare(trainable, measured_s=trainable.time_s * 1.1, measured_peak_bytes=trainable.peak_bytes)
    assert row["time_ratio"] == pytest.approx(1.1) and not row["needs_note"]
    assert roofline.compare(trainable, measured_s=trainable.time_s * 1.3)["needs_note"]
    with pytest.raises(ValueError, match="provider"):
        roofline.predict("nope", trainable.problem, H200)
    with pytest.raises(ValueError, match="counted"):
        roofline.Problem("x", 8, 8, 4, 5)


def test_roofline_covers_the_suite_grid():
    predictions = roofline.predict_all(cards=("H200", "H100", "A100"))
    assert len(predictions) == 3 * len(roofline.MODELS) * 4 * 2 * len(roofline.PROVIDERS)
    for p in predictions:
        assert p.time_s > 0 and p.peak_bytes > 0 and p.flops > 0
        assert p.time_s >= max(p.compute_s, p.memory_s) * 0.999


def test_roofline_constants_match_the_library():
    from fused_wce import DEFAULT_CHUNK_BUDGET_BYTES
    from fused_wce._passes import LEAN_BUDGET_DIVISOR

    assert roofline.FUSED_WCE_CHUNK_BUDGET == DEFAULT_CHUNK_BUDGET_BYTES
    assert roofline.FUSED_WCE_LEAN_BUDGET_DIVISOR == LEAN_BUDGET_DIVISOR


def test_roofline_lean_memory_stays_below_liger_default():
    """Issue 11's target: lean_memory's predicted peak <= Liger's default at Llama-3-8B, N 16384, half counted."""
    problem = roofline.Problem.model("Llama-3-8B", N, 0.5)
    lean = roofline.predict("fused_wce_lean", problem, H200)
    liger = roofline.predict("liger", problem, H200)
    default = roofline.predict("fused_wce", problem, H200)
    assert lean.peak_bytes <= liger.peak_bytes < default.peak_bytes
    assert lean.flops == pytest.approx(8 * M * H * V) and default.flops == pytest.approx(6 * M * H * V)
