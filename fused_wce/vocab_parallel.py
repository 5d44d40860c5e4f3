"""The vocabulary-parallel loss: the LM head's weight split by vocabulary rows over a process group.

Tensor-parallel training shards the LM head by vocabulary (``ColwiseParallel``, transformers' ``tp_plan``,
Megatron): rank ``r`` of ``W`` holds rows ``[v_r, v_r + V_r)`` of the weight (and bias), ``V_r`` possibly
uneven. :func:`fused_wce.linear_cross_entropy` takes such a head either as a DTensor (``Shard(0)`` on a 1-D
mesh) or as the plain local rows with ``process_group`` and ``vocab_start``, and runs the custom op
``fused_wce::vocab_parallel_linear_cross_entropy`` on every rank of the group:

1. **Tokens.** Every rank has the same tokens (hidden states, targets, weights: the head's input is
   replicated), or, with sequence parallelism, its own, which are all-gathered first (each rank's padded to
   the longest; padding never counts).
2. **Slice summaries.** Each rank counts and gathers the counted tokens as the one-process loss does, then its
   backend's ``slice_summaries`` computes, over its own vocabulary rows only, each token's fp32
   ``(m, s, e, z[t] or 0, sum z)`` (:class:`fused_wce.loss_math.SliceSummary`; ``sum z`` only with label
   smoothing): ``2 M H V_r`` FLOPs, logits in tiles as always.
3. **One all-gather** of those ``[k, M]`` fp32 numbers (``k`` = 4, 5 with label smoothing). Every rank merges
   the ``W`` slices in rank order (:func:`fused_wce.loss_math.merge_slice_summaries`), so every rank has the
   same whole-row ``lse``, per-token loss, entropy, top-1 and DFT factor, bit for bit, and the same loss.
4. **Gradients** (when wanted): the backend's ``slice_gradients`` recomputes the rank's logits in vocabulary
   slabs with the known ``lse`` and final coefficients: ``grad_weight`` and ``grad_bias`` of the rank's rows
   (complete: they stay local, as the DTensor placement says) and the rank's part of ``grad_hidden`` in fp32,
   ``6 M H V_r`` FLOPs. One all-reduce (sum) of ``grad_hidden`` ``[M, H]`` fp32 completes it on every rank;
   with sequence parallelism a reduce-scatter of ``[N, H]`` fp32 leaves each rank its own tokens' rows.

No rank holds ``[N, V]``, ``[N, V_r]`` or the whole weight; logits never cross the network. Per call and
rank: ``8 M H V_r`` FLOPs (the whole row's ``lse`` must be known before any ``dlogits``, so the gradient pass
recomputes the slice's logits; one process computes ``6 M H V``), ``W k M 4`` bytes gathered, and the
gradient all-reduce of ``4 M H`` bytes (docs/vocab_parallel.md has the model against gathering the head).
``reduction="none"`` recomputes steps 1-4 with the upstream gradient in backward, as the one-process op does.

Checks that keep a wrong layout from giving a silently wrong loss: the DTensor placements and mesh; the plain
shards' extents (all-gathered, they must tile ``[0, V)``); and, without sequence parallelism, that every rank
counted the same tokens (a fingerprint of the counted targets, positions and weights is all-gathered). The
hidden states themselves are not compared: they must be the same on every rank.

Why a custom op (as the one-process loss): ``torch.compile(fullgraph=True)`` sees one opaque node (the host
synchronisations and collectives run inside it, eagerly), the fake implementation is the one-process op's
(the outputs' shapes depend only on the local tensors), and the autograd registration is shared
(:func:`fused_wce.custom_ops.register_loss_autograd`). The process group travels as its name, as torch's
functional collectives pass it.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import backend_for
from .custom_ops import (_GRADS_WANTED, _INPUTS, _TAGS, FORWARD_OUTPUTS, _loss_backward, _loss_backward_op_fake,
                         _loss_forward, _loss_op_fake, _on_device, counted_request, register_loss_autograd)
from .loss_math import SliceSummary, apply_dft, dft_factor, finish_token_stats, merge_slice_summaries
from .options import LossOptions
from .passes import PassRequest, PassResult, allocate_gradients, empty_pass

_SHARD_SCHEMA = "str group_name, int vocab_start, int vocab_size, bool sequence_parallel"
_SHARD_FIELDS = ("group_name", "vocab_start", "vocab_size", "sequence_parallel")


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of a vocabulary-parallel loss: the process ``group`` whose ranks hold the slices, the
    first row ``vocab_start`` of this rank's slice, the whole vocabulary's ``vocab_size``, and whether the
    tokens are split over the group (``sequence_parallel``) rather than replicated."""

    group: object
    vocab_start: int
    vocab_size: int
    sequence_parallel: bool = False

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def op_kwargs(self) -> dict:
        return {"group_name": self.group.group_name, "vocab_start": self.vocab_start,
                "vocab_size": self.vocab_size, "sequence_parallel": self.sequence_parallel}

    @classmethod
    def from_op_kwargs(cls, group_name: str, vocab_start: int, vocab_size: int,
                       sequence_parallel: bool) -> VocabShard:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return cls(_resolve_process_group(group_name), vocab_start, vocab_size, sequence_parallel)


