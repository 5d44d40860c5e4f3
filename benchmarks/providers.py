"""Loss providers: fused_wce and every alternative, behind one call signature.

Each provider computes the same quantity, the weighted mean ``sum(w_i l_i) / sum(w_i)`` over counted tokens, from
``hidden [N, H]``, ``weight [V, H]``, ``target [N]`` (``IGNORE_INDEX`` where not counted) and ``token_weight [N]``
(float32, 0 where not counted). How it takes the weights is recorded in ``weights_support``:

- ``"in kernel"``: fused_wce takes them as an argument;
- ``"per-token loss"``: the provider returns per-token losses (or log-probabilities) with a per-token backward;
  the weights multiply them, as transformers' ``ForCausalLMLoss`` would with ``reduction="none"``;
- ``"uniform"``: the provider has no per-token weights (Liger, Cut Cross-Entropy): it is fed every counted token
  with weight 1 (its loss is the plain mean over counted tokens), and is checked against a reference with
  uniform weights. The FLOPs are the same, so the timing comparison holds; the tables say so.

Loss variants (``benchmarks.workloads.VARIANTS``: label smoothing, z-loss, softcap, logit scale, DFT) are given as
fused_wce's keywords. ``variant_support(keywords)`` says whether a provider computes that exact loss natively (None)
or why not (the row is then skipped with that reason): fused_wce and torch eager / torch.compile express every
variant; torch's chunked op none (it takes ``label_smoothing`` but then ignores ``options`` and materialises the
logits, so it would not be the chunked algorithm); TRL's fused head softcap and logit scale (its kernel's arguments) and
DFT (TRL's ``loss_type="dft"`` multiplies its per-token log-probabilities by their detached exponential); Liger label
smoothing, z-loss (``lse_square_scale``), softcap and DFT (``use_token_scaling``, in recent releases); Cut
Cross-Entropy softcap.

Per-token log-probabilities (``objective="log_prob"`` providers, for the workloads of that objective): each
returns ``benchmarks.workloads.policy_objective`` of its per-token log-probs and entropies, the ``token_weight``
argument then being the signed advantages: fused_wce's ``linear_log_prob``, TRL 1.16's ``ChunkedLogProbFunction``
as ``GRPOTrainer``'s fused LM head calls it, and the materialised ``log_softmax().gather()`` (plus the entropy).

Peers are imported lazily: a provider whose package is missing, or that does not run on the device, is skipped
with the reason printed and recorded. Only fused_wce's public API is used.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .workloads import IGNORE_INDEX, policy_objective


@dataclass
class Provider:
    """A named way to compute the loss.

    ``make(device, keywords)`` returns a callable ``loss_fn(hidden, weight, target, token_weight) -> 0-d loss`` for
    the loss variant ``keywords`` (fused_wce's keyword arguments, ``{}`` for the plain loss; it may import and compile
    lazily) or raises :class:`Unavailable`. ``variants``: the keywords it expresses natively (``"*"``: all).
    ``exact``: computes every gradient term (no approximate filtering), so it may be the "fastest exact peer".
    ``objective``: the workloads it computes (``benchmarks.workloads.OBJECTIVES``).
    """

    name: str
    description: str
    weights_support: str
    exact: bool
    devices: tuple[str, ...]
    make: Callable[..., Callable]
    is_fused_wce: bool = False
    variants: tuple[str, ...] = ("*",)
    variant_note: str = ""  # why the others are missing, when the provider's API has a subtlety
    objective: str = "loss"

    def variant_support(self, keywords: dict) -> str | None:
        """None when this provider computes the loss variant ``keywords`` exactly, else the reason it cannot."""
        if "*" in self.variants:
            return None
        missing = sorted(key for key in keywords if key not in self.variants)
        if not missing:
            return None
        supported = ", ".join(self.variants) if self.variants else "no loss variant"
        note = f"; {self.variant_note}" if self.variant_note else ""
        return f"cannot express {', '.join(missing)} (supports {supported}{note})"

    def unavailable_reason(self, device: str) -> str | None:
        if device not in self.devices:
            return f"does not run on {device}"
        try:
            self.make(device)
        except Unavailable as error:
            return str(error)
        return None


class Unavailable(RuntimeError):
    """The provider cannot run here (package missing, wrong device, API changed); the message says why."""


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or a package that fails at import on this machine
        raise Unavailable(f"{what} not importable ({type(error).__name__}: {error})") from None


def version_of(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def weighted_mean(per_token: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
    """``sum(w_i l_i) / sum(w_i)`` with a float32 accumulation (``l`` is 0 where not counted)."""
    return (per_token.float() * token_weight).sum() / token_weight.sum()


# --- fused_wce ---------------------------------------------------------------------------------------------------
def _make_fused_wce(backend: str, lean_memory: bool = False, logits_gemm: str = "auto"):
    def make(device: str, keywords: dict | None = None):
        fused_wce = _import("fused_wce", "fused_wce")
        variant = dict(keywords or {})

        def loss_fn(hidden, weight, target, token_weight):
            return fused_wce.linear_cross_entropy(hidden, weight, target, token_weight, backend=backend,
                                                  lean_memory=lean_memory, logits_gemm=logits_gemm, **variant)

        return loss_fn

    return make


# --- torch eager, as transformers' ForCausalLMLoss -------------------------------------------------------------
def eager_loss(hidden, weight, target, token_weight):
    """transformers' ForCausalLMLoss with per-token weights: bf16 logits, fp32 upcast, reduction="none"."""
    logits = F.linear(hidden, weight)
    logits = logits.float()  # ForCausalLMLoss upcasts the logits to fp32 before the loss
    per_token = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    return weighted_mean(per_token, token_weight)


