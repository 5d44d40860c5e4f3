"""``WeightedSFTTrainer``: TRL's ``SFTTrainer`` with per-token weights from chat turns and a fused loss.

Used exactly as :class:`trl.SFTTrainer`, plus ``weighting=TurnWeighting(...)``. What it changes:

* **Dataset preparation.** A conversational dataset (a ``messages`` column) is tokenized with
  :func:`~fused_wce.trl_integration.chat_weights.tokenize.tokenize_with_weights`, which adds per-token
  ``token_weights``, ``token_roles``, ``token_turn_positions`` and ``token_turn_index`` columns; ``labels`` are the
  token ids where the weight is > 0 and -100 elsewhere. Truncation (``max_length``), packing and padding-free
  batching keep those columns aligned with ``input_ids`` (TRL itself truncates and packs only
  ``input_ids``/``labels``). Datasets without ``messages`` (plain text, prompt-completion, pre-tokenized) fall
  back to TRL's own preparation with weight 1 on the tokens TRL labels, unless a ``weighting`` was passed
  explicitly, which then is an error (:mod:`~.dataset`).
* **Loss.** The model runs its backbone only (:mod:`~.lm_head`); ``fused_wce.linear_cross_entropy`` computes
  ``sum(w_i * CE_i) / normalizer`` from the final hidden states and ``lm_head.weight`` without building the logits.
  The normalizer is the sum of the (shifted) weights over the whole gradient-accumulation batch and over all
  data-parallel ranks, so ``bs=1 x GA=4`` equals ``bs=4`` and 2 ranks equal 1 rank with twice the batch.
* **Logs.** TRL's ``loss``, ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` are kept; ``loss/<role>``,
  ``loss/turn_<position>`` (first/middle/last/only) and ``loss/turn_<k>`` (``turn_1``, ``turn_2``, ...,
  ``turn_5+``: the k-th message of its role) are added: the mean unweighted cross-entropy of the counted target
  tokens of each group over the logging window, so each stage's curve shows in TensorBoard or W&B. They are
  summed on the device and read back once per logging step (:mod:`~.metrics`), never per micro-batch.
* **Checkpoints.** Beside ``Trainer``'s own, a checkpoint holds the adaptive weighting state, the logged metrics
  since the last log and the tokens seen (:mod:`~.checkpoint`); ``train(resume_from_checkpoint=...)`` restores
  them, so a resumed run continues exactly as an uninterrupted one. ``resume_from_checkpoint=True`` takes the
  last *complete* checkpoint (one cut short by a killed process is skipped).
* **Adaptive turn weights.** With ``TurnWeighting(adaptive=AdaptiveTurnWeights(...))`` each counted token's weight
  is multiplied, during training, by its turn's (or role's) multiplier, which follows the running per-group loss
  (:mod:`~fused_wce.trl_integration.chat_weights.adaptive`); the normaliser uses the same factors, and
  ``weight/<group>`` logs the multipliers each step used.

With weight 1 on exactly the tokens TRL labels (``weighting=None`` derives that from ``assistant_only_loss``),
the losses equal stock ``SFTTrainer``'s, also for Gemma-2's logit softcapping, logit scales, ``loss_type="dft"``,
``label_smoothing_factor`` and MoE router losses, which the fused loss reproduces.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from trl import SFTTrainer
from trl.data_utils import get_dataset_column_names
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..chat_weights.turn_weighting import TurnWeighting
from ..token_codes import TOKEN_ROLES, TOKEN_TURN_INDEX, TOKEN_TURN_POSITIONS, TOKEN_WEIGHTS
from .checkpoint import STATE_NAME, checkpoint_dir, last_complete_checkpoint, read_state, write_state
from .collator import PER_TOKEN_COLUMNS, WeightedDataCollator
from .dataset import prepare_weighted_dataset, weighted_dataset_kind
from .lm_head import WeightedLossInputs, add_weighted_lm_head, check_model_supported
from .metrics import MetricSums, adaptive_group_sums, micro_batch_stats, turn_index_buckets

logger = get_logger(__name__)


class WeightedSFTTrainer(SFTTrainer):
    """:class:`trl.SFTTrainer` whose loss is a per-token weighted cross-entropy computed by ``fused_wce``.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, ...: as for ``SFTTrainer``.
        weighting: :class:`~fused_wce.trl_integration.chat_weights.turn_weighting.TurnWeighting` that turns each
            conversation's messages into per-token weights. ``None`` gives stock TRL's selection: the assistant
            turns when ``args.assistant_only_loss`` else the whole sequence, each token with weight 1.
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
        self._metric_sums = {"train": MetricSums(), "eval": MetricSums()}
        self._train_tokens = None  # int64 0-d tensor on the device once training starts

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
            self.weighting = TurnWeighting.stock_trl(self.args.assistant_only_loss)

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
        kind = weighted_dataset_kind(columns, formatting_func)
        if self._is_vision_dataset or kind is None:
            if self._weighting_given:
                raise ValueError(
                    f"WeightedSFTTrainer's `weighting` needs a conversational {dataset_name} dataset with a `messages` "
                    f"column (a list of {{'role', 'content'}} dicts) or pre-tokenized `input_ids` + `{TOKEN_WEIGHTS}` "
                    f"columns; got columns {columns}. Pass weighting=None to train on TRL's labels with weight 1."
                )
            logger.info(f"The {dataset_name} dataset has no `messages` column: training on TRL's labels, weight 1.")
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        # With assistant_only_loss, SFTTrainer.__init__ swapped in TRL's training template (with {% generation %}
        # blocks) as self.chat_template: tokenize with it, as stock TRL does.
        weighting = self.weighting if self.weighting is not None else TurnWeighting.stock_trl(args.assistant_only_loss)
        return prepare_weighted_dataset(
            dataset, conversational=kind == "conversational", tokenizer=self._tokenizer, weighting=weighting,
            chat_template=getattr(self, "chat_template", None), args=args, packing=packing, dataset_name=dataset_name)

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
        """The running :class:`~fused_wce.trl_integration.chat_weights.adaptive.AdaptiveWeightState` (None without
        adaptive weights)."""
        if not hasattr(self, "_adaptive"):
            config = getattr(self.weighting, "adaptive", None)
            self._adaptive = config.new_state() if config is not None else None
            self._adaptive_pending = None  # float64 [loss sums, token counts] of the step in progress
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
        roles = torch.full(shape, -1, device=weight.device) if roles is None else roles
        turns = torch.full(shape, -1, device=weight.device) if turns is None else turns
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
            sums_and_counts = self._adaptive_pending.tolist()  # one host synchronisation per optimizer step
            adaptive.update(sums_and_counts[:len(adaptive.names)], sums_and_counts[len(adaptive.names):])
            self._adaptive_pending = None
        total = sum(self._effective_weights(batch, training).sum(dtype=torch.float32) for batch in batch_samples)
        total = torch.as_tensor(total, dtype=torch.float32).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        # Tensor/context/sequence-parallel ranks see the same tokens; count them once (as transformers does).
        return total / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())

    # ------------------------------------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``, resuming also the state this trainer keeps (see :mod:`~.checkpoint`);
        ``resume_from_checkpoint=True`` resumes from the last complete checkpoint in ``output_dir``."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in output_dir "
                                 f"{self.args.output_dir!r}")
        if resume_from_checkpoint:
            self._load_weighting_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        # Written before Trainer writes trainer_state.json, which marks the checkpoint complete.
        if self.args.should_save:
            write_state(checkpoint_dir(self._get_output_dir(trial=trial), self.state.global_step),
                        self._weighting_state())
        super()._save_checkpoint(model, trial)

    def _weighting_state(self) -> dict:
        """What this trainer keeps beside ``Trainer``'s state, as plain Python values (identical on every rank)."""
        adaptive = self._adaptive_state()
        pending = self._adaptive_pending if adaptive is not None else None
        return {"train_tokens": None if self._train_tokens is None else int(self._train_tokens.item()),
                "adaptive": None if adaptive is None else adaptive.state_dict(),
                "adaptive_pending": None if pending is None else pending.tolist(),
                "metric_sums": {mode: sums.state_dict() for mode, sums in self._metric_sums.items()}}

    def _load_weighting_state(self, checkpoint_dir) -> None:
        state = read_state(checkpoint_dir)
        adaptive = self._adaptive_state()
        if state is None:
            if adaptive is not None:
                raise ValueError(f"{checkpoint_dir} has no {STATE_NAME}: the adaptive weights' running state "
                                 "cannot be resumed (the checkpoint was not written by WeightedSFTTrainer)")
            warnings.warn(f"{checkpoint_dir} has no {STATE_NAME}: the logged num_tokens and metrics restart",
                          stacklevel=3)
            return
        if (state["adaptive"] is None) != (adaptive is None):
            raise ValueError(f"{checkpoint_dir} was saved {'with' if state['adaptive'] else 'without'} adaptive "
                             f"weights; this run is {'with' if adaptive is not None else 'without'}")
        if adaptive is not None:
            adaptive.load_state_dict(state["adaptive"])
            pending = state["adaptive_pending"]
            self._adaptive_pending = None if pending is None else torch.tensor(pending, dtype=torch.float64)
        tokens = state["train_tokens"]
        self._train_tokens = None if tokens is None else torch.tensor(tokens, dtype=torch.int64,
                                                                      device=self.accelerator.device)
        for mode, sums in self._metric_sums.items():
            sums.load_state_dict(state["metric_sums"][mode])

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
        # in_float32: the loss and statistics as computed, also where a mixed-precision policy cast the outputs
        # (FSDP2's output_dtype): what is logged and summed stays float32.
        outputs = model(**inputs, fused_wce_loss=WeightedLossInputs(target, weight, normalizer)).in_float32()
        loss = outputs.loss * ranks if ranks != 1 else outputs.loss
        if self.aux_loss_enabled and outputs.aux_loss is not None:
            # A per-micro-batch mean that DDP averages over ranks; with the accumulated normaliser the Trainer
            # leaves gradient accumulation to the loss, so average it over the accumulation steps (as TRL does).
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            self._metric_sums[mode].add_aux_loss(self.accelerator.gather(outputs.aux_loss.detach().reshape(1)).mean())

        self._record_metrics(mode, inputs, outputs, roles, turn_positions, turn_index)

        if return_outputs:
            warnings.warn("`return_outputs=True` recomputes the full logits with an extra forward pass",
                          FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(**inputs)
        return (loss, outputs) if return_outputs else loss

    def _record_metrics(self, mode, inputs, outputs, roles, turn_positions, turn_index) -> None:
        """Add one micro-batch to the logged metrics and, training with adaptive weights, to the per-group sums of
        the next multiplier update: one gather of a small vector (TRL does three), summed over ranks, and no host
        synchronisation (the values are read once per logging step, in :meth:`log`)."""
        adaptive = self._adaptive_state() if mode == "train" else None
        cap = turn_index_buckets(adaptive)
        stats = micro_batch_stats(outputs.counted, outputs.token_loss, outputs.entropy, outputs.is_top1, roles,
                                  turn_positions, turn_index, cap)
        stats = self.accelerator.gather(stats).reshape(-1, stats.numel()).sum(0)
        self._metric_sums[mode].add(stats, cap)
        if adaptive is not None:  # same gathered values on every rank: the multipliers stay identical
            sums = adaptive_group_sums(stats, adaptive, cap)
            pending = self._adaptive_pending
            self._adaptive_pending = sums if pending is None else pending.to(sums.device) + sums
        if mode == "train":
            self._count_train_tokens(inputs)

    def _count_train_tokens(self, inputs) -> None:
        """Tokens seen, counted like TRL (padding excluded), summed on the device."""
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            position_ids = inputs["position_ids"]
            local = torch.full((), position_ids.size(1), dtype=torch.int64, device=position_ids.device)
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        tokens = self.accelerator.gather_for_metrics(local).sum() // self._tp_size
        self._train_tokens = tokens if self._train_tokens is None else self._train_tokens + tokens

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        window = self._metric_sums[mode].flush(self._train_tokens)  # the one host synchronisation of the window
        if window is not None:
            metrics, group_losses = window
            for name, value in group_losses.items():  # a fixed order, so printed logs line up
                logs[f"{prefix}loss/{name}"] = value
            for key, value in metrics.items():  # averaged (here: taken as is) by SFTTrainer.log
                self._metrics[mode][key] = [value]
            self._total_train_tokens = metrics["num_tokens"]
        adaptive = self._adaptive_state() if mode == "train" else None
        if adaptive is not None and "loss" in logs:  # the multipliers the last optimizer step used
            for name, multiplier in zip(adaptive.names, adaptive.multipliers):
                logs[f"weight/{name}"] = multiplier
        super().log(logs, start_time)
