"""``HybridTrainer``: one optimizer step = ``(1 - mu) * GRPO`` on prompts ``+ mu * weighted SFT`` on expert
conversations, both through the fused LM head.

* **GRPO term**: exactly :class:`~.grpo_trainer.FusedGRPOTrainer`'s (TRL's ``GRPOTrainer`` loss on the sampled
  completions, per-token log-probabilities and entropies from :func:`fused_wce.linear_log_prob`), normalised as
  TRL normalises it for ``loss_type`` over gradient accumulation and ranks.
* **SFT term**: the weighted cross-entropy of :class:`~.sft_trainer.WeightedSFTTrainer` on expert
  conversations (a ``messages`` column; per-token weights from a
  :class:`~fused_wce.trl_integration.chat_weights.turn_weighting.TurnWeighting`: roles, last-N turns, decay,
  per-message ``weight`` keys), ``sum(w_i c_i CE_i) / sum(w_i)`` with the sums over every micro-batch of the
  optimizer step and every rank, computed by :func:`fused_wce.linear_cross_entropy` inside the head's call.
  ``c_i`` is 1, or the stop-gradient probability ``p_i`` of the expert token (``sft_token_reweighting="p"``, DFT)
  or ``p_i (1 - p_i)`` (``"p(1-p)"``, CHORD-phi).
* **mu**: :func:`~.hybrid_config.mu_at` of the optimizer step (constant, or warm-up then linear/cosine decay as in
  CHORD); the same for every micro-batch of the step. ``mu = 0`` skips the SFT forward (the step is the GRPO
  step), ``mu = 1`` skips the GRPO forward (completions are still sampled and scored, for the logs).

Each rank takes its own ``sft_per_device_train_batch_size`` conversations per micro-batch from one permutation
of the expert set per pass (seeded by ``seed`` and the pass), so ``P`` ranks x ``b`` conversations see what one
process with ``P * b`` sees; a run resumed from a checkpoint continues that stream where its steps left it. Logs: TRL's GRPO logs (``reward``, ``rewards/<func>/mean``, ``kl``, ``entropy``,
clip ratios...), ``hybrid/mu``, ``hybrid/grpo_loss`` and ``hybrid/sft_loss`` (each term's value, as ``loss`` is
logged), the SFT term's ``loss/<role>``, ``loss/turn_<k>``, ``loss/turn_<position>`` (as ``fused-wce sft`` logs
them), ``hybrid/sft_entropy`` and ``hybrid/sft_mean_token_accuracy``. Evaluation computes the GRPO term alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl.data_utils import get_dataset_column_names

from ..chat_weights.turn_weighting import TurnWeighting
from ..token_codes import TOKEN_ROLES, TOKEN_TURN_INDEX, TOKEN_TURN_POSITIONS
from .collator import PER_TOKEN_COLUMNS, WeightedDataCollator, shifted_target_weights
from .dataset import prepare_weighted_dataset, weighted_dataset_kind
from .grpo_trainer import FusedGRPOTrainer
from .hybrid_config import HybridConfig, mu_at
from .lm_head import WeightedLossInputs, add_weighted_lm_head
from .metrics import MetricSums, micro_batch_stats, turn_index_buckets


@dataclass(frozen=True)
class _SFTDataArgs:
    """What :func:`~.dataset.prepare_weighted_dataset` reads of an ``SFTConfig``, for the expert conversations."""

    max_length: int | None
    dataset_num_proc: int | None
    seed: int
    truncation_mode: str = "keep_start"
    shuffle_dataset: bool = False


@dataclass
class SFTStep:
    """The SFT side of one optimizer step: ``mu``, this rank's micro-batches (collated, on the device; empty when
    ``mu == 0``) and the normaliser (float32 0-d: the weights' sum over them and over every rank)."""

    mu: float
    batches: list
    normalizer: torch.Tensor | None


class HybridTrainer(FusedGRPOTrainer):
    """GRPO on ``train_dataset``'s prompts mixed with weighted multi-turn SFT on ``sft_dataset``, in one step.

    Args:
        model, reward_funcs, train_dataset, eval_dataset, processing_class, ...: as for ``GRPOTrainer``.
        args: a :class:`~.hybrid_config.HybridConfig` (GRPO's options plus ``sft_mu``... and the SFT batch).
        sft_dataset: expert conversations, a ``messages`` column (or pre-tokenized ``input_ids`` and
            ``token_weights``), prepared as ``WeightedSFTTrainer`` prepares its dataset (chat template of
            ``processing_class``; truncated to ``sft_max_length``; conversations without a weighted token dropped).
        weighting: the :class:`TurnWeighting` of the expert conversations (default: assistant turns, weight 1).
            Adaptive weights are not supported here.
    """

    _tag_names = ["trl", "grpo", "sft", "fused-wce"]

    def __init__(self, model, reward_funcs, args: HybridConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, *posargs, sft_dataset, weighting: TurnWeighting | None = None, **kwargs):
        if not isinstance(args, HybridConfig):
            raise TypeError(f"args must be a HybridConfig, got {type(args).__name__}")
        if weighting is None:
            weighting = TurnWeighting()
        if not isinstance(weighting, TurnWeighting):
            raise TypeError(f"weighting must be a TurnWeighting or None, got {type(weighting).__name__}")
        if weighting.adaptive is not None:
            raise ValueError("adaptive turn weights are not supported by HybridTrainer; use fixed weights")
        if not isinstance(sft_dataset, Dataset):
            raise TypeError(f"sft_dataset must be a datasets.Dataset (the SFT stream indexes it), got "
                            f"{type(sft_dataset).__name__}")
        columns = get_dataset_column_names(sft_dataset)
        kind = weighted_dataset_kind(columns, None)
        if kind is None:
            raise ValueError(f"sft_dataset needs a `messages` column (or `input_ids` and `token_weights`); got "
                             f"columns {columns}")
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, processing_class, *posargs,
                         **kwargs)
        self.weighting = weighting
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_weighted_lm_head(policy, dft=args.sft_token_reweighting == "p",
                             chord_phi=args.sft_token_reweighting == "p(1-p)")
        data_args = _SFTDataArgs(max_length=args.sft_max_length, seed=args.seed,
                                 dataset_num_proc=getattr(args, "dataset_num_proc", None))
        prepared = prepare_weighted_dataset(sft_dataset, conversational=kind == "conversational",
                                            tokenizer=self._tokenizer, weighting=weighting, chat_template=None,
                                            args=data_args, packing=False, dataset_name="sft")
        keep = ["input_ids", "labels"] + [name for name in PER_TOKEN_COLUMNS if name in prepared.column_names]
        self.sft_dataset = prepared.select_columns(keep)
        per_step = args.sft_per_device_train_batch_size * self.accelerator.num_processes
        if len(self.sft_dataset) < per_step:
            raise ValueError(f"sft_dataset has {len(self.sft_dataset)} usable conversations, fewer than one "
                             f"micro-batch over every rank ({per_step})")
        self._sft_collator = WeightedDataCollator(pad_token_id=self._tokenizer.pad_token_id)
        self._sft_stream = None  # this rank's SFT micro-batches (:meth:`_sft_micro_batches`), from the first step
        self._sft_step: SFTStep | None = None
        self._sft_metrics = MetricSums()
        # The logging window: this rank's per-term sums over its micro-batches (float32 [grpo, sft] on the device),
        # its optimizer steps and the sum of their mu.
        self._term_sums, self._window_steps, self._window_mu = None, 0, 0.0

    # ----------------------------------------------------------------------------------------------- SFT batches
    def _sft_micro_batches(self, skip: int = 0):
        """This rank's SFT micro-batches, endlessly, from the ``skip``-th on: pass ``e`` over the expert set
        follows the permutation seeded by ``seed + e`` (the same on every rank); each global batch of ``P * b``
        consecutive conversations gives rank ``r`` its ``r``-th ``b``; an incomplete last global batch is left
        out."""
        size = self.args.sft_per_device_train_batch_size
        ranks, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_step, device = size * ranks, self.accelerator.device
        epoch, position = 0, 0
        while True:
            generator = torch.Generator().manual_seed(self.args.seed + epoch)
            order = torch.randperm(len(self.sft_dataset), generator=generator).tolist()
            for start in range(0, len(order) - per_step + 1, per_step):
                position += 1
                if position <= skip:
                    continue
                rows = order[start + rank * size:start + (rank + 1) * size]
                batch = self._sft_collator([self.sft_dataset[index] for index in rows])
                yield {name: value.to(device) for name, value in batch.items()}
            epoch += 1

    def _next_sft_step(self) -> SFTStep:
        """mu of the optimizer step about to run, its micro-batches and their normaliser (one gather)."""
        mu = mu_at(self.state.global_step, self.args)
        if mu == 0.0:
            return SFTStep(mu, [], None)
        if self._sft_stream is None:  # a resumed run continues the stream where the checkpoint's steps left it
            done = self.state.global_step * self.args.gradient_accumulation_steps
            self._sft_stream = self._sft_micro_batches(skip=done)
        batches = [next(self._sft_stream) for _ in range(self.current_gradient_accumulation_steps)]
        total = sum(shifted_target_weights(batch).sum(dtype=torch.float32) for batch in batches)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        # A step without any weighted token has an SFT term of 0 (numerator 0); keep the division finite.
        return SFTStep(mu, batches, total.clamp_min(torch.finfo(torch.float32).tiny))

    # ------------------------------------------------------------------------------------------------------ loss
    def training_step(self, model, inputs, num_items_in_batch):
        if self._step % self.current_gradient_accumulation_steps == 0:  # the first micro-batch of a step
            self._sft_step = self._next_sft_step()
            self._window_steps += 1
            self._window_mu += self._sft_step.mu
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training:  # evaluation: the GRPO term alone
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self._sft_step
        if step is None:
            raise RuntimeError("HybridTrainer.compute_loss ran outside training_step in training mode")
        mu = step.mu
        grpo = super().compute_loss(model, inputs, return_outputs) if mu < 1.0 else None
        sft = self._sft_term(model, step.batches.pop(0), step.normalizer) if mu > 0.0 else None
        self._add_terms(grpo, sft)
        if sft is None:
            return grpo
        if grpo is None:
            return sft
        return (1.0 - mu) * grpo + mu * sft

    def _sft_term(self, model, batch: dict, normalizer: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of the SFT term: ``sum(w c CE) / normalizer`` times the number of ranks (DDP and
        FSDP average gradients over ranks while the normaliser already sums every rank's weights)."""
        labels = batch["labels"]
        weight = shifted_target_weights(batch)
        inputs = WeightedLossInputs(labels[:, 1:], weight, normalizer)
        # in_float32: the loss and statistics as computed, also where a mixed-precision policy cast the outputs
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        fused_wce_loss=inputs).in_float32()
        loss = outputs.loss * self.accelerator.num_processes
        if self.aux_loss_enabled and outputs.aux_loss is not None:  # as WeightedSFTTrainer adds it
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / self.current_gradient_accumulation_steps
        cap = turn_index_buckets()
        stats = micro_batch_stats(outputs.counted, outputs.token_loss, outputs.entropy, outputs.is_top1,
                                  batch.get(TOKEN_ROLES), batch.get(TOKEN_TURN_POSITIONS),
                                  batch.get(TOKEN_TURN_INDEX), cap)
        self._sft_metrics.add(self.accelerator.gather(stats).reshape(-1, stats.numel()).sum(0), cap)
        return loss

    def _add_terms(self, grpo: torch.Tensor | None, sft: torch.Tensor | None) -> None:
        """Add one micro-batch's terms to the logging window's sums, on the device (no host synchronisation until
        :meth:`log`)."""
        zero = torch.zeros((), dtype=torch.float32, device=self.accelerator.device)
        row = torch.stack([zero if term is None else term.detach().float().reshape(()) for term in (grpo, sft)])
        self._term_sums = row if self._term_sums is None else self._term_sums + row

    # ------------------------------------------------------------------------------------------------------- logs
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs and self._term_sums is not None:
            # Each rank's per-term sums over the window's micro-batches, averaged over ranks (as Trainer logs its
            # loss), per optimizer step; mu averaged over the window's steps.
            grpo, sft = self.accelerator.reduce(self._term_sums, reduction="mean").tolist()
            steps = self._window_steps
            logs.update({"hybrid/mu": self._window_mu / steps, "hybrid/grpo_loss": grpo / steps,
                         "hybrid/sft_loss": sft / steps})
            self._term_sums, self._window_steps, self._window_mu = None, 0, 0.0
            window = self._sft_metrics.flush(None)
            if window is not None:
                metrics, group_losses = window
                for name, value in group_losses.items():
                    logs[f"loss/{name}"] = value
                logs["hybrid/sft_entropy"] = metrics["entropy"]
                logs["hybrid/sft_mean_token_accuracy"] = metrics["mean_token_accuracy"]
        super().log(logs, start_time)