def make_eager_loss(keywords: dict | None = None) -> Callable:
    """The eager loss with a loss variant, written as a user would on materialised fp32 logits.

    ``z = softcap * tanh(logit_scale * logits / softcap)`` (as Gemma-2's and Cohere's modelling code do), then
    ``F.cross_entropy(z, label_smoothing=eps)``, plus ``z_loss * logsumexp(z)**2``, times ``exp(z_t - lse)``
    detached with DFT (as TRL's ``dft_loss``). The plain loss is :func:`eager_loss` itself.
    """
    keywords = dict(keywords or {})
    if not keywords:
        return eager_loss
    smoothing = keywords.get("label_smoothing", 0.0)
    z_loss = keywords.get("z_loss", 0.0)
    dft = keywords.get("dft", False)

    def loss_fn(hidden, weight, target, token_weight):
        logits = eager_transform(F.linear(hidden, weight).float(), keywords)
        per_token = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none",
                                    label_smoothing=smoothing)
        if z_loss or dft:
            lse = torch.logsumexp(logits, dim=-1)
        if z_loss:
            per_token = per_token + z_loss * lse.square()  # ignored tokens have weight 0 in weighted_mean
        if dft:
            safe_target = torch.where(target == IGNORE_INDEX, 0, target)
            target_logit = logits.gather(1, safe_target[:, None]).squeeze(1)
            per_token = per_token * torch.exp(target_logit - lse).detach()
        return weighted_mean(per_token, token_weight)

    return loss_fn


def eager_transform(logits: torch.Tensor, keywords: dict) -> torch.Tensor:
    """``softcap * tanh(logit_scale * logits / softcap)`` on materialised logits, each step only when its keyword
    is given (as Gemma-2's and Cohere's modelling code write it)."""
    scale = keywords.get("logit_scale", 1.0)
    cap = keywords.get("softcap")
    if scale != 1.0:
        logits = logits * scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _make_eager(device: str, keywords: dict | None = None):
    return make_eager_loss(keywords)


def _make_compiled(device: str, keywords: dict | None = None):
    if not hasattr(torch, "compile"):
        raise Unavailable("torch.compile not available")
    if device == "cuda":
        _import("triton", "triton (torch.compile's GPU code generator)")
    # One graph per workload shape; recompiles are expected, so raise dynamo's limit instead of falling back.
    import torch._dynamo as dynamo  # (a plain `import torch._dynamo` would make `torch` local to this function)

    name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    return torch.compile(make_eager_loss(keywords), dynamic=False)


