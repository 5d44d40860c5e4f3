"""Launch configurations of the kernels, per target.

GPU configs, per architecture, each checked to compile without register spills (tests/test_aot_compile.py).
The vocabulary-tile kernel holds a 128 x BLOCK_SIZE_N fp32 accumulator plus its logsumexp epilogue; with
BLOCK_SIZE_K = 64 and three pipeline stages its shared memory fits A100 (164 KiB) and H100 (228 KiB); 128-row
tiles with 8 warps are what Triton lowers to wgmma on sm_90. BLOCK_SIZE_N is also the granularity of the
tile-relative logits the gradient kernel reads. (The gradient GEMMs are cuBLAS: no configs here.)

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
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8

    @staticmethod
    def dot_precision(dtype: torch.dtype) -> str:
        """fp32 inputs follow torch's cuBLAS matmul precision (TF32 only where torch allows it), so both plans
        multiply alike; half-precision inputs ignore it."""
        if dtype == torch.float32 and not allows_tf32():
            return "ieee"
        return "tf32"


def allows_tf32() -> bool:
    """Whether torch lets fp32 cuBLAS matmuls use TF32, read through the per-backend precision API, which
    answers whichever API the user set it with (the legacy ``allow_tf32`` flag raises once the newer
    ``torch.backends.fp32_precision`` API has been used)."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


@dataclass(frozen=True)
class KernelConfigs:
    vocab_partials: KernelConfig
    combine: KernelConfig
    softmax_grad: KernelConfig
    logit_rows: KernelConfig
    # vocab_partials when its epilogue also carries a softcap or the label-smoothing sum (more registers);
    # None: the same as vocab_partials.
    vocab_partials_heavy: KernelConfig | None = None
    # Stats-only passes split the vocabulary until about this many programs run at once.
    target_programs_per_sm: int = 4

    def vocab_config(self, *, softcap: bool, label_smoothing: bool) -> KernelConfig:
        """The vocab_partials config for a loss variant (the BLOCK_SIZE_N the gradient kernel must reuse)."""
        if (softcap or label_smoothing) and self.vocab_partials_heavy is not None:
            return self.vocab_partials_heavy
        return self.vocab_partials


_COMBINE = KernelConfig(block_m=32, block_s=64, num_warps=4)
_SOFTMAX_GRAD = KernelConfig(block_m=16, num_warps=4)
# One program per row streams 2048-column tiles of fp32 logits: 8 floats per thread per tile.
_LOGIT_ROWS = KernelConfig(block_m=1, block_n=2048, num_warps=8)

SM90_CONFIGS = KernelConfigs(
    vocab_partials=KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    combine=_COMBINE, softmax_grad=_SOFTMAX_GRAD, logit_rows=_LOGIT_ROWS,
    # a softcap's tanh or the smoothing sum on a 128 x 128 tile spills 8-40 bytes; 128 x 64 does not
    vocab_partials_heavy=KernelConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3),
)
# sm_80's mma.sync keeps operand fragments in registers: a 128 x 128 tile with the logsumexp epilogue spills
# there, 128 x 64 does not.
SM80_CONFIGS = KernelConfigs(
    vocab_partials=KernelConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3),
    combine=_COMBINE, softmax_grad=_SOFTMAX_GRAD, logit_rows=_LOGIT_ROWS,
)
# fp32 multiplies exactly (no TF32 unless torch allows it), with FMAs whose operand fragments live in
# registers: smaller tiles and BLOCK_SIZE_K keep those kernels free of spills on both architectures.
FP32_CONFIGS = KernelConfigs(
    vocab_partials=KernelConfig(block_m=64, block_n=128, block_k=16, num_warps=8, num_stages=3),
    combine=_COMBINE, softmax_grad=_SOFTMAX_GRAD, logit_rows=_LOGIT_ROWS,
)

INTERPRETER_CONFIGS = KernelConfigs(
    vocab_partials=KernelConfig(block_m=32, block_n=256, block_k=64, num_warps=4, num_stages=1),
    combine=KernelConfig(block_m=64, block_s=4, num_warps=4),
    softmax_grad=KernelConfig(block_m=32, num_warps=4),
    logit_rows=KernelConfig(block_m=1, block_n=512, num_warps=4),
    target_programs_per_sm=2,
)


def gpu_configs(capability: int, dtype: torch.dtype) -> KernelConfigs:
    """The shipped configs for ``sm_<capability>`` (80, 90, ...) and an input dtype."""
    if dtype == torch.float32:
        return FP32_CONFIGS
    return SM90_CONFIGS if capability >= 90 else SM80_CONFIGS


def configs_for(device: torch.device, dtype: torch.dtype) -> KernelConfigs:
    """GPU configs by architecture and dtype; interpreter configs for CPU tensors (TRITON_INTERPRET=1)."""
    if device.type != "cuda":
        return INTERPRETER_CONFIGS
    major, minor = torch.cuda.get_device_capability(device)
    return gpu_configs(10 * major + minor, dtype)


def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
