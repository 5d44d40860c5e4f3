"""The LM-head patch: a model whose forward computes a fused quantity from the final hidden states inside the
LM head's own call, never building the logits.

:func:`add_weighted_lm_head` patches ``model.forward``: with ``fused_wce_loss=WeightedLossInputs(target, weight,
normalizer)`` it runs the backbone only and computes ``sum(w_i * CE_i) / normalizer`` with
:func:`fused_wce.linear_cross_entropy` from the final hidden states and ``lm_head.weight``.
:func:`~.log_prob_head.add_log_prob_lm_head` adds per-token log-probabilities and entropies (GRPO) the same way.
Both hand a :class:`HeadCall` to the head's forward (:func:`call_head`), so FSDP1, FSDP2 and ZeRO-3 treat the
computation as the head's: they unshard/gather its parameters before and reduce its gradient after. A
tensor-parallel head (its weight a DTensor sharded by vocabulary rows: ``ColwiseParallel``, transformers'
``tp_plan``) runs the vocabulary-parallel loss on its local rows instead (:mod:`fused_wce.vocab_parallel`).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput
from trl.trainer.utils import maybe_gather_lm_head_ctx

import fused_wce
from fused_wce.vocab_parallel import is_vocab_sharded

try:  # FSDP2 exposes sharded parameters as DTensors
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed
    DTensor = FSDPModule = ()


class Float32Values:
    """The loss and per-token statistics in float32, as the fused loss computed them (detached).

    A plain ``__slots__`` class, for the reason :class:`WeightedLossInputs` is one, on the way out: FSDP2's
    ``MixedPrecisionPolicy(output_dtype=...)`` casts every floating tensor of a module's output (tuples, dicts,
    dataclass fields) and would round the loss and statistics to bf16; it does not enter this object.
    """

    __slots__ = ("loss", "token_loss", "entropy", "aux_loss")

    def __init__(self, loss: torch.Tensor, token_loss: torch.Tensor, entropy: torch.Tensor,
                 aux_loss: torch.Tensor | None = None):
        self.loss, self.token_loss, self.entropy, self.aux_loss = loss, token_loss, entropy, aux_loss


class _ValueOf(torch.autograd.Function):
    """``exact``'s value with ``cast``'s gradient: a loss that an output cast rounded, restored to the float32 value
    computed before the cast, while the backward still runs through the cast (and the hooks FSDP put on it)."""

    @staticmethod
    def forward(ctx, cast: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        ctx.dtype = cast.dtype
        return exact.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


def restore_float32(cast: torch.Tensor | None, exact: torch.Tensor | None) -> torch.Tensor | None:
    """``cast`` with ``exact``'s value (see :class:`_ValueOf`); ``cast`` itself when nothing cast it. For the
    outputs of a fused call that a mixed-precision output cast may have rounded."""
    if cast is None or exact is None or (cast.dtype == exact.dtype and cast.data_ptr() == exact.data_ptr()):
        return cast
    return _ValueOf.apply(cast, exact) if cast.requires_grad else exact


@dataclass
class WeightedLMOutput(ModelOutput):
    """What the patched forward (:func:`add_weighted_lm_head`) returns when given the loss inputs.

    ``loss``: 0-d float32, ``sum(w_i l_i) / normalizer``. Per target position (shaped like the shifted targets,
    ``[B, T-1]``, detached): ``token_loss`` (float32, unweighted CE), ``entropy`` (float32), ``is_top1`` (bool),
    ``counted`` (bool: target != -100 and weight > 0). All zero/False where not counted. ``aux_loss``: the MoE
    load-balancing loss (0-d) when router logits were requested, else None. ``float32``: the same values out of
    reach of mixed-precision output casts (:class:`Float32Values`); :meth:`in_float32` puts them back.
    """

    loss: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    counted: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    float32: Float32Values | None = None

    def in_float32(self) -> "WeightedLMOutput":
        """This output with ``loss``, ``token_loss``, ``entropy`` and ``aux_loss`` as computed, in float32, also
        when a wrapper cast the model's outputs on the way (FSDP2 ``output_dtype``, then accelerate's upcast of
        the rounded values); the gradients still flow through ``loss`` and ``aux_loss`` as returned."""
        exact = self.float32
        if exact is None:
            return self
        return WeightedLMOutput(loss=restore_float32(self.loss, exact.loss), token_loss=exact.token_loss,
                                entropy=exact.entropy, is_top1=self.is_top1, counted=self.counted,
                                aux_loss=restore_float32(self.aux_loss, exact.aux_loss), float32=exact)


def logit_scale_of(text_config) -> float:
    """The constant the model multiplies its logits by (1.0 for most models); see TRL's ``add_fused_lm_head``."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1.0 / scaling
    return 1.0 if scale is None else float(scale)


