"""Ahead-of-time compile specifications of every kernel at its shipped GPU configs.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))`` compiles a
kernel for a real GPU with no GPU present. The specs below mirror what the JIT specialises at run time for
typical training shapes: pointers 16-byte aligned, row strides divisible by 16 (H and V of real models are),
unit strides as the constant 1. Tests compile them for sm_80 and sm_90; ``benchmarks.static`` reports their
registers, spills and shared memory. (Build tooling: it reads the kernels, the runtime never imports it.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fused_wce.kernels.combine import combine_kernel
from fused_wce.kernels.configs import KernelConfig, gpu_configs
from fused_wce.kernels.logit_rows import logit_rows_kernel
from fused_wce.kernels.softmax_grad import softmax_grad_kernel
from fused_wce.kernels.vocab_partials import vocab_partials_kernel

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class CompileSpec:
    """One kernel specialisation: ``name`` says which (kernel, mode, dtype); ``multiplies`` says whether it
    runs its ``tl.dot`` on tensor cores (fp16/bf16; fp32 follows torch's default of no TF32, so it multiplies
    exactly with FMAs), in which case sm_90 code must use wgmma."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    config: KernelConfig
    multiplies: bool
    aligned: tuple[str, ...] = field(default=())

    def attrs(self) -> dict:
        names = self.fn.arg_names
        return {(names.index(arg),): [["tt.divisibility", 16]] for arg in self.aligned}

    def options(self) -> dict:
        return {"num_warps": self.config.num_warps, "num_stages": self.config.num_stages}


def _pointer(dtype: str) -> str:
    return "*" + dtype


@dataclass(frozen=True)
class VariantFlags:
    """Which loss-variant specialisation (the kernels' HAS_* flags): label smoothing, z-loss, softcap,
    logit scale. DFT needs no kernel flag (it scales per-token coefficients on the host)."""

    smoothing: bool = False
    z_loss: bool = False
    softcap: bool = False
    logit_scale: bool = False

    @property
    def tag(self) -> str:
        on = [name for name in ("smoothing", "z_loss", "softcap", "logit_scale") if getattr(self, name)]
        return "+".join(on) or "plain"


PLAIN_FLAGS = VariantFlags()
ALL_FLAGS = VariantFlags(True, True, True, True)
# What a log-prob call can set (fused_wce.linear_log_prob: the temperature folds into softcap and logit scale).
LOG_PROB_FLAGS = VariantFlags(softcap=True, logit_scale=True)


def variant_flag_sets(full: bool) -> list[VariantFlags]:
    """Every combination of the four flags (16) when ``full``, else plain and all-on (the extremes)."""
    if not full:
        return [PLAIN_FLAGS, ALL_FLAGS]
    return [VariantFlags(*(bool(bits >> i & 1) for i in range(4))) for bits in range(16)]


def vocab_partials_spec(dtype: torch.dtype, *, store_logits: bool, has_bias: bool, config: KernelConfig,
                        flags: VariantFlags = PLAIN_FLAGS) -> CompileSpec:
    t = _TRITON_DTYPES[dtype]
    signature = {
        "hidden_ptr": _pointer(t), "weight_ptr": _pointer(t), "bias_ptr": _pointer(t), "target_ptr": "*i64",
        "logits_ptr": _pointer(t), "part_max_ptr": "*fp32", "part_sumexp_ptr": "*fp32",
        "part_sumexp_shifted_ptr": "*fp32", "part_sum_logits_ptr": "*fp32", "target_logit_ptr": "*fp32",
        "M": "i32", "V": "i32", "H": "i32", "stride_hidden_m": "i32", "stride_weight_v": "i32",
        "stride_logits_m": "i32", "tiles_per_split": "i32", "logit_scale": "fp32", "softcap": "fp32",
    }
    constexprs = {"HAS_BIAS": has_bias, "STORE_LOGITS": store_logits, "HAS_LOGIT_SCALE": flags.logit_scale,
                  "HAS_SOFTCAP": flags.softcap, "HAS_SUM_LOGITS": flags.smoothing,
                  "DOT_PRECISION": config.dot_precision(dtype),
                  "BLOCK_SIZE_M": config.block_m, "BLOCK_SIZE_N": config.block_n, "BLOCK_SIZE_K": config.block_k,
                  "GROUP_SIZE_M": config.group_m}
    signature.update({name: "constexpr" for name in constexprs})
    mode = "store_logits" if store_logits else "stats_only"
    variant = f"{'bias' if has_bias else 'no_bias'},{flags.tag}"
    return CompileSpec(f"vocab_partials[{mode},{variant},{t}]", vocab_partials_kernel,
                       signature, constexprs, config, multiplies=dtype != torch.float32,
                       aligned=("hidden_ptr", "weight_ptr", "logits_ptr", "part_max_ptr", "part_sumexp_ptr",
                                "part_sumexp_shifted_ptr", "H", "stride_hidden_m", "stride_weight_v",
                                "stride_logits_m"))


