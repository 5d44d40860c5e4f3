"""Launch configurations of the kernels, per target.

GPU configs (sm_80 / sm_90). The vocabulary-tile kernel holds a 128 x 128 fp32 accumulator (64 registers a
thread at 8 warps) plus three running row statistics, and BLOCK_SIZE_K = 64 bf16 keeps three pipeline stages
at 96 KiB of shared memory, inside both A100 (164 KiB) and H100 (228 KiB); 128-row tiles with 8 warps are what
Triton lowers to wgmma on sm_90. BLOCK_SIZE_N = 128 is also the granularity of the tile-relative logits the
gradient kernel reads. The gradient GEMMs use 128 x 256 tiles (Triton tutorial 03's Hopper config): the
``[chunk, H]`` grad_hidden product has few output tiles (1024 x 4096 -> 128 programs: one wave on 132 SMs).
``benchmarks.static`` reports registers, spills and shared memory of each config on each target.

Interpreter configs (TRITON_INTERPRET=1, CPU tensors): the same kernels with blocks sized for test shapes
(every Python-level op costs ~ms there); BLOCK_SIZE_K stays below the tests' H so K masking is exercised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int = 128
    block_k: int = 64
    block_s: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    @staticmethod
    def dot_precision(dtype: torch.dtype) -> str:
        """fp32 inputs follow torch's matmul precision setting (TF32 only when torch allows it)."""
        if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
            return "ieee"
        return "tf32"


@dataclass(frozen=True)
class KernelConfigs:
    vocab_partials: KernelConfig
    combine: KernelConfig
    softmax_grad: KernelConfig
    matmul: KernelConfig
    # Stats-only passes split the vocabulary until about this many programs run at once.
    target_programs_per_sm: int = 4


GPU_CONFIGS = KernelConfigs(
    vocab_partials=KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    combine=KernelConfig(block_m=32, block_s=64, num_warps=4),
    softmax_grad=KernelConfig(block_m=16, num_warps=4),
    matmul=KernelConfig(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3),
)

INTERPRETER_CONFIGS = KernelConfigs(
    vocab_partials=KernelConfig(block_m=32, block_n=256, block_k=64, num_warps=4, num_stages=1),
    combine=KernelConfig(block_m=64, block_s=4, num_warps=4),
    softmax_grad=KernelConfig(block_m=32, num_warps=4),
    matmul=KernelConfig(block_m=64, block_n=64, block_k=128, group_m=4, num_warps=4, num_stages=1),
    target_programs_per_sm=2,
)


def configs_for(device: torch.device) -> KernelConfigs:
    return GPU_CONFIGS if device.type == "cuda" else INTERPRETER_CONFIGS


def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