def check_model_supported(model) -> None:
    """Raise NotImplementedError for models without an output head to fuse the loss with."""
    if model.get_output_embeddings() is None:
        raise NotImplementedError(f"{type(model).__name__} has no output embeddings (LM head) to fuse the loss with")


class WeightedLossInputs:
    """One batch's inputs of the fused loss: ``target``, per-token ``weight`` and ``normalizer``.

    Args:
        target: int64 (or int32) ``[B, T-1]``: the shifted labels (``labels[:, 1:]``), -100 where not a target.
        weight: floating ``[B, T-1]`` (float32 in the trainer), >= 0: each target's weight.
        normalizer: 0-d tensor or float > 0 (the loss is ``sum(w_i l_i) / normalizer``), or None for ``sum(w_i)``.

    Passed as ``model(**inputs, fused_wce_loss=WeightedLossInputs(...))``. A plain class with ``__slots__`` on
    purpose, not a dict, tuple, dataclass or namedtuple: FSDP1's ``MixedPrecision`` (``cast_root_forward_inputs``,
    ``cast_forward_inputs``) and FSDP2's ``MixedPrecisionPolicy(cast_forward_inputs=True)`` cast every floating
    tensor they find in a module's args and kwargs to the parameter dtype, and they walk exactly those containers.
    They do not enter other objects, so the weights and the normalizer reach the loss in float32 (bf16 keeps 8
    significant bits: a normalizer of 1234.5 would become 1232).
    """

    __slots__ = ("target", "weight", "normalizer")

    def __init__(self, target: torch.Tensor, weight: torch.Tensor, normalizer: float | torch.Tensor | None):
        if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must be an integer tensor, got {_describe(target)}")
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating tensor, got {_describe(weight)}")
        if weight.shape != target.shape:
            raise ValueError(f"weight must have target's shape {tuple(target.shape)}, got {tuple(weight.shape)}")
        if normalizer is not None and not isinstance(normalizer, (float, int, torch.Tensor)):
            raise TypeError(f"normalizer must be a float, a 0-d tensor or None, got {_describe(normalizer)}")
        self.target, self.weight, self.normalizer = target, weight, normalizer

    def __repr__(self) -> str:
        return (f"WeightedLossInputs(target={_describe(self.target)}, weight={_describe(self.weight)}, "
                f"normalizer={_describe(self.normalizer)})")


def loss_inputs_on(inputs: WeightedLossInputs, device: torch.device) -> WeightedLossInputs:
    """``inputs`` on ``device``, the device of the LM head's weight: ``target`` (its integer dtype), ``weight`` as
    float32 and a tensor ``normalizer`` (its dtype); a float or None normalizer as is.

    With ``device_map`` the head can sit on another device than the labels, from which the trainer builds the
    targets, weights and normaliser; :func:`fused_wce.linear_cross_entropy` wants every tensor on the head's device
    (a normaliser on another accelerator is rejected).
    """
    normalizer = inputs.normalizer
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device)
    return WeightedLossInputs(inputs.target.to(device), inputs.weight.to(device=device, dtype=torch.float32),
                              normalizer)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{type(value).__name__}(shape={tuple(value.shape)}, dtype={value.dtype})"
    return type(value).__name__


