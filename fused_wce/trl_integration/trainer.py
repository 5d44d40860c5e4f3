"""``WeightedSFTTrainer``: TRL's ``SFTTrainer`` with per-token weights from chat turns and a fused loss.

Used exactly as :class:`trl.SFTTrainer`, plus ``weighting=TurnWeighting(...)``. What it changes:

* **Dataset preparation.** A conversational dataset (a ``messages`` column) is tokenized with
  :func:`~fused_wce.trl_integration.weighting.tokenize_with_weights`, which adds per-token ``token_weights``,
  ``token_roles``, ``token_turn_positions`` and ``token_turn_index`` columns; ``labels`` are the token ids where the weight is > 0 and
  -100 elsewhere. Truncation (``max_length``), packing and padding-free batching keep those columns aligned with
  ``input_ids`` (TRL itself truncates and packs only ``input_ids``/``labels``). Datasets without ``messages``
  (plain text, prompt-completion, pre-tokenized) fall back to TRL's own preparation with weight 1 on the tokens
  TRL labels, unless a ``weighting`` was passed explicitly, which then is an error.
* **Loss.** The model runs its backbone only; ``fused_wce.linear_cross_entropy`` computes
  ``sum(w_i * CE_i) / normalizer`` from the final hidden states and ``lm_head.weight`` without building the logits.
  The normalizer is the sum of the (shifted) weights over the whole gradient-accumulation batch and over all
  data-parallel ranks, so ``bs=1 x GA=4`` equals ``bs=4`` and 2 ranks equal 1 rank with twice the batch.
* **Logs.** TRL's ``loss``, ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` are kept; ``loss/<role>``,
  ``loss/turn_<position>`` (first/middle/last/only) and ``loss/turn_<k>`` (``turn_1``, ``turn_2``, ...,
  ``turn_5+``: the k-th message of its role) are added: the mean unweighted cross-entropy of the counted target
  tokens of each group over the logging window, so each stage's curve shows in TensorBoard or W&B.
* **Adaptive turn weights.** With ``TurnWeighting(adaptive=AdaptiveTurnWeights(...))`` each counted token's weight
  is multiplied, during training, by its turn's (or role's) multiplier, which follows the running per-group loss
  (:mod:`~fused_wce.trl_integration.adaptive`); the normaliser uses the same factors, and ``weight/<group>``
  logs the multipliers each step used.

With weight 1 on exactly the tokens TRL labels (``weighting=None`` derives that from ``assistant_only_loss``),
the losses equal stock ``SFTTrainer``'s, also for Gemma-2's logit softcapping, logit scales, ``loss_type="dft"``,
``label_smoothing_factor`` and MoE router losses, which the fused loss reproduces.
"""
from __future__ import annotations

import functools
import types
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers.utils import ModelOutput
from trl import SFTTrainer
from trl.data_utils import get_dataset_column_names, maybe_convert_to_chatml, pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import global_then_local_main_first, maybe_gather_lm_head_ctx

import fused_wce

from .adaptive import DEFAULT_MAX_TURN_INDEX, turn_index_names
from .collator import (PER_TOKEN_COLUMNS, TOKEN_ROLES, TOKEN_TURN_INDEX, TOKEN_TURN_POSITIONS, TOKEN_WEIGHTS,
                       WeightedDataCollator)
from .weighting import ROLE_CODES, TURN_POSITIONS, TurnWeighting, tokenize_with_weights

try:  # FSDP2 exposes sharded parameters as DTensors
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed
    DTensor = ()

logger = get_logger(__name__)

# Per-group loss logging: index 0 of each block is "no role / no turn" (code -1), then the codes 0, 1, ...
_ROLE_NAMES = ("scaffolding",) + tuple(sorted(ROLE_CODES, key=ROLE_CODES.get))
_TURN_NAMES = tuple(f"turn_{position}" for position in TURN_POSITIONS)
# Turn index k (1-based, the k-th message of its role); the last bucket holds turn DEFAULT_MAX_TURN_INDEX and later.
_TURN_INDEX_NAMES = turn_index_names(DEFAULT_MAX_TURN_INDEX)