# ------------------------------------------------------------------------------------- the inputs' layout
def _dtensor_class():
    """DTensor, or ``()`` (no instance of it exists) while ``torch.distributed.tensor`` is not imported: a
    one-process call never imports it."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", ()) if module is not None else ()


def is_vocab_sharded(weight) -> bool:
    """Whether ``weight`` is a DTensor split by rows over a 1-D mesh (a vocabulary-parallel LM head)."""
    dtensor = _dtensor_class()
    return bool(dtensor) and isinstance(weight, dtensor) and weight.device_mesh.ndim == 1 \
        and _is_row_shard(weight.placements[0], weight.ndim)


def _is_row_shard(placement, ndim: int) -> bool:
    from torch.distributed.tensor import Shard

    return type(placement) is Shard and placement.dim % ndim == 0


def local_inputs(hidden, weight, target, token_weight, bias, normalizer, process_group, vocab_start,
                 sequence_parallel: bool):
    """The call's tensors as this rank's local tensors, and its :class:`VocabShard` (None for a one-process
    call: no DTensor, no ``process_group``). DTensors become their local tensors (differentiably: their
    gradients come back with the same placements)."""
    tensors = (hidden, weight, target, token_weight, bias, normalizer)
    dtensor = _dtensor_class()
    has_dtensor = bool(dtensor) and any(isinstance(t, dtensor) for t in tensors)
    if not has_dtensor and process_group is None:
        if vocab_start is not None or sequence_parallel:
            raise ValueError("vocab_start and sequence_parallel need process_group (or a DTensor weight): they "
                             "describe a vocabulary-parallel LM head")
        return (*tensors, None)
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel must be a bool, got {type(sequence_parallel).__name__}")
    if has_dtensor and isinstance(weight, dtensor):
        if process_group is not None or vocab_start is not None:
            raise ValueError("weight is a DTensor: its mesh and placement give the process group and the vocabulary "
                             "offset; do not pass process_group or vocab_start")
        return _from_dtensors(*tensors, sequence_parallel)
    if has_dtensor:
        name = ("hidden", "weight", "target", "token_weight", "bias", "normalizer")[
            [isinstance(t, dtensor) for t in tensors].index(True)]
        raise ValueError(f"{name} is a DTensor but weight is not: a vocabulary-parallel loss takes the weight as a "
                         "DTensor sharded Shard(0), or plain local tensors with process_group and vocab_start")
    shard = _shard_of_process_group(weight, process_group, vocab_start, sequence_parallel)
    return (*tensors, shard)


def _from_dtensors(hidden, weight, target, token_weight, bias, normalizer, sequence_parallel: bool):
    from torch.distributed.tensor import Replicate, Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"weight is a DTensor on a {mesh.ndim}-D mesh {mesh}: the vocabulary-parallel loss needs the "
                         "head sharded over one mesh dimension (the tensor-parallel one) alone")
    if not _is_row_shard(weight.placements[0], weight.ndim):
        raise ValueError(f"weight is a DTensor with placements {weight.placements}: the vocabulary-parallel loss "
                         "needs Shard(0) (each rank a slice of the vocabulary rows)")
    if bias is not None and not (isinstance(bias, type(weight)) and bias.device_mesh == mesh
                                 and _is_row_shard(bias.placements[0], 1)):
        raise ValueError("bias must be a DTensor sharded Shard(0) on the weight's mesh, like the weight "
                         f"(got {type(bias).__name__}{getattr(bias, 'placements', '')})")
    vocab_size, world_size, rank = weight.shape[0], mesh.size(), mesh.get_local_rank()
    if vocab_size < world_size:
        raise ValueError(f"weight has V={vocab_size} rows over {world_size} ranks: some ranks' vocabulary slices "
                         "are empty; use fewer ranks than vocabulary rows")
    _, vocab_start = Shard.local_shard_size_and_offset(vocab_size, world_size, rank)
    # A plain hidden: the same tokens on every rank (target and token_weight DTensors then Replicate), unless
    # sequence_parallel says each rank has its own.
    token_placement = None if sequence_parallel else Replicate()
    if isinstance(hidden, type(weight)):
        if hidden.device_mesh != mesh:
            raise ValueError(f"hidden is a DTensor on mesh {hidden.device_mesh}, the weight on {mesh}: they must "
                             "share the tensor-parallel mesh")
        token_placement = hidden.placements[0]
        if isinstance(token_placement, Shard) and token_placement.dim % hidden.ndim < hidden.ndim - 1:
            sequence_parallel = True
        elif isinstance(token_placement, Replicate) and sequence_parallel:
            raise ValueError("sequence_parallel=True, but hidden is a DTensor replicated over the mesh: every rank "
                             "has every token (shard hidden along a token dimension, or drop sequence_parallel)")
        elif not isinstance(token_placement, Replicate):
            raise ValueError(f"hidden is a DTensor with placements {hidden.placements}: the vocabulary-parallel loss "
                             "takes it replicated, or sharded along a token dimension (sequence parallelism)")
    local = [_local(t, name, mesh, token_placement) for t, name in
             ((hidden, "hidden"), (target, "target"), (token_weight, "token_weight"))]
    normalizer = _local(normalizer, "normalizer", mesh, Replicate())
    shard = VocabShard(mesh.get_group(), vocab_start, vocab_size, sequence_parallel)
    return local[0], weight.to_local(), local[1], local[2], None if bias is None else bias.to_local(), normalizer, shard


def _local(tensor, name: str, mesh, placement):
    """``tensor``'s local part: a DTensor must be on ``mesh`` with ``placement`` (hidden's, or Replicate; None:
    any)."""
    if not isinstance(tensor, _dtensor_class()):
        return tensor
    if tensor.device_mesh != mesh or (placement is not None and tuple(tensor.placements) != (placement,)):
        raise ValueError(f"{name} is a DTensor with placements {tensor.placements} on {tensor.device_mesh}: it must "
                         f"be laid out like hidden ({placement} on {mesh}) or be a plain tensor")
    return tensor.to_local()


def _shard_of_process_group(weight, group, vocab_start, sequence_parallel: bool) -> VocabShard:
    """The shard of plain local rows: every rank's ``(vocab_start, rows)`` are all-gathered (one small
    collective and host read) and must tile ``[0, V)``; checked after the gather, so that every rank raises."""
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    if vocab_start is None:
        raise ValueError("process_group needs vocab_start: the vocabulary index of this rank's first weight row")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
        raise TypeError(f"vocab_start must be an int, got {type(vocab_start).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be this rank's [V_r, H] rows, got {getattr(weight, 'shape', type(weight))}")
    mine = torch.tensor([int(vocab_start), weight.shape[0]], dtype=torch.int64, device=weight.device)
    extents = [tuple(row) for row in _all_gather(mine, group).tolist()]
    expected_start = 0
    for start, rows in sorted(extents):
        if start != expected_start or rows < 1:
            raise ValueError(f"process_group/vocab_start: the ranks' vocabulary slices (vocab_start, rows) = {extents} "
                             "must be non-empty and tile [0, V) without gaps or overlaps")
        expected_start = start + rows
    return VocabShard(group, int(vocab_start), expected_start, sequence_parallel)


# -------------------------------------------------------------------------------------------- the pass
def sliced_pass(request: PassRequest, shard: VocabShard) -> PassResult:
    """One pass over the counted tokens of ``request`` (its weight: this rank's slice, its target relative to
    the slice) on every rank of ``shard.group``: the stats of the whole rows, and this slice's gradients with
    ``grad_hidden`` in fp32, not yet summed over the ranks. With ``request.known`` (the rows' whole-row lse and
    entropy) the gradients alone, without a collective."""
    options = request.options
    backend = backend_for(options.backend, request.hidden.device)
    if request.known is not None:  # the log-prob backward: the whole rows' lse and entropy are known
        return PassResult(None, backend.slice_gradients(request, request.known.lse, shard.vocab_size))
    summary = _merged(backend.slice_summaries(request), shard)
    stats = finish_token_stats(summary[:3], summary.target_logit, options, summary.sum_logits, shard.vocab_size)
    coef = request.coef
    if options.dft:
        factor = dft_factor(stats.lse, summary.target_logit)
        stats = apply_dft(stats, factor)
        coef = None if coef is None else coef * factor
    if not request.wants_gradients:
        return PassResult(stats, allocate_gradients(request))
    gradients = backend.slice_gradients(dataclasses.replace(request, coef=coef), stats.lse, shard.vocab_size)
    return PassResult(stats, gradients)


def _merged(local: SliceSummary, shard: VocabShard) -> SliceSummary:
    """Every rank's slice summaries, all-gathered (one collective of ``W k M`` fp32) and merged in rank order."""
    stacked = _all_gather(torch.stack([t for t in local if t is not None]), shard.group).unbind(1)
    return merge_slice_summaries(SliceSummary(*stacked))


