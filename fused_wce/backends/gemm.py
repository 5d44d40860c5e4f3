"""``out (+)= a @ b`` with cuBLAS, fp32 output from half-precision operands where the platform has it.

Reduced-precision operands with an fp32 ``out`` use torch's ``out_dtype=torch.float32`` GEMMs (fp32
accumulation and output, no rounding to the operand dtype in between): ``torch.mm(..., out_dtype=)`` and
``torch.addmm(out, a, b, out_dtype=, out=out)``. Where a build lacks them (ROCm, where ``out_dtype`` with half
inputs is not enabled, or any build that refuses the call) a one-time probe per device selects the fallback:
the product in the operand dtype (fp32 accumulation inside cuBLAS, one rounding) added into the fp32 ``out``.
CPU tensors (the Triton interpreter) have no such GEMM: there the exact products of the same inputs are summed
in fp32, upcasting ``CPU_UPCAST_BLOCK`` columns of ``a`` (rows of ``b``) and ``CPU_UPCAST_COLUMNS`` columns of
``b`` at a time, so that the emulation allocates no operand-sized fp32 copy the GPU path would not.
"""
from __future__ import annotations

import functools

import torch

CPU_UPCAST_BLOCK = 128
CPU_UPCAST_COLUMNS = 256
FP32_OUTPUT_MODES = ("out_dtype", "fallback", "emulate")


@functools.lru_cache(maxsize=None)
def _out_dtype_works(device: torch.device) -> bool:
    """Whether ``addmm(out, a, b, out_dtype=float32, out=out)`` with bf16 operands runs on ``device``."""
    if torch.version.hip is not None:
        return False
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        out = torch.mm(a, a, out_dtype=torch.float32)
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        return bool(out[0, 0].item() == 32.0)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def fp32_output_mode(a: torch.Tensor) -> str:
    """How an fp32 product of ``a``'s half-precision operands is formed on its device (FP32_OUTPUT_MODES)."""
    if not a.is_cuda:
        return "emulate"
    return "out_dtype" if _out_dtype_works(a.device) else "fallback"


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool) -> None:
    """``out = a @ b`` (``out += a @ b`` when ``accumulate``); ``a`` and ``b`` share a dtype, ``out`` may be
    wider (fp32) or another half type (formed in fp32, rounded once)."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.dtype == torch.float32:
        _fp32_product_into(a, b, out, accumulate, fp32_output_mode(a))
    else:  # e.g. fp16 weights computed in bf16: an fp32 product rounded once to out's dtype
        product = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        matmul_into(a, b, product, accumulate=False)
        out.add_(product) if accumulate else out.copy_(product)


def _fp32_product_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool, mode: str) -> None:
    if mode == "out_dtype":
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif mode == "fallback":
        product = torch.mm(a, b)
        out.add_(product) if accumulate else out.copy_(product)
    else:
        if not accumulate:
            out.zero_()
        for column in range(0, b.shape[1], CPU_UPCAST_COLUMNS):
            columns = slice(column, column + CPU_UPCAST_COLUMNS)
            for start in range(0, a.shape[1], CPU_UPCAST_BLOCK):
                block = slice(start, start + CPU_UPCAST_BLOCK)
                out[:, columns].addmm_(a[:, block].float(), b[block, columns].float())
