"""Test-harness fixes for gaps of Triton 3.9's CPU interpreter (TRITON_INTERPRET=1), so the shipped kernels
can be checked on CPU with their GPU semantics. Nothing here changes a kernel or a tolerance.

- ``tl.dot`` on bf16 operands multiplies the raw uint16 bit patterns (triton issue 11584): on a GPU, tensor
  cores multiply the bf16 values exactly and accumulate in fp32, so upcast bf16 operands to fp32 first.
- fp32 -> bf16 casts truncate; the GPU's ``cvt.rn.bf16.f32`` rounds to nearest even, so round.

bf16 *arithmetic* is also wrong in the interpreter; the kernels never do arithmetic in bf16 (every loaded tile
is upcast to fp32 or fed to ``tl.dot``), so it needs no fix here.
"""
from __future__ import annotations

import numpy as np


def _bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _fp32_to_bf16_bits_rne(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    is_nan = np.isnan(values)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)


def install() -> None:
    """Patch the interpreter's builder in place (idempotent)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_fused_wce_fixed", False):
        return
    original_dot = builder_cls.create_dot
    original_cast = builder_cls.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(_bf16_bits_to_fp32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = interpreter.TensorHandle(_bf16_bits_to_fp32(b.data), tl.float32)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_fp32_to_bf16_bits_rne(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder_cls.create_dot = create_dot
    builder_cls.cast_impl = cast_impl
    builder_cls._fused_wce_fixed = True