def _all_gather(tensor: Tensor, group) -> Tensor:
    """Every rank's ``tensor`` stacked in rank order: ``[W, *tensor.shape]``."""
    world_size = dist.get_world_size(group)
    gathered = tensor.new_empty(world_size * tensor.shape[0], *tensor.shape[1:])
    dist.all_gather_into_tensor(gathered, tensor.contiguous(), group=group)
    return gathered.view(world_size, *tensor.shape)


def _run_sliced(shard: VocabShard, hidden, weight, bias, target, token_weight, normalizer, options: LossOptions,
                coef_of, need_grads, extras_of=None):
    """:func:`fused_wce.custom_ops._run_counted` for a vocabulary slice: count and gather the tokens, check that
    every rank has the same ones (unless they were gathered), run :func:`sliced_pass`; without sequence
    parallelism, all-reduce ``grad_hidden`` (fp32) and return it in hidden's dtype."""
    request, index, counted_weight = counted_request(hidden, weight, bias, target, token_weight, normalizer, options,
                                                     coef_of, need_grads, vocab_size=shard.vocab_size,
                                                     extras_of=extras_of)
    if not shard.sequence_parallel:
        _check_same_tokens(shard, index, request.target, counted_weight)
    if request.num_tokens == 0:
        return empty_pass(request), index, counted_weight
    grad_hidden_dtype = request.grad_hidden_dtype
    request = dataclasses.replace(request, target=request.target - shard.vocab_start, grad_hidden_dtype=torch.float32)
    result = sliced_pass(request, shard)
    gradients = result.gradients
    if gradients.hidden is not None and not shard.sequence_parallel:
        dist.all_reduce(gradients.hidden, group=shard.group)
        gradients = gradients._replace(hidden=gradients.hidden.to(grad_hidden_dtype))
    return PassResult(result.stats, gradients), index, counted_weight


