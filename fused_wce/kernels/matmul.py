"""A strided GEMM, ``C (+)= A @ B`` with fp32 accumulation, for the gradient products."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """``C[M, N] = A[M, K] @ B[K, N]`` (``+= `` when ACCUMULATE), fp32 accumulation, output in C's dtype.

    Pointers:
        a_ptr: ``[M, K]`` fp32/fp16/bf16 with strides (stride_am, stride_ak): transposes are free.
        b_ptr: ``[K, N]`` A's dtype, strides (stride_bk, stride_bn).
        c_ptr: ``[M, N]`` any float dtype, strides (stride_cm, stride_cn); read first if ACCUMULATE (used
            with fp32 C to accumulate ``grad_weight`` across chunks without rounding).
    Programs are ordered in groups of GROUP_SIZE_M row blocks so that consecutive programs reuse B's column
    blocks from L2 (Triton tutorial 03).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_am = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    offs_bn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)
    m_mask = offs_am < M
    n_mask = offs_bn < N
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_SIZE_K):
        offs_k = (k_start + tl.arange(0, BLOCK_SIZE_K)).to(tl.int64)
        k_mask = offs_k < K
        a = tl.load(a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    c_ptrs = c_ptr + offs_am[:, None] * stride_cm + offs_bn[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool, config) -> torch.Tensor:
    """``out (+)= a @ b`` for 2-D ``a`` ``[M, K]``, ``b`` ``[K, N]`` (same dtype), ``out`` ``[M, N]``."""
    (m, k), (k_b, n) = a.shape, b.shape
    if k != k_b or out.shape != (m, n) or a.dtype != b.dtype:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}, "
                         f"dtypes {a.dtype}, {b.dtype}")
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    matmul_kernel[grid](
        a, b, out, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, DOT_PRECISION=config.dot_precision(a.dtype),
        BLOCK_SIZE_M=config.block_m, BLOCK_SIZE_N=config.block_n, BLOCK_SIZE_K=config.block_k,
        GROUP_SIZE_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
