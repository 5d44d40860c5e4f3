"""Every kernel at its shipped configs compiles ahead of time for sm_80 and sm_90 with no GPU present.

The interpreter accepts code a real GPU compiler rejects (tiles under 16 in tl.dot, shared memory beyond the
card's); compiling to PTX and a cubin catches that. Also asserted: the sm_90 code of every tensor-core
kernel uses wgmma (mma.sync on sm_80), no kernel spills registers (a spill is a real, checkable cost), and
offsets that can pass 2**31 use 64-bit arithmetic. The compiles run in a subprocess (tests/aot_worker.py)
because this process defines the kernels for Triton's interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    worker = Path(__file__).with_name("aot_worker.py")
    proc = subprocess.run([sys.executable, str(worker), "80", "90"], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("capability", [80, 90])
def test_shipped_kernels_compile_without_spills(compiled, capability):
    rows = [row for row in compiled if row["capability"] == capability]
    # 4 combine flag sets; bf16: 16 variant flag sets x (4 vocab_partials + softmax_grad);
    # fp16 and fp32: 2 flag sets (plain, all on) x 5 (the gradient GEMMs are cuBLAS);
    # logit_rows: 3 dtypes x 2 flag sets x bias or not x chunk, slab or statistics alone;
    # the entropy gradient, per dtype: logit_rows known-lse 2 flag sets x bias or not + all-on, softmax_grad 3
    assert len(rows) == 4 + 16 * 5 + 2 * 2 * 5 + 3 * 2 * 2 * 3 + 3 * (2 * 2 + 1 + 3)
    for row in rows:
        where = f"{row['name']} on sm_{capability}"
        if row["multiplies"]:
            assert row["wgmma" if capability >= 90 else "mma_sync"], f"{where}: no tensor-core instructions"
        assert row["STACK"] == 0 and row["LOCAL"] == 0, f"{where} spills: {row}"
        assert row["REG"] <= 255 and row["shared"] <= SHARED_MEMORY_LIMIT[capability], where


def test_large_offsets_are_64_bit(compiled):
    for row in compiled:
        if row["name"].startswith(("vocab_partials", "softmax_grad", "logit_rows")):
            assert row["wide_offsets"], f"{row['name']}: no 64-bit offset arithmetic"


# Kernel arguments whose 32-bit products with a run-time value may be widened into an offset because they are
# bounded far below 2**31: vocab_partials' first vocabulary tile of a split, split * tiles_per_split <=
# cdiv(V, BLOCK_SIZE_N) (the split index is computed from the program id in grouped order).
SMALL_PRODUCT_OPERANDS = {"tiles_per_split"}


def test_large_products_are_never_32_bit(compiled):
    """The specific products that can pass 2**31 (row * row stride: rows * H, V * H, rows * V; split * M) are
    64-bit: no 32-bit multiply in any kernel's PTX takes a stride or M as an operand, and every 32-bit product
    of two run-time values that is widened into a 64-bit offset is one known to be small."""
    for row in compiled:
        where = f"{row['name']} on sm_{row['capability']}"
        assert not row["large_narrow"], f"{where}: 32-bit multiply of a large operand: {row['large_narrow']}"
        unexpected = {product for product in row["widened_narrow"]
                      if not SMALL_PRODUCT_OPERANDS.intersection(product.split("*"))}
        assert not unexpected, f"{where}: 32-bit products widened into offsets: {sorted(unexpected)}"
