"""Named LM-head shapes, workloads (shape x tokens x counted fraction x dtype x head mode) and their inputs.

Inputs are drawn like real final hidden states: after the last RMSNorm every row has a root-mean-square near 1,
so ``hidden ~ N(0, 1)``; the head is scaled so that logits have a standard deviation of ``LOGIT_STD`` (a trained
model's logits spread over a few units; zeros or tiny logits would make every softmax uniform and flatter
kernels that skip small gradients). Counted tokens come in contiguous spans, as assistant turns do in
assistant-only SFT: each block of ``TURN_TOKENS`` tokens starts with a prompt (not counted) and ends with the
answer (counted), so that exactly ``counted_fraction`` of the tokens count.

Two objectives. ``"loss"``: the weighted mean cross-entropy (SFT). ``"log_prob"``: what a policy-gradient step
(GRPO) needs from the LM head, per-token log-probabilities and entropies, differentiated through the objective
``-(1/M) sum_i (a_i log p_i + ENTROPY_COEF * H_i)`` over the M counted tokens, with ``a_i`` a signed advantage
per answer (one ``N(0, 1)`` draw per exchange, as GRPO gives every token of a completion its completion's
advantage); its forward-only mode is the no-grad scoring of old or reference log-probs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

IGNORE_INDEX = -100
LOGIT_STD = 2.0
TURN_TOKENS = 512  # one prompt + answer exchange
# Earlier turns down-weighted: the counted tokens of the first half of each 4-turn conversation get this weight.
EARLY_TURN_WEIGHT = 0.5
MODES = ("forward", "forward_backward")

# Loss variants: name -> the keywords of fused_wce.linear_cross_entropy. The settings are the ones models ship
# with: softcap 30 is Gemma-2's final_logit_softcapping, logit scale 0.0625 Cohere's; "all" turns every one on.
VARIANTS = {
    "plain": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-4},
    "softcap": {"softcap": 30.0},
    "logit_scale": {"logit_scale": 0.0625},
    "dft": {"dft": True},
}
VARIANTS["all"] = {key: value for keywords in VARIANTS.values() for key, value in keywords.items()}
# A variant row is measured forward+backward only: a variant changes the loss's epilogue, which training runs.
VARIANT_MODES = ("forward_backward",)
OBJECTIVES = ("loss", "log_prob")
# The entropy bonus of the log-prob objective (it exercises the entropy's gradient; GRPO trainers expose one).
ENTROPY_COEF = 1e-3


def policy_objective(log_prob: torch.Tensor, entropy: torch.Tensor, target: torch.Tensor,
                     advantage: torch.Tensor) -> torch.Tensor:
    """The log-prob workloads' scalar: ``-(1/M) sum_i (a_i log p_i + ENTROPY_COEF H_i)`` over the M tokens whose
    target is not ``IGNORE_INDEX`` (per-token values elsewhere are masked out, whatever a provider put there), in
    the widest of the inputs' dtypes."""
    counted = target != IGNORE_INDEX
    per_token = advantage * log_prob + ENTROPY_COEF * entropy
    return -torch.where(counted, per_token, 0.0).sum() / counted.sum()


@dataclass(frozen=True)
class Shape:
    """An LM head: ``hidden`` = H (model width), ``vocab`` = V."""

    name: str
    hidden: int
    vocab: int


SHAPES = {
    shape.name: shape
    for shape in (
        Shape("Llama-3.2-1B", 2048, 128256),
        Shape("Llama-3-8B", 4096, 128256),
        Shape("Qwen2.5-7B", 3584, 152064),
        Shape("Gemma-2-2B", 2304, 256000),
        Shape("V262k-4B", 2560, 262144),  # a 262144-vocabulary model (Gemma-3-4B's head: H 2560, V 262144)
        Shape("cpu-32k", 512, 32000),  # CPU-sized head (a small model with a Llama-2-sized vocabulary)
        Shape("smoke", 64, 1000),  # the test suite's smoke run
        Shape("interpreter", 96, 1000),  # the Triton path under the interpreter (checked, not timed)
    )
}