def combine_spec(config: KernelConfig, flags: VariantFlags = PLAIN_FLAGS) -> CompileSpec:
    signature = {name: "*fp32" for name in ("part_max_ptr", "part_sumexp_ptr", "part_sumexp_shifted_ptr",
                                             "part_sum_logits_ptr", "target_logit_ptr", "token_loss_ptr",
                                             "lse_ptr", "entropy_ptr")}
    signature.update({"is_top1_ptr": "*i8", "z_term_ptr": "*fp32", "M": "i32", "V": "i32", "num_splits": "i32",
                      "label_smoothing": "fp32", "z_loss": "fp32"})
    constexprs = {"HAS_SMOOTHING": flags.smoothing, "HAS_Z_LOSS": flags.z_loss,
                  "BLOCK_SIZE_M": config.block_m, "BLOCK_SIZE_S": config.block_s}
    signature.update({name: "constexpr" for name in constexprs})
    tag = VariantFlags(smoothing=flags.smoothing, z_loss=flags.z_loss).tag
    return CompileSpec(f"combine[{tag}]", combine_kernel, signature, constexprs, config, multiplies=False,
                       aligned=("part_max_ptr", "part_sumexp_ptr", "part_sumexp_shifted_ptr", "M"))


def softmax_grad_spec(dtype: torch.dtype, config: KernelConfig, block_n: int,
                      flags: VariantFlags = PLAIN_FLAGS, entropy_grad: bool = False) -> CompileSpec:
    """The tiled plan's ``dlogits`` kernel; ``entropy_grad``: with the entropy's gradient (log-prob backward)."""
    t = _TRITON_DTYPES[dtype]
    signature = {"logits_ptr": _pointer(t), "part_max_ptr": "*fp32", "lse_ptr": "*fp32", "target_ptr": "*i64",
                 "coef_ptr": "*fp32", "entropy_ptr": "*fp32", "entropy_coef_ptr": "*fp32", "M": "i32", "V": "i32",
                 "num_classes": "i32", "stride_logits_m": "i32", "label_smoothing": "fp32", "z_loss": "fp32",
                 "softcap": "fp32", "logit_scale": "fp32"}
    constexprs = {"HAS_SMOOTHING": flags.smoothing, "HAS_Z_LOSS": flags.z_loss, "HAS_SOFTCAP": flags.softcap,
                  "HAS_LOGIT_SCALE": flags.logit_scale, "BLOCK_SIZE_M": config.block_m, "BLOCK_SIZE_N": block_n,
                  "HAS_ENTROPY_GRAD": entropy_grad}
    signature.update({name: "constexpr" for name in constexprs})
    tag = flags.tag + ("+entropy_grad" if entropy_grad else "")
    return CompileSpec(f"softmax_grad[{tag},{t}]", softmax_grad_kernel, signature, constexprs, config, multiplies=False,
                       aligned=("logits_ptr", "part_max_ptr", "M", "V", "stride_logits_m"))


def logit_rows_spec(dtype: torch.dtype, config: KernelConfig, *, has_bias: bool, known_lse: bool,
                    flags: VariantFlags = PLAIN_FLAGS, dft: bool = False, entropy_grad: bool = False,
                    write_grad: bool = True) -> CompileSpec:
    """The cuBLAS plan's row kernel writing ``dlogits`` in ``dtype``: a chunk (``known_lse`` False: stats and
    dlogits) or rows whose lse is given (``known_lse``: a lean-mode vocabulary slab, or the log-prob backward's
    chunk); ``entropy_grad``: with the entropy's gradient; ``write_grad`` False: the statistics alone (the
    statistics-only pass with ``logits_gemm="cublas"``)."""
    t = _TRITON_DTYPES[dtype]
    signature = {"logits_ptr": "*fp32", "grad_ptr": _pointer(t) if write_grad else "*fp32", "bias_ptr": _pointer(t),
                 "target_ptr": "*i64",
                 "coef_ptr": "*fp32", "lse_ptr": "*fp32", "token_loss_ptr": "*fp32", "entropy_ptr": "*fp32",
                 "is_top1_ptr": "*i8", "z_term_ptr": "*fp32", "coef_out_ptr": "*fp32", "entropy_coef_ptr": "*fp32",
                 "V": "i32", "num_classes": "i32", "stride_logits_m": "i32", "stride_grad_m": "i32",
                 "label_smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32", "logit_scale": "fp32"}
    constexprs = {"HAS_BIAS": has_bias, "HAS_SMOOTHING": flags.smoothing, "HAS_Z_LOSS": flags.z_loss,
                  "HAS_SOFTCAP": flags.softcap, "HAS_LOGIT_SCALE": flags.logit_scale, "HAS_DFT": dft and not known_lse,
                  "KNOWN_LSE": known_lse, "WRITE_GRAD": write_grad, "WRITE_COEF": dft and not known_lse and write_grad,
                  "BLOCK_SIZE_N": config.block_n, "HAS_ENTROPY_GRAD": entropy_grad}
    signature.update({name: "constexpr" for name in constexprs})
    mode = "slab" if known_lse else "chunk" if write_grad else "stats"
    tag = flags.tag + ("+dft" if dft else "") + ("+entropy_grad" if entropy_grad else "")
    return CompileSpec(f"logit_rows[{mode},{'bias' if has_bias else 'no_bias'},{tag},{t}]", logit_rows_kernel,
                       signature, constexprs, config, multiplies=False,
                       aligned=("logits_ptr", "grad_ptr", "V", "stride_logits_m", "stride_grad_m"))