def _check_same_tokens(shard: VocabShard, index: Tensor, target: Tensor, counted_weight: Tensor) -> None:
    """Raise on every rank unless every rank counted the same tokens (positions, targets and weights): the
    summaries of different tokens must never be merged."""
    positions = index + 1
    fingerprint = torch.stack([  # integer sums: exact, whatever the order of the additions
        torch.tensor(index.numel(), dtype=torch.int64, device=index.device),
        (positions * (target + 2)).sum(),
        (positions * counted_weight.float().view(torch.int32)).sum(),  # the weights' bit patterns
    ])
    rows = _all_gather(fingerprint, shard.group).tolist()
    if any(row != rows[0] for row in rows):
        counts = [row[0] for row in rows]
        raise ValueError(
            "the vocabulary-parallel loss needs the same tokens on every rank of the group (hidden, target and "
            f"token_weight replicated), but the ranks counted different ones (counted tokens per rank: {counts}). "
            "With tokens split over the ranks pass sequence_parallel=True (or hidden as a DTensor sharded along a "
            "token dimension); a DTensor weight sharded by FSDP rather than tensor parallelism also lands here")


class _TokenShards:
    """Sequence parallelism: each rank's ``n_r`` tokens, all-gathered in rank order, every rank's padded to the
    longest (``width`` rows; one small all-gather and host read learns the ``n_r``)."""

    def __init__(self, shard: VocabShard, num_tokens: int, device):
        self.shard = shard
        sizes = _all_gather(torch.tensor([num_tokens], dtype=torch.int64, device=device), shard.group)
        self.num_tokens, self.width = num_tokens, int(sizes.max())

    def gather(self, local: Tensor | None, fill) -> Tensor | None:
        """``[n_r, ...]`` on each rank -> ``[W * width, ...]`` on every rank; padding rows hold ``fill``."""
        if local is None:
            return None
        padded = local.new_full((self.width, *local.shape[1:]), fill)
        padded[: self.num_tokens] = local
        return _all_gather(padded, self.shard.group).flatten(0, 1)

    def mine(self, gathered: Tensor) -> Tensor:
        """This rank's rows of a gathered per-token tensor (empty tensors pass through)."""
        if gathered.numel() == 0:
            return gathered
        start = self.shard.rank * self.width
        return gathered[start: start + self.num_tokens]

    def reduce_scatter(self, gathered: Tensor, dtype: torch.dtype) -> Tensor:
        """Every rank's contributions ``[W * width, H]`` summed, this rank's rows kept, cast to ``dtype``."""
        if gathered.numel() == 0:
            return gathered
        out = gathered.new_empty(self.width, *gathered.shape[1:])
        dist.reduce_scatter_tensor(out, gathered.contiguous(), group=self.shard.group)
        return out[: self.num_tokens].to(dtype)

    def all_tokens(self, hidden, target, token_weight, ignore_index: int):
        """Every rank's hidden, target and token_weight; padding rows are ignored (target = ignore_index)."""
        return self.gather(hidden, 0), self.gather(target, ignore_index), self.gather(token_weight, 0.0)