@dataclass
class WeightedLMOutput(ModelOutput):
    """What the patched forward (:func:`add_weighted_lm_head`) returns when given the loss inputs.

    ``loss``: 0-d float32, ``sum(w_i l_i) / normalizer``. Per target position (shaped like the shifted targets,
    ``[B, T-1]``, detached): ``token_loss`` (float32, unweighted CE), ``entropy`` (float32), ``is_top1`` (bool),
    ``counted`` (bool: target != -100 and weight > 0). All zero/False where not counted. ``aux_loss``: the MoE
    load-balancing loss (0-d) when router logits were requested, else None.
    """

    loss: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    counted: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _logit_scale(text_config) -> float:
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


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{type(value).__name__}(shape={tuple(value.shape)}, dtype={value.dtype})"
    return type(value).__name__


class _HeadLossCall:
    """What the model's forward hands to the LM head's forward: the batch's inputs and the model's loss options.

    A plain ``__slots__`` class for the reason given in :class:`WeightedLossInputs` (no mixed-precision cast).
    """

    __slots__ = ("inputs", "logit_scale", "softcap", "label_smoothing", "dft", "lean_memory")

    def __init__(self, inputs: WeightedLossInputs, logit_scale: float, softcap: float | None,
                 label_smoothing: float, dft: bool, lean_memory: bool = False):
        self.inputs, self.logit_scale, self.softcap = inputs, logit_scale, softcap
        self.label_smoothing, self.dft, self.lean_memory = label_smoothing, dft, lean_memory


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


def _head_forward(self, input, *args, fused_wce_loss: _HeadLossCall | None = None, **kwargs):
    """The LM head's forward once :func:`_install_head_forward` ran (``functools.partial(_head_forward, head)``).

    Without ``fused_wce_loss`` the head's class forward runs (``F.linear``: generation, evaluation with logits).
    With it, ``input`` is the hidden states ``[B, T-1, H]`` and the fused loss runs here, *inside* the head's call,
    so the distributed wrappers treat it as the head's computation: FSDP2's pre/post-forward hooks and FSDP1's
    wrapper forward unshard the head's parameters before and reduce-scatter its gradient after, ZeRO-3 gathers
    them. Returns ``(loss, token_loss, entropy, is_top1)``: a tuple, which every wrapper's output traversal
    enters (to hook the loss for the pre-backward unshard).
    """
    if fused_wce_loss is None:
        return type(self).forward(self, input, *args, **kwargs)
    if args or kwargs:
        raise TypeError(f"the fused loss call of the LM head takes only the hidden states, got extra arguments "
                        f"{len(args)} positional, {sorted(kwargs)} keyword")
    if not isinstance(fused_wce_loss, _HeadLossCall):
        raise TypeError(f"fused_wce_loss must be a _HeadLossCall, got {type(fused_wce_loss).__name__}")
    out = _fused_head_loss(self, input, fused_wce_loss)
    return out.loss, out.token_loss, out.entropy, out.is_top1