def shipped_specs(capability: int, dtypes=(torch.bfloat16, torch.float16, torch.float32),
                  all_variants_for=(torch.bfloat16,)) -> list[CompileSpec]:
    """The specialisations the Triton path launches on an ``sm_<capability>`` GPU, at its shipped configs.

    Every combination of the loss-variant flags for the dtypes in ``all_variants_for`` (bf16, the training
    dtype); plain and all-variants-on (the most registers) for the others; the row kernel (no tensor cores) in
    its plain and all-on forms, with and without bias, chunk, slab and statistics alone, for every dtype. The
    log-prob backward's entropy-gradient specialisations, per dtype: the row kernel with known lse (plain and
    softcap + scale, with and without bias) and the tiled plan's ``softmax_grad`` (plain, softcap + scale), plus
    each kernel's heaviest form (every flag on) as the register bound.
    """
    combine_config = gpu_configs(capability, torch.bfloat16).combine
    specs = [combine_spec(combine_config, VariantFlags(smoothing=s, z_loss=z)) for s in (False, True)
             for z in (False, True)]
    for dtype in dtypes:
        configs = gpu_configs(capability, dtype)
        for flags in variant_flag_sets(full=dtype in all_variants_for):
            vocab_config = configs.vocab_config(softcap=flags.softcap, label_smoothing=flags.smoothing)
            for has_bias in (False, True):
                for store_logits in (False, True):
                    specs.append(vocab_partials_spec(dtype, store_logits=store_logits, has_bias=has_bias,
                                                     config=vocab_config, flags=flags))
            specs.append(softmax_grad_spec(dtype, configs.softmax_grad, vocab_config.block_n, flags))
        for flags, dft in ((PLAIN_FLAGS, False), (ALL_FLAGS, True)):
            for has_bias in (False, True):
                for known_lse in (False, True):
                    specs.append(logit_rows_spec(dtype, configs.logit_rows, has_bias=has_bias, known_lse=known_lse,
                                                 flags=flags, dft=dft))
                specs.append(logit_rows_spec(dtype, configs.logit_rows, has_bias=has_bias, known_lse=False,
                                             flags=flags, dft=dft, write_grad=False))
        specs += _entropy_grad_specs(dtype, configs)
    return specs


def _entropy_grad_specs(dtype: torch.dtype, configs) -> list[CompileSpec]:
    """The HAS_ENTROPY_GRAD specialisations of ``dtype`` (see :func:`shipped_specs`)."""
    specs = [logit_rows_spec(dtype, configs.logit_rows, has_bias=has_bias, known_lse=True, flags=flags,
                             entropy_grad=True)
             for flags in (PLAIN_FLAGS, LOG_PROB_FLAGS) for has_bias in (False, True)]
    specs.append(logit_rows_spec(dtype, configs.logit_rows, has_bias=True, known_lse=False, flags=ALL_FLAGS, dft=True,
                                 entropy_grad=True))
    for flags in (PLAIN_FLAGS, LOG_PROB_FLAGS, ALL_FLAGS):
        block_n = configs.vocab_config(softcap=flags.softcap, label_smoothing=flags.smoothing).block_n
        specs.append(softmax_grad_spec(dtype, configs.softmax_grad, block_n, flags, entropy_grad=True))
    return specs


def compile_spec(spec: CompileSpec, capability: int):
    """Compile ``spec`` for ``sm_<capability>`` (e.g. 80, 90); returns triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs())
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=spec.options())