# ------------------------------------------------------------------------------------------- custom ops
_GRADIENT = FORWARD_OUTPUTS.index("grad_hidden")
_PER_TOKEN = tuple(FORWARD_OUTPUTS.index(name) for name in ("token_loss", "lse", "entropy", "is_top1", "z_term"))


def _split_keywords(keywords: dict) -> tuple[dict, dict]:
    """The op's keyword arguments: the shard's (:data:`_SHARD_FIELDS`) and the rest (options, wanted grads)."""
    rest = dict(keywords)
    return {name: rest.pop(name) for name in _SHARD_FIELDS}, rest


def shard_options_run(keywords: dict, make_options=lambda fields: LossOptions(**fields)):
    """``(shard, options, run)`` of an op call: ``run`` counts the tokens and runs their sliced pass;
    ``make_options`` builds the options from the op's option keywords."""
    shard_fields, option_fields = _split_keywords(keywords)
    shard = VocabShard.from_op_kwargs(**shard_fields)
    return shard, make_options(option_fields), functools.partial(_run_sliced, shard)


def _vp_loss_impl(hidden, weight, bias, target, token_weight, normalizer, *, grad_hidden, grad_weight, grad_bias,
                  **keywords):
    """The one-process op's outputs (:data:`fused_wce.custom_ops.FORWARD_OUTPUTS`) for this rank's local
    tensors: the loss and per-token outputs of the whole vocabulary (per-token: this rank's tokens), the
    gradients of this rank's hidden and of its weight and bias rows."""
    shard, options, run = shard_options_run(keywords)
    need_grads = (grad_hidden, grad_weight, grad_bias)
    with torch.autocast(hidden.device.type, enabled=False), _on_device(hidden):
        if not shard.sequence_parallel:
            return _loss_forward(hidden, weight, bias, target, token_weight, normalizer, options, need_grads, run=run)
        tokens = _TokenShards(shard, target.shape[0], hidden.device)
        all_hidden, all_target, all_weight = tokens.all_tokens(hidden, target, token_weight, options.ignore_index)
        outputs = list(_loss_forward(all_hidden, weight, bias, all_target, all_weight, normalizer, options,
                                     need_grads, run=run))
        if options.reduction == "none":
            outputs[0] = tokens.mine(outputs[0])
        for i in _PER_TOKEN:
            outputs[i] = tokens.mine(outputs[i])
        outputs[_GRADIENT] = tokens.reduce_scatter(outputs[_GRADIENT], hidden.dtype)
        return tuple(outputs)