class HeadCall:
    """What a model's patched forward hands to its LM head's forward: what to compute from the hidden states.

    Subclasses hold their inputs and options in ``__slots__`` (plain classes for the reason given in
    :class:`WeightedLossInputs`: mixed-precision input casting does not enter them) and implement :meth:`run`.
    """

    __slots__ = ()
    # Whether ``run`` takes a tensor-parallel head's local vocabulary rows (a DTensor weight sharded ``Shard(0)``).
    VOCAB_PARALLEL = False
    DESCRIPTION = "a fused call"  # in error messages

    def run(self, hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        """The fused computation from ``hidden_states`` (on ``weight``'s device) and the head's unsharded
        ``weight`` and ``bias``: a tuple (every distributed wrapper's output traversal enters tuples, to hook the
        differentiable outputs for the pre-backward unshard), its last element the float32 values out of reach of
        an output cast."""
        raise NotImplementedError


class _HeadLossCall(HeadCall):
    """The weighted cross-entropy of a batch: its inputs and the model's loss options.

    ``chord_phi``: each counted token's loss times stop-gradient ``p (1 - p)`` of its target (CHORD-phi): a
    stats-only pass (no gradient, ``2 N H V`` FLOPs) finds ``p``, then the weighted pass runs with weights
    ``w p (1 - p)`` and the normaliser of the weights ``w``. ``run`` returns ``(loss, is_top1, Float32Values)``;
    ``token_loss`` is the per-token loss with the variant's factor applied (as for ``dft``).
    """

    __slots__ = ("inputs", "logit_scale", "softcap", "label_smoothing", "dft", "lean_memory", "chord_phi")
    VOCAB_PARALLEL = True
    DESCRIPTION = "the fused weighted loss"

    def __init__(self, inputs: WeightedLossInputs, logit_scale: float, softcap: float | None,
                 label_smoothing: float, dft: bool, lean_memory: bool = False, chord_phi: bool = False):
        self.inputs, self.logit_scale, self.softcap = inputs, logit_scale, softcap
        self.label_smoothing, self.dft, self.lean_memory, self.chord_phi = label_smoothing, dft, lean_memory, chord_phi

    def run(self, hidden_states, weight, bias):
        inputs = loss_inputs_on(self.inputs, weight.device)
        options = dict(bias=bias, logit_scale=self.logit_scale, softcap=self.softcap,
                       compute_dtype=compute_dtype_of(weight))
        token_weight, normalizer, stats = inputs.weight, inputs.normalizer, None
        if self.chord_phi:
            with torch.no_grad():
                stats = fused_wce.linear_cross_entropy(hidden_states.detach(), weight.detach(), inputs.target,
                                                       token_weight, reduction="none", return_stats=True, **options)
            probability = torch.exp(-stats.token_loss)
            token_weight = token_weight * probability * (1.0 - probability)
            if normalizer is None:  # the weights' sum over the counted tokens, as without the reweighting
                normalizer = torch.where(inputs.target != -100, inputs.weight, 0.0).sum().clamp_min(
                    torch.finfo(torch.float32).tiny)
        out = fused_wce.linear_cross_entropy(
            hidden_states, weight, inputs.target, token_weight, normalizer=normalizer, return_stats=True,
            label_smoothing=self.label_smoothing, dft=self.dft, lean_memory=self.lean_memory, **options)
        if stats is None:
            return out.loss, out.is_top1, Float32Values(out.loss.detach(), out.token_loss, out.entropy)
        # The stats-only pass counts every token of weight w > 0 (the weighted pass drops those with p (1 - p) = 0).
        token_loss = torch.where(inputs.weight > 0, stats.token_loss * probability * (1.0 - probability), 0.0)
        return out.loss, stats.is_top1, Float32Values(out.loss.detach(), token_loss, stats.entropy)


def _innermost_head(head: torch.nn.Module) -> torch.nn.Module:
    """The module under FSDP1's ``FullyShardedDataParallel`` and activation-checkpoint wrappers (their forward
    calls it with the same args and kwargs)."""
    while True:
        inner = getattr(head, "_fsdp_wrapped_module", None)
        if inner is None:
            inner = getattr(head, "_checkpoint_wrapped_module", None)
        if inner is None:
            return head
        head = inner


def _head_forward(self, input, *args, fused_wce_call: HeadCall | None = None, **kwargs):
    """The LM head's forward once :func:`_install_head_forward` ran (``functools.partial(_head_forward, head)``).

    Without ``fused_wce_call`` the head's class forward runs (``F.linear``: generation, evaluation with logits).
    With it, ``input`` is the hidden states and the call's fused computation runs here, *inside* the head's call,
    so the distributed wrappers treat it as the head's computation: FSDP2's pre/post-forward hooks and FSDP1's
    wrapper forward unshard the head's parameters before and reduce-scatter its gradient after, ZeRO-3 gathers
    them. Returns the call's tuple, which every wrapper's output traversal enters (to hook the outputs for the
    pre-backward unshard).
    """
    if fused_wce_call is None:
        return type(self).forward(self, input, *args, **kwargs)
    if args or kwargs:
        raise TypeError(f"the fused call of the LM head takes only the hidden states, got extra arguments "
                        f"{len(args)} positional, {sorted(kwargs)} keyword")
    if not isinstance(fused_wce_call, HeadCall):
        raise TypeError(f"fused_wce_call must be a HeadCall, got {type(fused_wce_call).__name__}")
    return _run_in_head(self, input, fused_wce_call)


def _install_head_forward(head: torch.nn.Module) -> bool:
    """Give the (innermost) LM head :func:`_head_forward` as an instance-level forward; idempotent.

    Returns False for heads that are not an ``nn.Linear`` running its class's forward (a PEFT adapter wrapper, a
    forward replaced by someone else): the fused call then reads their weight directly. An accelerate hook
    (``device_map``/offload) keeps its wrapper as ``forward`` and calls ``_old_forward``: the dispatch goes there,
    so the hook still moves the inputs and loads offloaded weights. A ``functools.partial`` of a module-level
    function, not a bound method, so the head still pickles and deep-copies (the copy dispatches to itself).
    """
    if not isinstance(head, torch.nn.Linear):
        return False
    slot = "_old_forward" if hasattr(head, "_hf_hook") and hasattr(head, "_old_forward") else "forward"
    current = getattr(head, slot)
    if isinstance(current, functools.partial) and current.func is _head_forward:
        return True
    if getattr(current, "__func__", None) is not type(head).forward:
        return False
    setattr(head, slot, functools.partial(_head_forward, head))
    return True


def _run_in_head(head: torch.nn.Module, hidden_states: torch.Tensor, call: HeadCall) -> tuple:
    """``call.run`` with ``head.weight`` (and bias), unsharded, and ``hidden_states`` on the weight's device.

    Runs in the head's forward (see :func:`_head_forward`) or, for heads that cannot be called that way, directly.
    """
    # ZeRO-3 shards the head to numel 0 outside its own forward: gather it (no-op when the hooks already did).
    with maybe_gather_lm_head_ctx(head.weight, getattr(head, "bias", None)):
        weight, bias = head.weight, getattr(head, "bias", None)
        tensor_parallel = _tensor_parallel_head(head)
        if (isinstance(weight, DTensor) or isinstance(bias, DTensor)) and not (tensor_parallel
                                                                               and call.VOCAB_PARALLEL):
            # full_tensor() would run, but its gradient is not reduce-scattered the way FSDP's post-backward
            # reduces a parameter's: silently wrong head gradients. Inside FSDP's own forward of the head the
            # parameters are plain unsharded tensors; a DTensor here means a layout this call cannot use.
            sharded = weight if isinstance(weight, DTensor) else bias
            if tensor_parallel:
                raise NotImplementedError(
                    f"{call.DESCRIPTION} does not support tensor-parallel LM heads (a vocabulary-sharded "
                    f"DTensor weight, placements {sharded.placements}): it cannot run on their local rows")
            raise RuntimeError(
                f"the LM head's parameters are DTensors (placements {sharded.placements}) where the fused loss "
                f"reads them: the head ({type(head).__name__}) was not unsharded. Shard the head "
                "with FSDP (fully_shard / FullyShardedDataParallel, as its own unit or inside its parent's) and let "
                "the loss run through the head's forward; tensor-parallel heads must be sharded by vocabulary rows "
                "(Shard(0), ColwiseParallel) over a 1-D mesh")
        if getattr(head, "lora_A", None):  # a PEFT LoRA layer on the head itself: its weight is the base weight
            raise NotImplementedError(
                "LoRA adapters on the LM head are not supported by the fused loss, which reads the head's weight "
                "directly (the adapter's update would be ignored): keep lm_head out of `target_modules`")
        # with `device_map` the backbone can end on another device than the head
        return call.run(hidden_states.to(weight.device), weight, bias)


def call_head(model, hidden_states: torch.Tensor, call: HeadCall) -> tuple:
    """``call``'s outputs, computed in a call of the model's LM head (directly for heads without the dispatching
    forward, see :func:`_install_head_forward`)."""
    # The head as it is now: FSDP1 may have wrapped it (the call goes through the wrapper, the dispatching
    # forward sits on the module inside).
    lm_head = model.get_output_embeddings()
    # A tensor-parallel head's forward hooks turn its output into logits: the call reads its local rows directly.
    if not _tensor_parallel_head(lm_head) and _install_head_forward(_innermost_head(lm_head)):
        return lm_head(hidden_states, fused_wce_call=call)
    return _run_in_head(lm_head, hidden_states, call)


def _tensor_parallel_head(head: torch.nn.Module) -> bool:
    """Whether ``head`` is a tensor-parallel LM head: its weight (and bias) sharded by vocabulary rows over a 1-D
    mesh, outside FSDP (whose sharded parameters are DTensors too, until its forward unshards them)."""
    bias = getattr(head, "bias", None)
    return (not isinstance(head, FSDPModule) and is_vocab_sharded(head.weight)
            and (bias is None or is_vocab_sharded(bias)))


def compute_dtype_of(weight: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute in: the active autocast's on the weight's device (e.g. bf16 under
    AMP, like the stock head), otherwise the weight's. The cast happens inside the loss, so fp32 master weights
    receive their fp32 gradient with no extra ``[V, H]`` copy."""
    device_type = weight.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


@dataclass(frozen=True)
class _LossOptions:
    """The model's loss options, fixed when it is patched: its logit transforms and the trainer's loss settings."""

    logit_scale: float
    softcap: float | None
    label_smoothing: float
    dft: bool
    lean_memory: bool
    chord_phi: bool


class PatchedForward:
    """A model's ``forward`` after a fused-head patch: dispatches on its own keywords (:attr:`KEYWORDS`), else
    runs the forward it replaced.

    A module-level class holding the model, the forward it replaced (``None``: the model class's own) and the
    patch's options, not a closure: ``copy.deepcopy`` copies the three with the model, so the copy is a patched
    model of itself (its plain forward, ``generate`` and fused calls run its own modules and weights), and
    ``pickle`` / ``torch.save`` keep the patch (a bound method or closure would pickle as the class's unpatched
    ``forward``). Patches stack: each keeps the one before as ``previous``; :meth:`install` replaces a model's
    patch of the same kind in place (new options, same ``previous``).
    """

    __slots__ = ("model", "previous", "options")
    KEYWORDS: tuple[str, ...] = ()

    def __init__(self, model, previous, options):
        self.model, self.previous, self.options = model, previous, options

    @classmethod
    def install(cls, model, options) -> None:
        """Make ``cls(model, <the current forward>, options)`` the model's forward."""
        previous = model.__dict__.get("forward")  # an instance-level forward (an accelerate hook's...), or none
        if isinstance(previous, cls) and previous.model is model:
            previous = previous.previous
        model.forward = cls(model, previous, options)

    @property
    def __signature__(self):
        """The signature of the forward it replaced (``inspect.signature``: Trainer's column selection,
        ``generate``'s keyword checks), plus the patch's keywords."""
        replaced = inspect.signature(self.previous if self.previous is not None
                                     else type(self.model).forward.__get__(self.model))
        parameters = list(replaced.parameters.values())
        for name in self.KEYWORDS:
            if name not in replaced.parameters:
                extra = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                at = next((k for k, p in enumerate(parameters) if p.kind == inspect.Parameter.VAR_KEYWORD),
                          len(parameters))
                parameters.insert(at, extra)
        return replaced.replace(parameters=parameters)

    def plain(self, *args, **kwargs):
        """The forward this patch replaced."""
        if self.previous is None:
            return type(self.model).forward(self.model, *args, **kwargs)
        return self.previous(*args, **kwargs)


class _WeightedForward(PatchedForward):
    """``model.forward`` once :func:`add_weighted_lm_head` ran: dispatches on the ``fused_wce_loss`` keyword."""

    __slots__ = ()
    KEYWORDS = ("fused_wce_loss",)

    def __call__(self, *args, fused_wce_loss=None, **kwargs):
        model = self.model
        if fused_wce_loss is None:
            return self.plain(*args, **kwargs)
        if not isinstance(fused_wce_loss, WeightedLossInputs):
            raise TypeError(f"fused_wce_loss must be a WeightedLossInputs, got {type(fused_wce_loss).__name__}")
        hidden_states, aux_loss = backbone_hidden_states(model, model.config.get_text_config(), args, kwargs)
        options = self.options
        call = _HeadLossCall(fused_wce_loss, options.logit_scale, options.softcap, options.label_smoothing,
                             options.dft, options.lean_memory, options.chord_phi)
        loss, is_top1, exact = call_head(model, hidden_states, call)
        if aux_loss is not None:
            exact.aux_loss = aux_loss.detach().float()
        target, token_weight = fused_wce_loss.target.to(loss.device), fused_wce_loss.weight.to(loss.device)
        counted = (target != -100) & (token_weight > 0)
        return WeightedLMOutput(loss=restore_float32(loss, exact.loss), token_loss=exact.token_loss,
                                entropy=exact.entropy, is_top1=is_top1, counted=counted, aux_loss=aux_loss,
                                float32=exact)


def add_weighted_lm_head(model, *, label_smoothing: float = 0.0, dft: bool = False,
                         lean_memory: bool = False, chord_phi: bool = False) -> None:
    """Patch ``model.forward``: with ``fused_wce_loss=...`` it runs the backbone and returns the fused weighted loss.

    ``model(**inputs, fused_wce_loss=WeightedLossInputs(target, weight, normalizer))`` (see
    :class:`WeightedLossInputs`) returns a :class:`WeightedLMOutput`. The LM head never runs over all tokens: the
    last hidden states ``[B, T-1, H]`` go to :func:`fused_wce.linear_cross_entropy` with ``lm_head.weight`` (and
    bias), inside a call of the head module (its forward dispatches on a ``fused_wce_call`` keyword), so FSDP1,
    FSDP2 and ZeRO-3 unshard/gather the head's parameters and reduce its gradient as for any forward of the head,
    also when the head is its own FSDP unit. Without ``fused_wce_loss`` the previous forwards run unchanged
    (generation, TRL's fused head). Apply to the unwrapped ``PreTrainedModel``, before or after FSDP wraps it;
    patching again replaces the options. The patched model deep-copies, pickles and ``torch.save``-s as a patched
    model of itself (:class:`_WeightedForward`).
    The model's own logit transforms are reproduced inside the loss: a constant logit scale (Cohere, Granite...)
    and ``final_logit_softcapping`` (Gemma-2); ``label_smoothing`` and ``dft`` (TRL's ``loss_type="dft"``) too.
    ``lean_memory``: see :func:`fused_wce.linear_cross_entropy` (bf16 heads: no fp32 ``[V, H]`` accumulator).
    ``chord_phi``: each counted token's loss times stop-gradient ``p (1 - p)`` (CHORD-phi), normalised by the
    weights' sum as without it; one more stats-only pass (see :class:`_HeadLossCall`). Not with ``dft``.
    """
    if dft and chord_phi:
        raise ValueError("dft and chord_phi are two per-token reweightings of the loss: choose one")
    check_model_supported(model)
    text_config = model.config.get_text_config()
    options = _LossOptions(logit_scale_of(text_config), getattr(text_config, "final_logit_softcapping", None),
                           float(label_smoothing), bool(dft), bool(lean_memory), bool(chord_phi))
    _install_head_forward(_innermost_head(model.get_output_embeddings()))
    _WeightedForward.install(model, options)


def backbone_hidden_states(model, text_config, args, kwargs):
    """(the backbone's last hidden states but the last position ``[B, T-1, H]``, the MoE load-balancing loss or
    None) for the model's forward arguments (labels and the like dropped)."""
    for unused in ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep"):
        kwargs.pop(unused, None)
    kwargs["use_cache"] = False
    backbone = model.base_model  # looked up per call: PEFT and FSDP replace modules after patching
    if backbone is model:
        raise NotImplementedError(f"{type(model).__name__} exposes no backbone (`base_model_prefix`) to run")
    # MoE models: like the model's own forward, return router logits when the config asks for them
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    backbone_outputs = backbone(*args, **kwargs)
    hidden_states = backbone_outputs.last_hidden_state[:, :-1]
    aux_loss = None
    if kwargs.get("output_router_logits"):
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        num_experts = getattr(text_config, "num_experts", None) or text_config.num_local_experts
        # Padding-free rows have no attention mask: every token is real.
        aux_loss = load_balancing_loss_func(backbone_outputs.router_logits, num_experts,
                                            text_config.num_experts_per_tok, kwargs.get("attention_mask"))
    return hidden_states, aux_loss