@dataclass(frozen=True)
class Workload:
    """One loss problem: ``tokens`` rows of ``shape``, of which ``counted_fraction`` count.

    ``weights``: ``"graded"`` (counted tokens of early turns have weight ``EARLY_TURN_WEIGHT``, later ones 1.0)
    or ``"binary"`` (every counted token has weight 1.0). ``frozen_head``: the LM head does not require grad (LoRA
    fine-tuning): only the hidden-state gradient is computed. ``headline``: the workload the targets are read from.
    ``variant``: a key of ``VARIANTS``, the loss variant (label smoothing, z-loss, softcap, logit scale, DFT or all
    of them) every provider computes on this workload; providers that cannot express it are skipped for it.
    ``objective``: ``"loss"`` (weighted cross-entropy) or ``"log_prob"`` (:func:`policy_objective`; the token
    weights are then the signed advantages), each measured with its own providers.
    """

    shape: Shape
    tokens: int
    counted_fraction: float
    dtype: str = "bfloat16"
    frozen_head: bool = False
    weights: str = "graded"
    headline: bool = False
    variant: str = "plain"
    objective: str = "loss"

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if not 0.0 < self.counted_fraction <= 1.0:
            raise ValueError(f"counted_fraction must be in (0, 1], got {self.counted_fraction}")
        if self.weights not in ("graded", "binary"):
            raise ValueError(f"weights must be 'graded' or 'binary', got {self.weights!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    @property
    def loss_keywords(self) -> dict:
        """The variant's keywords for fused_wce.linear_cross_entropy (empty for the plain loss)."""
        return dict(VARIANTS[self.variant])

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes measured: forward and forward+backward, or forward+backward only for a loss variant."""
        return MODES if self.variant == "plain" else VARIANT_MODES

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def n_counted(self) -> int:
        """Number of counted tokens (target != ignore_index and weight > 0)."""
        return int(counted_mask(self.tokens, self.counted_fraction).sum())

    def counted_flops(self, mode: str) -> int:
        """FLOPs of the matmuls a kernel must do on counted tokens only.

        forward: one ``N_valid x H x V`` GEMM (2 N H V); forward+backward: logits, dX and dW (6 N H V), or 4 N H V
        with a frozen head (no dW).
        """
        per_gemm = 2 * self.n_counted * self.shape.hidden * self.shape.vocab
        if mode == "forward":
            return per_gemm
        return per_gemm * (2 if self.frozen_head else 3)

    @property
    def name(self) -> str:
        parts = [self.shape.name, f"N{self.tokens}", f"{round(self.counted_fraction * 100)}pct", self.dtype]
        if self.frozen_head:
            parts.append("frozen-head")
        if self.weights != "graded":
            parts.append(self.weights)
        if self.objective != "loss":
            parts.append(self.objective)
        if self.variant != "plain":
            parts.append(self.variant)
        return "/".join(parts)

    def params(self) -> dict:
        """Every parameter, flat, for the result rows."""
        return {
            "workload": self.name,
            "shape": self.shape.name,
            "hidden": self.shape.hidden,
            "vocab": self.shape.vocab,
            "tokens": self.tokens,
            "counted_fraction": self.counted_fraction,
            "n_counted": self.n_counted,
            "dtype": self.dtype,
            "frozen_head": self.frozen_head,
            "weights": self.weights,
            "headline": self.headline,
            "variant": self.variant,
            "objective": self.objective,
        }

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = self.shape.name
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Workload":
        return cls(**{**data, "shape": SHAPES[data["shape"]]})


def counted_mask(tokens: int, counted_fraction: float) -> torch.Tensor:
    """``[tokens]`` bool: in each block of ``TURN_TOKENS`` (the last one may be shorter) the last
    ``round(counted_fraction * block_length)`` tokens count (the answer), the others do not (the prompt)."""
    index = torch.arange(tokens)
    block_start = index // TURN_TOKENS * TURN_TOKENS
    block_length = (tokens - block_start).clamp(max=TURN_TOKENS)
    answer_start = block_length - torch.round(block_length * counted_fraction).long()
    return (index - block_start) >= answer_start


@dataclass
class Inputs:
    """One set of loss inputs on one device.

    hidden ``[N, H]`` and weight ``[V, H]`` in the workload's dtype; target ``[N]`` int64 with ``IGNORE_INDEX``
    where a token does not count; token_weight ``[N]`` float32, 0 where not counted.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    target: torch.Tensor
    token_weight: torch.Tensor
    extra_hidden: list = field(default_factory=list)  # rotated copies (same distribution, other values)

    def hidden_rotation(self, index: int) -> torch.Tensor:
        copies = [self.hidden, *self.extra_hidden]
        return copies[index % len(copies)]


def make_inputs(workload: Workload, device: str | torch.device, seed: int = 0, rotations: int = 1) -> Inputs:
    """Fresh random inputs for ``workload``; ``rotations`` hidden-state copies so caches do not flatter timings.

    Tensors are drawn in place in their final dtype where possible, so that building them leaves no large
    temporaries (the CPU mode reads peak RSS above the inputs).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = workload.torch_dtype
    n, h, v = workload.tokens, workload.shape.hidden, workload.shape.vocab

    def draw_hidden():
        return torch.empty(n, h, dtype=dtype, device=device).normal_(0.0, 1.0, generator=generator)

    weight = torch.empty(v, h, dtype=dtype, device=device).normal_(0.0, LOGIT_STD / math.sqrt(h), generator=generator)
    target = torch.randint(0, v, (n,), generator=generator, device=device)
    counted = counted_mask(n, workload.counted_fraction).to(device)
    target = torch.where(counted, target, IGNORE_INDEX)
    token_weight = counted.float()
    if workload.objective == "log_prob":  # one signed advantage per exchange, on its counted tokens
        turn = torch.arange(n, device=device) // TURN_TOKENS
        advantage = torch.randn(int(turn[-1]) + 1, generator=generator, device=device)
        token_weight = torch.where(counted, advantage[turn], 0.0)
    elif workload.weights == "graded":
        turn = torch.arange(n, device=device) // TURN_TOKENS
        early = (turn % 4) < 2
        token_weight = torch.where(early & counted, EARLY_TURN_WEIGHT, token_weight)
    hidden = draw_hidden()
    extra = [draw_hidden() for _ in range(rotations - 1)]
    return Inputs(hidden=hidden, weight=weight, target=target, token_weight=token_weight, extra_hidden=extra)


def workload(shape: str, tokens: int, counted_fraction: float, **kwargs) -> Workload:
    return Workload(SHAPES[shape], tokens, counted_fraction, **kwargs)


# --- Profiles -------------------------------------------------------------------------------------------------
# GPU. The headline workload (where the targets are read) comes first so a time budget never skips it.
HEADLINE_GPU = workload("Llama-3-8B", 16384, 0.5, headline=True)

GPU_QUICK = [
    HEADLINE_GPU,
    workload("Llama-3-8B", 4096, 0.5),
    workload("Llama-3-8B", 8192, 0.5),
    workload("Llama-3-8B", 16384, 1.0),
    workload("Llama-3-8B", 16384, 0.5, frozen_head=True),
    workload("Gemma-2-2B", 8192, 0.5),
]
# One row per loss variant on Gemma-2-2B (the model that ships a softcap), forward+backward, after the headline rows
# (the plain loss on the same inputs is the Gemma-2-2B row above): the variants are epilogue-only, so each row costs
# about what the plain one does, and the time guard skips them first when a card is slow.
GPU_VARIANTS = [workload("Gemma-2-2B", 8192, 0.5, variant=name) for name in VARIANTS if name != "plain"]
GPU_QUICK += GPU_VARIANTS
# Per-token log-probs and entropies (a GRPO step; half the tokens are completions), after the loss rows.
GPU_LOG_PROB = [workload("Llama-3-8B", 8192, 0.5, objective="log_prob")]
GPU_QUICK += GPU_LOG_PROB

GPU_FULL = [HEADLINE_GPU] + [
    workload(name, tokens, fraction, frozen_head=frozen)
    for name in ("Llama-3.2-1B", "Llama-3-8B", "Qwen2.5-7B", "Gemma-2-2B", "V262k-4B")
    for tokens in (4096, 8192, 16384, 32768)
    for fraction in (1.0, 0.5)
    for frozen in (False, True)
    if not (name == "Llama-3-8B" and tokens == 16384 and fraction == 0.5 and not frozen)
    and not (frozen and tokens != 16384)  # the frozen-head variant at one N per shape
] + GPU_VARIANTS + GPU_LOG_PROB + [
    workload("Llama-3-8B", 16384, 0.5, objective="log_prob"),
    workload("Gemma-2-2B", 8192, 0.5, objective="log_prob", variant="softcap"),
]

# CPU: fp32 (CPU bf16 GEMMs are slow and not what anyone trains with on CPU).
HEADLINE_CPU = workload("cpu-32k", 2048, 1.0, dtype="float32", headline=True)
CPU_DEFAULT = [
    HEADLINE_CPU,
    workload("cpu-32k", 1024, 1.0, dtype="float32"),
    workload("cpu-32k", 2048, 0.5, dtype="float32"),
]
# Every loss variant at the CPU shape, N 1024 (the plain row above is its baseline), forward+backward.
CPU_VARIANTS = [workload("cpu-32k", 1024, 1.0, dtype="float32", variant=name) for name in VARIANTS if name != "plain"]
CPU_DEFAULT += CPU_VARIANTS
# Per-token log-probs and entropies at the CPU shape, half the tokens counted (completions): N 2048 (four answers)
# in the full profile, N 512 (one) in --quick, which keeps its three providers a small part of that run.
CPU_DEFAULT += [workload("cpu-32k", 2048, 0.5, dtype="float32", objective="log_prob")]
# --quick on CPU: the headline, N 1024 (a second N for the plots, and the plain baseline of the variant row), half
# the tokens counted, and every loss variant at once (the full CPU profile has each one on its own), and the
# log-prob row.
CPU_QUICK = CPU_DEFAULT[:3] + [workload("cpu-32k", 1024, 1.0, dtype="float32", variant="all"),
                               workload("cpu-32k", 512, 0.5, dtype="float32", objective="log_prob")]
CPU_SMOKE = [
    workload("smoke", 64, 1.0, dtype="float32", headline=True),
    workload("smoke", 128, 0.5, dtype="float32"),
    # every variant at once (the providers that cannot express it are skipped with the reason), and one that
    # TRL's fused head expresses too
    workload("smoke", 128, 0.5, dtype="float32", variant="all"),
    workload("smoke", 128, 0.5, dtype="float32", variant="softcap"),
    workload("smoke", 128, 0.5, dtype="float32", objective="log_prob"),
]
# The Triton path under the interpreter (checked, not timed).
INTERPRETER_CHECK = workload("interpreter", 64, 0.5, dtype="float32")