# --- torch 2.13's chunked F.linear_cross_entropy ---------------------------------------------------------------
def _make_torch_chunked(device: str, keywords: dict | None = None):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy / LinearCrossEntropyOptions")
    options = torch.nn.LinearCrossEntropyOptions()

    def loss_fn(hidden, weight, target, token_weight):
        # reduction="none" stays on the chunked path and back-propagates a per-token upstream gradient.
        per_token = F.linear_cross_entropy(hidden, weight, target, reduction="none", ignore_index=IGNORE_INDEX,
                                           options=options)
        return weighted_mean(per_token, token_weight)

    return loss_fn


# --- TRL 1.16's fused LM head ------------------------------------------------------------------------------------
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer requests


def _trl_function():
    """TRL's ``ChunkedLogProbFunction`` and the vocabulary chunk its trainers pass, or :class:`Unavailable`."""
    module = _import("trl.kernels.chunked_logprob", "trl (trl.kernels.chunked_logprob)")
    function = getattr(module, "ChunkedLogProbFunction", None)
    if function is None:
        raise Unavailable("trl.kernels.chunked_logprob has no ChunkedLogProbFunction (TRL < 1.16?)")
    utils = _import("trl.trainer.utils", "trl.trainer.utils")
    return function, getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_VOCAB_CHUNK)


def _make_trl(device: str, keywords: dict | None = None):
    keywords = keywords or {}
    softcap = keywords.get("softcap")  # TRL passes the model's final_logit_softcapping
    logit_scale = keywords.get("logit_scale", 1.0)  # and its logit_scale attribute (applied before the softcap)
    dft = keywords.get("dft", False)  # SFTConfig(loss_type="dft"): -log_probs * exp(log_probs).detach()
    function, chunk = _trl_function()

    def loss_fn(hidden, weight, target, token_weight):
        # As TRL's add_fused_lm_head does on CUDA: only labelled rows go to the kernel.
        mask = target != IGNORE_INDEX
        log_probs = function.apply(hidden[mask], weight, None, target[mask], 1.0, chunk, softcap, logit_scale,
                                   TRL_OUTPUTS)[0]
        per_token = -log_probs * log_probs.detach().exp() if dft else -log_probs
        return (per_token * token_weight[mask]).sum() / token_weight.sum()

    return loss_fn


# --- per-token log-probs and entropies (the "log_prob" objective) ------------------------------------------------
LOG_PROB_VARIANTS = ("softcap", "logit_scale")  # what every log-prob provider takes (a model's own transform)


def _make_fused_wce_log_prob(device: str, keywords: dict | None = None, **fixed):
    fused_wce = _import("fused_wce", "fused_wce")
    variant = {**(keywords or {}), **fixed}

    def objective_fn(hidden, weight, target, advantage):
        log_prob, entropy = fused_wce.linear_log_prob(hidden, weight, target, return_entropy=True, **variant)
        return policy_objective(log_prob, entropy, target, advantage)

    return objective_fn


def _make_trl_log_prob(device: str, keywords: dict | None = None):
    keywords = keywords or {}
    function, chunk = _trl_function()

    def objective_fn(hidden, weight, target, advantage):
        # As GRPOTrainer's fused LM head (add_fused_lm_head with outputs log_probs and entropy) calls it on CUDA:
        # the labelled rows only, scattered back into the sequence.
        mask = target != IGNORE_INDEX
        log_probs, entropy = function.apply(hidden[mask], weight, None, target[mask], 1.0, chunk,
                                            keywords.get("softcap"), keywords.get("logit_scale", 1.0),
                                            ("log_probs", "entropy"))[:2]
        log_probs, entropy = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (log_probs, entropy))
        return policy_objective(log_probs, entropy, target, advantage)

    return objective_fn


