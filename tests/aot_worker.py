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
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

from fused_wce.kernels.compile_specs import compile_spec, shipped_specs  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", file.name], capture_output=True,
                              text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def main(capabilities: list[int]) -> None:
    for capability in capabilities:
        for spec in shipped_specs(capability):
            kernel = compile_spec(spec, capability)
            ptx = kernel.asm["ptx"]
            print(json.dumps({
                "name": spec.name, "capability": capability, "multiplies": spec.multiplies,
                "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx,
                "wide_offsets": bool(re.search(r"mul\.wide\.s32|mul\.lo\.s64|mad\.wide\.s32", ptx)),
                "shared": kernel.metadata.shared, **resource_usage(kernel.asm["cubin"]),
            }), flush=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]])
