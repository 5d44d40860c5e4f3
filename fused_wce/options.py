"""``LossOptions``: every keyword option of a loss call, validated once, frozen, passed whole through the layers.

The public functions build one from their keyword arguments (raising a ``TypeError`` / ``ValueError`` that
names the argument), the custom op carries its fields as schema arguments (:meth:`LossOptions.op_schema`,
:meth:`LossOptions.op_kwargs`), and the backends read it and its derived quantities (which loss variant
terms are on, how many tile summaries a row needs, in which dtype the weight gradient is formed).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
# How the Triton path's gradient pass forms a chunk's logits: "cublas" (torch.mm with fp32 output into the
# chunk buffer, then one Triton row kernel), "triton" (a register-tiled Triton matmul that stores tile-relative
# logits in the compute dtype); "auto" picks the one measured faster (benchmarks/NOTES.md).
LOGITS_GEMMS = ("auto", "cublas", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_real(name: str, value, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


@dataclass(frozen=True)
class LossOptions:
    """The options of one loss call (see :func:`fused_wce.linear_cross_entropy` for their meaning).

    Loss variant: ``label_smoothing`` (eps in [0, 1)), ``z_loss`` (lam >= 0), ``softcap`` (> 0 or None),
    ``logit_scale`` (> 0), ``dft``. Plain cross-entropy when each has its default. Execution: ``chunk_size``,
    ``backend``, ``compute_dtype`` (None until resolved against the inputs, see :meth:`resolved`),
    ``lean_memory``, ``logits_gemm``. Hashable and comparable, so equal options specialise alike.
    """

    ignore_index: int = -100
    reduction: str = "mean"
    chunk_size: int | None = None
    backend: str = "auto"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    dft: bool = False
    compute_dtype: torch.dtype | None = None
    lean_memory: bool = False
    logits_gemm: str = "auto"

    def __post_init__(self):
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not -2**63 <= self.ignore_index < 2**63:
            raise ValueError(f"ignore_index must fit in int64, got {self.ignore_index}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.chunk_size is not None:
            if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, numbers.Integral):
                raise TypeError(f"chunk_size must be an int or None, got {type(self.chunk_size).__name__}")
            if self.chunk_size < 1:
                raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.logits_gemm not in LOGITS_GEMMS:
            raise ValueError(f"logits_gemm must be one of {LOGITS_GEMMS}, got {self.logits_gemm!r}")
        self._check_variant()
        if self.compute_dtype is not None and self.compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be float32, float16 or bfloat16, got {self.compute_dtype}")
        if not isinstance(self.lean_memory, bool):
            raise TypeError(f"lean_memory must be a bool, got {type(self.lean_memory).__name__}")
        # Normalise numbers to their schema types (an int label_smoothing=0 is the float 0.0).
        for name in ("label_smoothing", "z_loss", "logit_scale"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))
        object.__setattr__(self, "ignore_index", int(self.ignore_index))

    def _check_variant(self) -> None:
        label_smoothing = _check_real("label_smoothing", self.label_smoothing)
        z_loss = _check_real("z_loss", self.z_loss)
        logit_scale = _check_real("logit_scale", self.logit_scale)
        softcap = _check_real("softcap", self.softcap, optional=True)
        if not (math.isfinite(label_smoothing) and 0.0 <= label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not (math.isfinite(z_loss) and z_loss >= 0.0):
            raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")
        if softcap is not None and not (math.isfinite(softcap) and softcap > 0.0):
            raise ValueError(f"softcap must be None or finite and > 0, got {softcap}")
        if not (math.isfinite(logit_scale) and logit_scale > 0.0):
            raise ValueError(f"logit_scale must be finite and > 0, got {logit_scale}")
        if not isinstance(self.dft, bool):
            raise TypeError(f"dft must be a bool, got {type(self.dft).__name__}")

    # ---------------------------------------------------------------------------------- derived quantities
    @property
    def has_logit_scale(self) -> bool:
        return self.logit_scale != 1.0

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None

    @property
    def has_smoothing(self) -> bool:
        return self.label_smoothing != 0.0

    @property
    def has_z_loss(self) -> bool:
        return self.z_loss != 0.0

    @property
    def num_summaries(self) -> int:
        """Online-logsumexp numbers per row and vocabulary tile: ``(max, sum exp, sum exp * shifted)``, plus
        ``sum z`` with label smoothing (its mean-logit term)."""
        return 4 if self.has_smoothing else 3

    def resolved(self, hidden: torch.Tensor) -> LossOptions:
        """These options with ``compute_dtype`` fixed for ``hidden``: autocast's dtype under an enabled
        ``torch.autocast`` (as ``F.linear`` would), else hidden's own dtype."""
        if self.compute_dtype is not None:
            return self
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        return dataclasses.replace(self, compute_dtype=dtype)

    @property
    def casts_inputs(self) -> bool:
        """Whether weight and bias may differ in dtype from hidden (the matmuls run in one compute dtype)."""
        return self.compute_dtype is not None

    def lean_applies(self, grad_weight_dtype: torch.dtype) -> bool:
        """Lean mode changes the plan only for a non-fp32 weight gradient: with fp32 weights the fp32
        accumulator already is the gradient, and vocabulary slabs would only cost FLOPs."""
        return self.lean_memory and grad_weight_dtype != torch.float32

    def weight_grad_dtype(self, grad_weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype a pass forms ``grad_weight`` in: the weight's own dtype in lean mode, else an fp32
        accumulator over token chunks."""
        return grad_weight_dtype if self.lean_applies(grad_weight_dtype) else torch.float32

    # ------------------------------------------------------------------------------------- custom op schema
    def op_kwargs(self, names: tuple[str, ...] | None = None) -> dict:
        """The fields (those in ``names``, default all) as keyword arguments of the custom ops
        (``compute_dtype`` must be resolved)."""
        if self.compute_dtype is None:
            raise ValueError("compute_dtype must be resolved (LossOptions.resolved) before the op is called")
        return {name: getattr(self, name) for name in names or FIELD_NAMES}

    @classmethod
    def op_schema(cls, names: tuple[str, ...] | None = None) -> str:
        """The fields (those in ``names``, default all) as keyword-only arguments of a ``torch.library`` schema,
        in field order."""
        return ", ".join(f"{_SCHEMA_TYPES[name]} {name}" for name in names or FIELD_NAMES)

    # ------------------------------------------------------------------------------------------ temperature
    def tempered(self, temperature: float) -> LossOptions:
        """These options with the transformed logits divided by ``temperature`` (> 0, finite), as an RL trainer
        samples and scores: ``z = softcap(logit_scale * r) / T`` (TRL's ``logits / temperature`` after the
        model's own final softcapping).

        The temperature is not a separate transform: ``cap * tanh(s r / cap) / T`` is the softcap of width
        ``cap / T`` of ``(s / T) r``, and without a softcap ``s r / T`` is the logit scale ``s / T``. So the
        returned options have ``logit_scale / T`` and ``softcap / T``, and every path, kernel specialisation and
        gradient (``dz/dr = (s / T) (1 - (z T / cap)^2)``) applies unchanged.
        """
        temperature = check_temperature(temperature)
        if temperature == 1.0:
            return self
        logit_scale = self.logit_scale / temperature
        softcap = None if self.softcap is None else self.softcap / temperature
        for value in (logit_scale, softcap):
            if value is not None and not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"temperature {temperature} takes logit_scale / temperature or softcap / temperature "
                                 f"out of the positive finite floats ({value})")
        return dataclasses.replace(self, logit_scale=logit_scale, softcap=softcap)


def check_temperature(temperature) -> float:
    """``temperature`` as a float, or a ``TypeError`` / ``ValueError`` naming it (it must be finite and > 0)."""
    value = _check_real("temperature", temperature)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    return value


_SCHEMA_TYPES = {
    "ignore_index": "int", "reduction": "str", "chunk_size": "int?", "backend": "str",
    "label_smoothing": "float", "z_loss": "float", "softcap": "float?", "logit_scale": "float", "dft": "bool",
    "compute_dtype": "ScalarType", "lean_memory": "bool", "logits_gemm": "str",
}
# Every field, in order (a constant: torch.compile traces op_kwargs, not dataclasses.fields on the class).
FIELD_NAMES = tuple(field.name for field in dataclasses.fields(LossOptions))
# The fields a log-prob call sets (fused_wce.linear_log_prob): the loss variants and the reduction keep their
# defaults (a log-prob is minus the plain cross-entropy of the tempered logits).
LOG_PROB_FIELDS = ("ignore_index", "chunk_size", "backend", "softcap", "logit_scale", "compute_dtype", "lean_memory",
                   "logits_gemm")
PLAIN = LossOptions()