def _make_naive_log_prob(device: str, keywords: dict | None = None):
    keywords = dict(keywords or {})

    def objective_fn(hidden, weight, target, advantage):
        # Logits of every row in the input dtype, upcast, then log_softmax().gather() and the entropy.
        log_probs = eager_transform(F.linear(hidden, weight).float(), keywords).log_softmax(-1)
        picked = log_probs.gather(-1, target.clamp_min(0)[:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return policy_objective(picked, entropy, target, advantage)

    return objective_fn


# --- Liger-Kernel --------------------------------------------------------------------------------------------------
def _make_liger(accum_dtype):
    def make(device: str, keywords: dict | None = None):
        if device != "cuda":
            raise Unavailable("Liger-Kernel runs on CUDA only")
        module = _import("liger_kernel.transformers", "liger_kernel")
        loss_class = getattr(module, "LigerFusedLinearCrossEntropyLoss")
        kwargs = {"ignore_index": IGNORE_INDEX, "reduction": "mean"}
        if accum_dtype is not None:
            kwargs["accum_dtype"] = accum_dtype
        keywords = keywords or {}
        # Liger's names: z-loss is lse_square_scale (lse**2 added to each token's loss), DFT is use_token_scaling
        # (each token's loss times its detached p(target)); smoothing and softcap as fused_wce defines them.
        for ours, theirs in LIGER_KEYWORDS.items():
            if ours in keywords:
                kwargs[theirs] = keywords[ours]
        try:
            criterion = loss_class(**kwargs)
        except TypeError as error:
            raise Unavailable(f"this liger_kernel has no {sorted(kwargs)} options ({error})") from None

        def loss_fn(hidden, weight, target, token_weight):
            return criterion(weight, hidden, target)  # (lin_weight, _input, target): Liger's argument order

        return loss_fn

    return make


# --- Cut Cross-Entropy ---------------------------------------------------------------------------------------------
def _make_cce(exact: bool):
    def make(device: str, keywords: dict | None = None):
        if device != "cuda":
            raise Unavailable("Cut Cross-Entropy's cce kernels run on CUDA only")
        module = _import("cut_cross_entropy", "cut_cross_entropy")
        impl_names = _cce_impl_names()
        if not exact:
            kwargs = {"impl": "cce"}
        elif "cce_exact" in impl_names:
            kwargs = {"impl": "cce_exact"}
        else:  # releases before the presets: exact = cce without gradient filtering
            kwargs = {"impl": "cce", "filter_eps": None}
        if (keywords or {}).get("softcap") is not None:
            kwargs["softcap"] = keywords["softcap"]  # softcap * tanh(logits / softcap), as fused_wce

        def loss_fn(hidden, weight, target, token_weight):
            return module.linear_cross_entropy(hidden, weight, target, ignore_index=IGNORE_INDEX, reduction="mean",
                                               **kwargs)

        return loss_fn

    return make


def _cce_impl_names() -> set[str]:
    names = set()
    for where in ("cut_cross_entropy.cce_utils", "cut_cross_entropy.linear_cross_entropy"):
        try:
            impl = getattr(importlib.import_module(where), "LinearCrossEntropyImpl")
            names |= {member.name.lower() for member in impl}
        except Exception:
            pass
        try:
            presets = getattr(importlib.import_module(where), "CCEPresets")
            names |= {name.lower() for name in vars(presets) if not name.startswith("_")}
        except Exception:
            pass
    return names


LIGER_KEYWORDS = {"label_smoothing": "label_smoothing", "z_loss": "lse_square_scale", "softcap": "softcap",
                  "dft": "use_token_scaling"}

PROVIDERS = [
    Provider("fused_wce", "fused_wce.linear_cross_entropy (Triton on CUDA, blocked PyTorch on CPU); on CUDA the "
             "default logits plan (cuBLAS fp32 logits + Triton row kernel)", "in kernel",
             True, ("cuda", "cpu"), _make_fused_wce("auto"), is_fused_wce=True),
    Provider("fused_wce_tiled", "fused_wce.linear_cross_entropy(logits_gemm='triton'): register-tiled Triton "
             "logits stored tile-relative in bf16", "in kernel",
             True, ("cuda",), _make_fused_wce("auto", logits_gemm="triton"), is_fused_wce=True),
    Provider("fused_wce_lean", "fused_wce.linear_cross_entropy(lean_memory=True): vocabulary-slab weight gradient",
             "in kernel", True, ("cuda", "cpu"), _make_fused_wce("auto", lean_memory=True), is_fused_wce=True),
    Provider("fused_wce[torch]", "fused_wce.linear_cross_entropy(backend='torch') on CUDA tensors", "in kernel",
             True, ("cuda",), _make_fused_wce("torch"), is_fused_wce=True),
    Provider("torch_eager", "transformers ForCausalLMLoss: bf16 logits, fp32 upcast, F.cross_entropy", "per-token loss",
             True, ("cuda", "cpu"), _make_eager),
    Provider("torch_compile", "the same under torch.compile(dynamic=False)", "per-token loss",
             True, ("cuda", "cpu"), _make_compiled),
    Provider("torch_chunked", "torch F.linear_cross_entropy(options=LinearCrossEntropyOptions())", "per-token loss",
             True, ("cuda", "cpu"), _make_torch_chunked, variants=(),
             variant_note="its label_smoothing leaves the chunked path for materialised logits, warning "
                          "'options ignored'"),
    Provider("trl_chunked", "TRL 1.16 fused LM head: trl.kernels.chunked_logprob.ChunkedLogProbFunction",
             "per-token loss", True, ("cuda", "cpu"), _make_trl, variants=("softcap", "logit_scale", "dft")),
    Provider("liger", "Liger-Kernel LigerFusedLinearCrossEntropyLoss (default accumulation)", "uniform",
             True, ("cuda",), _make_liger(None), variants=tuple(LIGER_KEYWORDS)),
    Provider("liger_fp32acc", "Liger-Kernel LigerFusedLinearCrossEntropyLoss(accum_dtype=float32)", "uniform",
             True, ("cuda",), _make_liger(torch.float32), variants=tuple(LIGER_KEYWORDS)),
    Provider("cce", "Cut Cross-Entropy impl='cce' (filtered, approximate gradients)", "uniform",
             False, ("cuda",), _make_cce(exact=False), variants=("softcap",)),
    Provider("cce_exact", "Cut Cross-Entropy impl='cce_exact' (no gradient filtering)", "uniform",
             True, ("cuda",), _make_cce(exact=True), variants=("softcap",)),
    Provider("fused_wce_log_prob", "fused_wce.linear_log_prob(return_entropy=True) (Triton on CUDA, blocked "
             "PyTorch on CPU)", "per-token loss", True, ("cuda", "cpu"), _make_fused_wce_log_prob,
             is_fused_wce=True, variants=LOG_PROB_VARIANTS, objective="log_prob"),
    Provider("fused_wce_log_prob_cublas", "fused_wce.linear_log_prob(return_entropy=True, logits_gemm='cublas'): "
             "the statistics pass (the forward) on cuBLAS fp32 logits + the Triton row kernel", "per-token loss",
             True, ("cuda",), functools.partial(_make_fused_wce_log_prob, logits_gemm="cublas"), is_fused_wce=True,
             variants=LOG_PROB_VARIANTS, objective="log_prob"),
    Provider("trl_chunked_log_prob", "TRL 1.16 ChunkedLogProbFunction (log_probs, entropy), as GRPOTrainer's fused "
             "LM head calls it", "per-token loss", True, ("cuda", "cpu"), _make_trl_log_prob,
             variants=LOG_PROB_VARIANTS, objective="log_prob"),
    Provider("torch_log_softmax", "materialised logits: F.linear, fp32 upcast, log_softmax().gather() and the "
             "entropy", "per-token loss", True, ("cuda", "cpu"), _make_naive_log_prob,
             variants=LOG_PROB_VARIANTS, objective="log_prob"),
]
PROVIDERS_BY_NAME = {provider.name: provider for provider in PROVIDERS}
PEER_DISTRIBUTIONS = ("torch", "triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "fused-wce")


def uniform_weights(token_weight: torch.Tensor) -> torch.Tensor:
    """What a provider without per-token weights computes with: 1 on counted tokens, 0 elsewhere."""
    return (token_weight > 0).float()