def _install_head_forward(head: torch.nn.Module) -> bool:
    """Give the (innermost) LM head :func:`_head_forward` as an instance-level forward; idempotent.

    Returns False for heads that are not an ``nn.Linear`` running its class's forward (a PEFT adapter wrapper, a
    forward replaced by someone else): the loss then reads their weight directly. An accelerate hook
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


def _fused_head_loss(head: torch.nn.Module, hidden_states: torch.Tensor, call: _HeadLossCall):
    """``fused_wce.linear_cross_entropy`` of ``hidden_states`` with ``head.weight`` (and bias) -> ``LossOutput``.

    Runs in the head's forward (see :func:`_head_forward`) or, for heads that cannot be called that way, directly.
    """
    # ZeRO-3 shards the head to numel 0 outside its own forward: gather it (no-op when the hooks already did).
    with maybe_gather_lm_head_ctx(head.weight, getattr(head, "bias", None)):
        weight, bias = head.weight, getattr(head, "bias", None)
        if isinstance(weight, DTensor) or isinstance(bias, DTensor):
            # full_tensor() would run, but its gradient is not reduce-scattered the way FSDP's post-backward
            # reduces a parameter's: silently wrong head gradients. Inside FSDP's own forward of the head the
            # parameters are plain unsharded tensors; a DTensor here means a layout this loss cannot use.
            sharded = weight if isinstance(weight, DTensor) else bias
            raise RuntimeError(
                f"the LM head's parameters are DTensors (placements {sharded.placements}) where the fused loss "
                f"reads them: the head ({type(head).__name__}) was not unsharded. Shard the head "
                "with FSDP (fully_shard / FullyShardedDataParallel, as its own unit or inside its parent's) and let "
                "the loss run through the head's forward; tensor-parallel (vocab-sharded) heads are not supported")
        if getattr(head, "lora_A", None):  # a PEFT LoRA layer on the head itself: its weight is the base weight
            raise NotImplementedError(
                "LoRA adapters on the LM head are not supported by the fused loss, which reads the head's weight "
                "directly (the adapter's update would be ignored): keep lm_head out of `target_modules`")
        device = weight.device  # with `device_map` the backbone can end on another device than the head
        inputs = call.inputs
        hidden_states = hidden_states.to(device)
        target = inputs.target.to(device)
        token_weight = inputs.weight.to(device=device, dtype=torch.float32)

        # The head computes in the dtype nn.Linear would under the active autocast (e.g. bf16 under AMP, like
        # the stock head), otherwise in the weight's dtype. The cast happens inside the loss, so fp32 master
        # weights receive their fp32 gradient with no extra [V, H] copy.
        compute_dtype = weight.dtype
        if torch.is_autocast_enabled(device.type):
            compute_dtype = torch.get_autocast_dtype(device.type)
        return fused_wce.linear_cross_entropy(
            hidden_states, weight, target, token_weight, bias=bias,
            normalizer=inputs.normalizer, return_stats=True, logit_scale=call.logit_scale, softcap=call.softcap,
            label_smoothing=call.label_smoothing, dft=call.dft, compute_dtype=compute_dtype,
            lean_memory=call.lean_memory,
        )


def add_weighted_lm_head(model, *, label_smoothing: float = 0.0, dft: bool = False,
                         lean_memory: bool = False) -> None:
    """Patch ``model.forward``: with ``fused_wce_loss=...`` it runs the backbone and returns the fused weighted loss.

    ``model(**inputs, fused_wce_loss=WeightedLossInputs(target, weight, normalizer))`` (see
    :class:`WeightedLossInputs`) returns a :class:`WeightedLMOutput`. The LM head never runs over all tokens: the
    last hidden states ``[B, T-1, H]`` go to :func:`fused_wce.linear_cross_entropy` with ``lm_head.weight`` (and
    bias), inside a call of the head module (its forward dispatches on a ``fused_wce_loss`` keyword), so FSDP1,
    FSDP2 and ZeRO-3 unshard/gather the head's parameters and reduce its gradient as for any forward of the head,
    also when the head is its own FSDP unit. Without ``fused_wce_loss`` the previous forwards run unchanged
    (generation, TRL's fused head). Apply to the unwrapped ``PreTrainedModel``, before or after FSDP wraps it.
    The model's own logit transforms are reproduced inside the loss: a constant logit scale (Cohere, Granite...)
    and ``final_logit_softcapping`` (Gemma-2); ``label_smoothing`` and ``dft`` (TRL's ``loss_type="dft"``) too.
    ``lean_memory``: see :func:`fused_wce.linear_cross_entropy` (bf16 heads: no fp32 ``[V, H]`` accumulator).
    """
    check_model_supported(model)
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    logit_scale = _logit_scale(text_config)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    _install_head_forward(_innermost_head(model.get_output_embeddings()))

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_wce_loss=None, **kwargs):
        if fused_wce_loss is None:
            return previous_forward(*args, **kwargs)
        if not isinstance(fused_wce_loss, WeightedLossInputs):
            raise TypeError(f"fused_wce_loss must be a WeightedLossInputs, got {type(fused_wce_loss).__name__}")
        for unused in ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep"):
            kwargs.pop(unused, None)
        kwargs["use_cache"] = False
        backbone = self.base_model  # looked up per call: PEFT and FSDP replace modules after patching
        if backbone is self:
            raise NotImplementedError(f"{type(self).__name__} exposes no backbone (`base_model_prefix`) to run")
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

        # The head as it is now: FSDP1 may have wrapped it (the call goes through the wrapper, the dispatching
        # forward sits on the module inside).
        lm_head = self.get_output_embeddings()
        call = _HeadLossCall(fused_wce_loss, logit_scale, softcap, label_smoothing, dft, lean_memory)
        if _install_head_forward(_innermost_head(lm_head)):
            loss, token_loss, entropy, is_top1 = lm_head(hidden_states, fused_wce_loss=call)
        else:
            out = _fused_head_loss(lm_head, hidden_states, call)
            loss, token_loss, entropy, is_top1 = out.loss, out.token_loss, out.entropy, out.is_top1
        target, token_weight = fused_wce_loss.target.to(loss.device), fused_wce_loss.weight.to(loss.device)
        counted = (target != -100) & (token_weight > 0)
        return WeightedLMOutput(loss=loss, token_loss=token_loss, entropy=entropy, is_top1=is_top1,
                                counted=counted, aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)


def _default_weighting(args) -> TurnWeighting:
    """Weight 1 on the tokens stock TRL trains: the assistant turns, or the full sequence (per-message ``weight``
    keys ignored, as TRL ignores them)."""
    if args.assistant_only_loss:
        return TurnWeighting(role_weights={"assistant": 1.0}, message_weight_key=None)
    return TurnWeighting(full_sequence=True, message_weight_key=None)


class WeightedSFTTrainer(SFTTrainer):
    """:class:`trl.SFTTrainer` whose loss is a per-token weighted cross-entropy computed by ``fused_wce``.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, ...: as for ``SFTTrainer``.
        weighting: :class:`~fused_wce.trl_integration.weighting.TurnWeighting` that turns each conversation's
            messages into per-token weights. ``None`` gives stock TRL's selection: the assistant turns when
            ``args.assistant_only_loss`` else the whole sequence, each token with weight 1.
        lean_memory: compute the head's weight gradient in vocabulary slabs, written in the weight's dtype (see
            :func:`fused_wce.linear_cross_entropy`): for bf16 models, ~2 GiB less at Llama-3-8B's head, for a
            third more head FLOPs. No effect on fp32 (master) weights.

    The data collator defaults to :class:`WeightedDataCollator` (also in padding-free mode, where TRL rejects
    custom collators). A custom collator is used as is; batches without ``token_weights`` get weight 1 where
    ``labels != -100``.

    MoE models keep their router load-balancing loss (``router_aux_loss_coef``), added as TRL adds it. Gemma-2's
    ``final_logit_softcapping``, logit scales, ``loss_type="dft"`` and ``label_smoothing_factor`` are computed inside
    the fused loss, as stock TRL computes them. Not supported (clear errors at init): ``compute_loss_func`` (this
    trainer is the loss), context/sequence parallelism.
    """

    _tag_names = ["trl", "sft", "fused-wce"]

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, *posargs, weighting: TurnWeighting | None = None,
                 lean_memory: bool = False, **kwargs):
        if weighting is not None and not isinstance(weighting, TurnWeighting):
            raise TypeError(f"weighting must be a TurnWeighting or None, got {type(weighting).__name__}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("WeightedSFTTrainer computes its own loss; `compute_loss_func` cannot be combined with it")
        if not isinstance(model, str):
            check_model_supported(model)
        # Set before super().__init__(), which prepares the datasets through our _prepare_dataset.
        self._weighting_given = weighting is not None
        self.weighting = weighting
        self._group_losses = {"train": defaultdict(lambda: [0.0, 0]), "eval": defaultdict(lambda: [0.0, 0])}

        # TRL rejects any custom collator in padding-free mode; ours is installed after its __init__ instead.
        deferred_collator = None
        padding_free = args is not None and (
            getattr(args, "padding_free", False)
            or (getattr(args, "packing", False) and getattr(args, "packing_strategy", None) in {"bfd", "bfd_split"}))
        if padding_free and data_collator is not None:
            if not isinstance(data_collator, WeightedDataCollator):
                raise ValueError("Padding-free training needs a WeightedDataCollator (or none, for the default)")
            deferred_collator, data_collator = data_collator, None

        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, *posargs, **kwargs)
        if self.weighting is None:
            self.weighting = _default_weighting(self.args)

        if deferred_collator is not None:
            self.data_collator = deferred_collator
        elif type(self.data_collator) is DataCollatorForLanguageModeling:  # TRL's default: carry our columns too
            stock = self.data_collator
            self.data_collator = WeightedDataCollator(
                pad_token_id=stock.pad_token_id, padding_free=stock.padding_free,
                return_position_ids=stock.return_position_ids, pad_to_multiple_of=stock.pad_to_multiple_of,
                return_tensors=stock.return_tensors)

        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and (getattr(parallelism, "cp_enabled", False)
                                        or getattr(parallelism, "sp_enabled", False)):
            raise NotImplementedError("context/sequence parallelism is not supported by WeightedSFTTrainer")

        # Label smoothing is computed in the fused loss: stop Trainer from building its full-logits LabelSmoother.
        label_smoothing, self.label_smoother = self.args.label_smoothing_factor, None
        add_weighted_lm_head(self.model.get_base_model() if is_peft_model(self.model) else self.model,
                             label_smoothing=label_smoothing, dft=self.args.loss_type == "dft",
                             lean_memory=lean_memory)
        # compute_loss normalises by the whole accumulated (and cross-rank) batch: Trainer must not divide by GA.
        self.loss_is_scaled_for_ga = True

    # ------------------------------------------------------------------------------------------ dataset preparation
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for name in PER_TOKEN_COLUMNS:
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = get_dataset_column_names(dataset)
        pretokenized = "input_ids" in columns and TOKEN_WEIGHTS in columns
        conversational = "input_ids" not in columns and formatting_func is None and (
            "messages" in columns or "conversations" in columns)
        if self._is_vision_dataset or not (pretokenized or conversational):
            if self._weighting_given:
                raise ValueError(
                    f"WeightedSFTTrainer's `weighting` needs a conversational {dataset_name} dataset with a `messages` "
                    f"column (a list of {{'role', 'content'}} dicts) or pre-tokenized `input_ids` + `{TOKEN_WEIGHTS}` "
                    f"columns; got columns {columns}. Pass weighting=None to train on TRL's labels with weight 1."
                )
            logger.info(f"The {dataset_name} dataset has no `messages` column: training on TRL's labels, weight 1.")
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if isinstance(dataset, Dataset) and dataset.format["type"] == "custom":
            raise ValueError("WeightedSFTTrainer cannot prepare a dataset that uses `Dataset.with_transform()`; "
                             "materialise the transform with `Dataset.map()` first")

        weighting = self.weighting if self.weighting is not None else _default_weighting(args)
        map_kwargs: dict[str, Any] = {}
        if isinstance(dataset, Dataset):
            map_kwargs["num_proc"] = args.dataset_num_proc

        def described(text):  # `IterableDataset.map/filter` take no `desc`
            return {**map_kwargs, "desc": f"{text} {dataset_name} dataset"} if isinstance(dataset, Dataset) else map_kwargs

        with global_then_local_main_first():
            if conversational:
                if "messages" not in columns:
                    dataset = dataset.map(maybe_convert_to_chatml, remove_columns="conversations",
                                          **described("Converting to ChatML"))
                # With assistant_only_loss, SFTTrainer.__init__ swapped in TRL's training template (with
                # {% generation %} blocks) as self.chat_template: tokenize with it, as stock TRL does.
                dataset = dataset.map(
                    _tokenize_example,
                    fn_kwargs={"tokenizer": self._tokenizer, "weighting": weighting,
                               "chat_template": getattr(self, "chat_template", None)},
                    **described("Tokenizing (with turn weights)"))
            columns = get_dataset_column_names(dataset)
            if "labels" not in columns:
                dataset = dataset.map(_labels_from_weights, **described("Building labels for"))

            per_token = ["input_ids", "labels"] + [name for name in PER_TOKEN_COLUMNS
                                                   if name in get_dataset_column_names(dataset)]
            if args.max_length is not None and not packing:
                if args.truncation_mode == "keep_start":
                    window = slice(None, args.max_length)
                elif args.truncation_mode == "keep_end":
                    window = slice(-args.max_length, None)
                else:
                    raise ValueError(f"Unsupported truncation_mode {args.truncation_mode!r}: "
                                     "expected 'keep_start' or 'keep_end'")
                dataset = dataset.map(_truncate, fn_kwargs={"columns": per_token, "window": window},
                                      **described("Truncating"))

            # A sequence whose targets all have weight 0 (or label -100) teaches nothing: drop it, loudly.
            size_before = len(dataset) if isinstance(dataset, Dataset) else None
            dataset = dataset.filter(_has_weighted_target, **described("Dropping unweighted examples from"))
            if size_before is not None and len(dataset) < size_before:
                warnings.warn(
                    f"WeightedSFTTrainer dropped {size_before - len(dataset)} of {size_before} {dataset_name} examples "
                    "with no weighted target token (every weight 0 after weighting/truncation)", stacklevel=3)
                if len(dataset) == 0:
                    raise ValueError(f"No {dataset_name} example has a token with weight > 0: nothing to train on. "
                                     "Check the weighting (role_weights, last_n) and max_length.")

            if packing:
                if args.max_length is None:
                    raise ValueError("When packing is enabled, `max_length` can't be `None`.")
                dataset = dataset.select_columns(per_token)
                if args.shuffle_dataset:
                    dataset = dataset.shuffle(seed=args.seed)
                dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, described("Packing"))
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    # --------------------------------------------------------------------------------------------- normalisation
    @staticmethod
    def _shifted_weights(batch: dict[str, Any]) -> torch.Tensor:
        """Float32 ``[B, T-1]``: the weight of each prediction target (0 where the label is -100)."""
        labels = batch["labels"][..., 1:]
        weights = batch.get(TOKEN_WEIGHTS)
        labelled = labels != -100
        if weights is None:
            return labelled.to(torch.float32)
        return weights[..., 1:].to(torch.float32) * labelled

    def _adaptive_state(self):
        """The running :class:`~fused_wce.trl_integration.adaptive.AdaptiveWeightState` (None without adaptive)."""
        if not hasattr(self, "_adaptive"):
            config = getattr(self.weighting, "adaptive", None)
            self._adaptive = config.new_state() if config is not None else None
            self._adaptive_pending = None  # [loss sums, token counts] of the optimizer step in progress
        return self._adaptive

    def _effective_weights(self, batch: dict[str, Any], training: bool) -> torch.Tensor:
        """:meth:`_shifted_weights` times each token's adaptive multiplier (training with adaptive weights only).

        The loss and its normaliser both come from here, so the training loss stays ``sum(w m l) / sum(w m)``.
        """
        weight = self._shifted_weights(batch)
        adaptive = self._adaptive_state() if training else None
        if adaptive is None:
            return weight
        shape = batch["labels"].shape
        roles, turns = batch.get(TOKEN_ROLES), batch.get(TOKEN_TURN_INDEX)
        roles = torch.full(shape, -1) if roles is None else roles
        turns = torch.full(shape, -1) if turns is None else turns
        codes = adaptive.group_codes(roles[..., 1:], turns[..., 1:]).to(weight.device)
        return weight * adaptive.factor_table(weight.device)[codes]

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """The sum of target weights over the accumulated micro-batches, summed over data-parallel ranks.

        Called once per optimizer step before its micro-batches run: the adaptive multipliers move here (from the
        previous step's per-group losses), so every micro-batch of the step and the normaliser use the same ones.
        """
        if not batch_samples or "labels" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        training = self.model.training
        adaptive = self._adaptive_state() if training else None
        if adaptive is not None and self._adaptive_pending is not None:
            adaptive.update(*self._adaptive_pending)
            self._adaptive_pending = None
        total = sum(self._effective_weights(batch, training).sum(dtype=torch.float32) for batch in batch_samples)
        total = torch.as_tensor(total, dtype=torch.float32).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        # Tensor/context/sequence-parallel ranks see the same tokens; count them once (as transformers does).
        return total / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())

    # ------------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if "shift_labels" in inputs:
            raise NotImplementedError("pre-shifted labels (context/sequence parallelism) are not supported")
        inputs = dict(inputs)
        token_weights = inputs.pop(TOKEN_WEIGHTS, None)
        roles = inputs.pop(TOKEN_ROLES, None)
        turn_positions = inputs.pop(TOKEN_TURN_POSITIONS, None)
        turn_index = inputs.pop(TOKEN_TURN_INDEX, None)
        if "labels" not in inputs:
            raise ValueError("WeightedSFTTrainer needs `labels` in every batch (-100 where a token is not a target); "
                             f"the collator returned {sorted(inputs)}")
        labels = inputs.pop("labels")
        target = labels[:, 1:]
        weight = self._effective_weights({"labels": labels, TOKEN_WEIGHTS: token_weights, TOKEN_ROLES: roles,
                                          TOKEN_TURN_INDEX: turn_index}, training=mode == "train")

        if num_items_in_batch is None:  # evaluation, or a caller outside the training loop: this batch alone
            normalizer, ranks = weight.sum(), 1
        else:
            normalizer = torch.as_tensor(num_items_in_batch, dtype=torch.float32)
            # DDP averages gradients over ranks while the normalizer already sums every rank's weights.
            ranks = self.accelerator.num_processes // self.get_tp_size() if self.args.average_tokens_across_devices \
                else 1
        # A batch without any weighted token has loss 0 (numerator 0); keep the division finite.
        normalizer = normalizer.to(device=weight.device, dtype=torch.float32).clamp_min(torch.finfo(torch.float32).tiny)

        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        outputs = model(**inputs, fused_wce_loss=WeightedLossInputs(target, weight, normalizer))
        loss = outputs.loss * ranks if ranks != 1 else outputs.loss
        if self.aux_loss_enabled and outputs.aux_loss is not None:
            # A per-micro-batch mean that DDP averages over ranks; with the accumulated normaliser the Trainer
            # leaves gradient accumulation to the loss, so average it over the accumulation steps (as TRL does).
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather(outputs.aux_loss.detach().reshape(1)).mean().item())

        self._record_metrics(mode, inputs, outputs, roles, turn_positions, turn_index)

        if return_outputs:
            warnings.warn("`return_outputs=True` recomputes the full logits with an extra forward pass",
                          FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(**inputs)
        return (loss, outputs) if return_outputs else loss

    def _record_metrics(self, mode, inputs, outputs, roles, turn_positions, turn_index=None) -> None:
        """TRL's entropy / mean_token_accuracy / num_tokens, and the per-role and per-turn loss sums.

        One gather of a small vector per micro-batch (TRL does three): ``[num_counted, entropy_sum, num_correct,
        role loss sums, role counts, turn-position loss sums, counts, turn-index loss sums, counts]``, summed over
        ranks. In training with adaptive weights, the per-group sums also feed the next multiplier update.
        """
        counted = outputs.counted
        token_loss = outputs.token_loss.detach().float()
        device = token_loss.device
        adaptive = self._adaptive_state() if mode == "train" else None
        # Turn-index buckets 1..cap (the last one holds later turns too); cap covers the logged and adaptive ones.
        cap = max(len(_TURN_INDEX_NAMES), len(adaptive.names) if adaptive is not None else 0)
        n_roles, n_turns, n_indices = len(_ROLE_NAMES), len(_TURN_NAMES) + 1, cap + 1
        shape = counted.shape
        roles = (torch.full(shape, -1, device=device) if roles is None else roles[:, 1:].to(device)) + 1
        turns = (torch.full(shape, -1, device=device) if turn_positions is None
                 else turn_positions[:, 1:].to(device)) + 1
        indices = torch.full(shape, -1, device=device) if turn_index is None else turn_index[:, 1:].to(device)
        # Codes outside the known range (a dataset built with another code table) count as "none".
        roles = roles.masked_fill((roles < 0) | (roles >= n_roles), 0)[counted]
        turns = turns.masked_fill((turns < 0) | (turns >= n_turns), 0)[counted]
        # 0-based turn index k goes to bucket min(k, cap - 1) + 1; -1 (none) to bucket 0.
        indices = torch.where(indices >= 0, indices.clamp_max(n_indices - 2) + 1, torch.zeros_like(indices))[counted]
        losses = token_loss[counted]
        stats = torch.cat([
            torch.stack([counted.sum().float(), outputs.entropy.detach().float().sum(),
                         outputs.is_top1.sum().float()]),
            torch.bincount(roles, weights=losses, minlength=n_roles).float(),
            torch.bincount(roles, minlength=n_roles).float(),
            torch.bincount(turns, weights=losses, minlength=n_turns).float(),
            torch.bincount(turns, minlength=n_turns).float(),
            torch.bincount(indices, weights=losses, minlength=n_indices).float(),
            torch.bincount(indices, minlength=n_indices).float(),
        ])
        stats = self.accelerator.gather(stats).reshape(-1, stats.numel()).sum(0).tolist()
        num_counted, entropy_sum, num_correct = stats[:3]
        role_sums, role_counts = stats[3:3 + n_roles], stats[3 + n_roles:3 + 2 * n_roles]
        turn_block = stats[3 + 2 * n_roles:3 + 2 * n_roles + 2 * n_turns]
        turn_sums, turn_counts = turn_block[:n_turns], turn_block[n_turns:]
        index_block = stats[3 + 2 * n_roles + 2 * n_turns:]
        index_sums, index_counts = index_block[:n_indices], index_block[n_indices:]

        def folded(values, k):  # buckets 1..k, the k-th holding every later turn too
            return values[1:k] + [sum(values[k:])]

        if adaptive is not None:  # same gathered values on every rank: the multipliers stay identical
            if adaptive.config.groups == "role":
                group_sums, group_counts = role_sums[1:], role_counts[1:]
            else:
                k = len(adaptive.names)
                group_sums, group_counts = folded(index_sums, k), folded(index_counts, k)
            if self._adaptive_pending is None:
                self._adaptive_pending = [list(group_sums), list(group_counts)]
            else:
                for g, (total, count) in enumerate(zip(group_sums, group_counts)):
                    self._adaptive_pending[0][g] += total
                    self._adaptive_pending[1][g] += count

        metrics = self._metrics[mode]
        metrics["entropy"].append(entropy_sum / num_counted if num_counted > 0 else 0.0)
        metrics["mean_token_accuracy"].append(num_correct / num_counted if num_counted > 0 else 0.0)
        groups = self._group_losses[mode]
        for name, total, count in zip(_ROLE_NAMES, role_sums, role_counts):
            if count > 0:
                groups[name][0] += total
                groups[name][1] += count
        for names, sums, counts in ((_TURN_NAMES, turn_sums, turn_counts),
                                    (_TURN_INDEX_NAMES, [0.0] + folded(index_sums, len(_TURN_INDEX_NAMES)),
                                     [0.0] + folded(index_counts, len(_TURN_INDEX_NAMES)))):
            for name, total, count in zip(names, sums[1:], counts[1:]):
                if count > 0:
                    groups[name][0] += total
                    groups[name][1] += count

        if mode == "train":  # tokens seen, counted like TRL (padding excluded)
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        groups = self._group_losses[mode]
        for name in _ROLE_NAMES + _TURN_NAMES + _TURN_INDEX_NAMES:  # a fixed order, so printed logs line up
            if name in groups and groups[name][1] > 0:
                logs[f"{prefix}loss/{name}"] = groups[name][0] / groups[name][1]
        groups.clear()
        adaptive = self._adaptive_state() if mode == "train" else None
        if adaptive is not None and "loss" in logs:  # the multipliers the last optimizer step used
            for name, multiplier in zip(adaptive.names, adaptive.multipliers):
                logs[f"weight/{name}"] = multiplier
        super().log(logs, start_time)


# ------------------------------------------------------------------------------ dataset.map functions (picklable)
def _tokenize_example(example, tokenizer, weighting, chat_template=None):
    tools = example.get("tools")
    if isinstance(tools, str):
        import json

        tools = json.loads(tools)
    encoded = tokenize_with_weights(tokenizer, example["messages"], weighting, tools=tools,
                                    chat_template=chat_template,
                                    template_kwargs=example.get("chat_template_kwargs") or None)
    return {
        "input_ids": encoded["input_ids"],
        TOKEN_WEIGHTS: [float(w) for w in encoded["token_weights"]],
        TOKEN_ROLES: encoded["token_roles"],
        TOKEN_TURN_POSITIONS: encoded["token_turn_positions"],
        TOKEN_TURN_INDEX: encoded["token_turn_index"],
    }


def _labels_from_weights(example):
    return {"labels": [token if weight > 0 else -100
                       for token, weight in zip(example["input_ids"], example[TOKEN_WEIGHTS], strict=True)]}


def _truncate(example, columns, window):
    return {name: example[name][window] for name in columns}


def _has_weighted_target(example):
    # Position 0 is never a prediction target (causal shift), so its weight cannot train anything.
    return any(label != -100 and weight > 0
               for label, weight in zip(example["labels"][1:], example[TOKEN_WEIGHTS][1:], strict=True))