_vp_loss_op = torch.library.custom_op(
    "fused_wce::vocab_parallel_linear_cross_entropy", _vp_loss_impl, mutates_args=(), tags=_TAGS,
    schema=f"({_INPUTS}, Tensor? normalizer, *, {_GRADS_WANTED}, {_SHARD_SCHEMA}, {LossOptions.op_schema()}) -> "
           f"({', '.join(['Tensor'] * len(FORWARD_OUTPUTS))})")


@_vp_loss_op.register_fake
def _vp_loss_op_fake(hidden, weight, bias, target, token_weight, normalizer, **keywords):
    return _loss_op_fake(hidden, weight, bias, target, token_weight, normalizer, **_split_keywords(keywords)[1])


def _vp_loss_backward_impl(hidden, weight, bias, target, token_weight, grad_output, *, grad_hidden, grad_weight,
                           grad_bias, **keywords):
    """reduction="none": the gradients of this rank's tensors for the upstream gradient ``grad_output`` of its
    tokens' losses (a second vocabulary-parallel pass, as the one-process backward op)."""
    shard, options, run = shard_options_run(keywords)
    need_grads = (grad_hidden, grad_weight, grad_bias)
    with torch.autocast(hidden.device.type, enabled=False), _on_device(hidden):
        if not shard.sequence_parallel:
            return _loss_backward(hidden, weight, bias, target, token_weight, grad_output, options, need_grads,
                                  run=run)
        tokens = _TokenShards(shard, target.shape[0], hidden.device)
        all_hidden, all_target, all_weight = tokens.all_tokens(hidden, target, token_weight, options.ignore_index)
        outputs = _loss_backward(all_hidden, weight, bias, all_target, all_weight, tokens.gather(grad_output, 0.0),
                                 options, need_grads, run=run)
        return (tokens.reduce_scatter(outputs[0], hidden.dtype), *outputs[1:])


_vp_loss_backward_op = torch.library.custom_op(
    "fused_wce::vocab_parallel_linear_cross_entropy_backward", _vp_loss_backward_impl, mutates_args=(), tags=_TAGS,
    schema=f"({_INPUTS}, Tensor grad_output, *, {_GRADS_WANTED}, {_SHARD_SCHEMA}, {LossOptions.op_schema()}) -> "
           "(Tensor, Tensor, Tensor)")


@_vp_loss_backward_op.register_fake
def _vp_loss_backward_op_fake(hidden, weight, bias, target, token_weight, grad_output, **keywords):
    return _loss_backward_op_fake(hidden, weight, bias, target, token_weight, grad_output,
                                  **_split_keywords(keywords)[1])


register_loss_autograd(_vp_loss_op, _vp_loss_backward_op)


def vocab_parallel_loss_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                           token_weight: Tensor | None, normalizer: Tensor | None, options: LossOptions,
                           shard: VocabShard, *, grad_hidden: bool, grad_weight: bool,
                           grad_bias: bool) -> tuple[Tensor, ...]:
    """Call the vocabulary-parallel op (on every rank of ``shard.group``); returns FORWARD_OUTPUTS."""
    return _vp_loss_op(hidden, weight, bias, target, token_weight, normalizer, grad_hidden=grad_hidden,
                       grad_weight=grad_weight, grad_bias=grad_bias, **shard.op_kwargs(), **options.op_kwargs())
