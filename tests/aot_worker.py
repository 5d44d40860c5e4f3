"""Compile every shipped kernel specialisation for the GPU targets given on the command line; print one JSON
line per (spec, target). Runs in its own process: kernels must be defined without TRITON_INTERPRET."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.kernel_specs
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

from benchmarks.kernel_specs import compile_spec, shipped_specs  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", file.name], capture_output=True,
                              text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


# Kernel arguments whose products with a row/column index can pass 2**31: such a product must never be a
# 32-bit multiply.
LARGE_OPERANDS = {"M", "stride_hidden_m", "stride_weight_v", "stride_logits_m", "stride_grad_m", "stride_am", "stride_ak",
                  "stride_bk", "stride_bn", "stride_cm", "stride_cn"}
_NARROW_MUL = re.compile(r"\s*(?:mul|mad)\.lo\.[su]32\s+(%r\d+),\s*([^,;]+),\s*([^,;]+)")
_WIDEN = re.compile(r"\s*(?:cvt\.[su]64\.[su]32|mul\.wide\.[su]32|mad\.wide\.[su]32)\s+%rd\d+,\s*(%r\d+)")


def offset_arithmetic(ptx: str, arg_names: list[str]) -> dict[str, list[str]]:
    """32-bit multiplies in the PTX, named by their operands' origins (kernel argument or program id).

    ``large_narrow``: 32-bit multiplies with an operand loaded from a LARGE_OPERANDS argument (must be empty).
    ``widened_narrow``: 32-bit products of two run-time values that are then widened to 64 bits (an offset
    computed in 32 bits and only then extended): each must be a product known to be small.
    """
    origin: dict[str, str] = {}
    products: dict[str, str] = {}
    large_narrow, widened_narrow = [], []
    for line in ptx.splitlines():
        if match := re.match(r"\s*ld\.param\.\w+\s+(%r\w*?\d+),\s*\[\w+_param_(\d+)\]", line):
            index = int(match.group(2))
            origin[match.group(1)] = arg_names[index] if index < len(arg_names) else f"param_{index}"
        elif match := re.match(r"\s*mov\.u32\s+(%r\d+),\s*%ctaid\.([xyz])", line):
            origin[match.group(1)] = f"program_id({'xyz'.index(match.group(2))})"
        elif match := _NARROW_MUL.match(line):
            operands = [operand.strip() for operand in match.group(2, 3)]
            names = [origin.get(operand, operand) for operand in operands]
            if LARGE_OPERANDS.intersection(names):
                large_narrow.append(line.strip())
            if all(operand.startswith("%r") for operand in operands):
                products[match.group(1)] = "*".join(sorted(names))
        elif (match := _WIDEN.match(line)) and match.group(1) in products:
            widened_narrow.append(products[match.group(1)])
    return {"large_narrow": large_narrow, "widened_narrow": sorted(set(widened_narrow))}


def main(capabilities: list[int]) -> None:
    for capability in capabilities:
        for spec in shipped_specs(capability):
            kernel = compile_spec(spec, capability)
            ptx = kernel.asm["ptx"]
            print(json.dumps({
                "name": spec.name, "capability": capability, "multiplies": spec.multiplies,
                "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx,
                "wide_offsets": bool(re.search(r"mul\.wide\.s32|mul\.lo\.s64|mad\.wide\.s32", ptx)),
                **offset_arithmetic(ptx, [name for name, kind in spec.signature.items() if kind != "constexpr"]),
                "shared": kernel.metadata.shared, **resource_usage(kernel.asm["cubin"]),
            }), flush=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]])
