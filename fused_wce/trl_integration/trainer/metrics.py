"""What the trainer logs besides the loss, summed on the device and read back once per logging step.

Groups: ``loss/<role>`` (index 0 of the role groups is "no role": scaffolding, code -1; then the roles in code
order), ``loss/turn_<position>`` (first/middle/last/only among the messages of a role) and ``loss/turn_<k>`` (the
k-th message of its role; the last group holds turn ``DEFAULT_MAX_TURN_INDEX`` and later ones). Each is the mean
unweighted cross-entropy of the counted target tokens of the group over the logging window. Next to them TRL's
``entropy`` and ``mean_token_accuracy`` (per micro-batch means, averaged over the window, as TRL averages them),
``num_tokens`` and, for MoE models, ``aux_loss``.

Per micro-batch, :func:`micro_batch_stats` computes the per-group sums with ``index_add_`` and
:class:`MetricSums` adds them up in float64, all on the loss's device: no host synchronisation until
:meth:`MetricSums.flush` reads the window back with one ``tolist()`` at the logging step. The arithmetic is the
order-for-order float64 arithmetic the values had when they were read back per micro-batch, so the logged
numbers are the same.
"""
from __future__ import annotations

import torch

from ..token_codes import DEFAULT_MAX_TURN_INDEX, TURN_POSITIONS, role_names, turn_index_names

ROLE_GROUPS: tuple[str, ...] = ("scaffolding",) + role_names()
TURN_POSITION_GROUPS: tuple[str, ...] = tuple(f"turn_{position}" for position in TURN_POSITIONS)
TURN_INDEX_GROUPS: tuple[str, ...] = turn_index_names(DEFAULT_MAX_TURN_INDEX)
LOGGED_GROUPS: tuple[str, ...] = ROLE_GROUPS + TURN_POSITION_GROUPS + TURN_INDEX_GROUPS

_N_ROLES = len(ROLE_GROUPS)  # role code + 1: 0 none, 1.. the roles
_N_POSITIONS = len(TURN_POSITION_GROUPS) + 1  # turn position code + 1: 0 none, 1.. the positions


def turn_index_buckets(adaptive=None) -> int:
    """Buckets 1..cap of the turn index (bucket 0: none; the last holds later turns too), enough for the logged
    groups and for the groups of ``adaptive`` (an ``AdaptiveWeightState`` or None)."""
    return max(len(TURN_INDEX_GROUPS), len(adaptive.names) if adaptive is not None else 0)


def _block_sizes(cap: int) -> list[int]:
    return [3, _N_ROLES, _N_ROLES, _N_POSITIONS, _N_POSITIONS, cap + 1, cap + 1]


def _shifted_codes(codes: torch.Tensor | None, shape, device) -> torch.Tensor:
    """The per-token codes of the prediction targets (``codes[:, 1:]``), int64 on ``device``; -1 when absent."""
    if codes is None:
        return torch.full(shape, -1, dtype=torch.int64, device=device)
    return codes[:, 1:].to(device=device, dtype=torch.int64)


def micro_batch_stats(counted: torch.Tensor, token_loss: torch.Tensor, entropy: torch.Tensor, is_top1: torch.Tensor,
                      roles: torch.Tensor | None, turn_positions: torch.Tensor | None,
                      turn_index: torch.Tensor | None, cap: int) -> torch.Tensor:
    """One micro-batch's sums, float32 on the loss's device, without a host synchronisation.

    ``counted``, ``token_loss``, ``entropy``, ``is_top1``: per target ``[B, T-1]`` (the loss's outputs; zero where
    not counted). ``roles``, ``turn_positions``, ``turn_index``: the batch's per-token codes ``[B, T]`` or None.
    Returns ``[counted tokens, entropy sum, correct top-1, loss sum per role code + 1, token count per role code +
    1, the same two per turn position code + 1, the same two per turn index bucket 0..cap]``; codes outside the
    known range (a dataset built with another code table) count as "none".
    """
    device = token_loss.device
    shape = counted.shape
    roles = _shifted_codes(roles, shape, device) + 1
    roles = roles.masked_fill((roles < 0) | (roles >= _N_ROLES), 0)
    positions = _shifted_codes(turn_positions, shape, device) + 1
    positions = positions.masked_fill((positions < 0) | (positions >= _N_POSITIONS), 0)
    index = _shifted_codes(turn_index, shape, device)  # 0-based turn k -> bucket min(k, cap - 1) + 1; -1 -> 0
    index = torch.where(index >= 0, index.clamp_max(cap - 1) + 1, torch.zeros_like(index))
    buckets = torch.cat([roles.flatten(), positions.flatten() + _N_ROLES, index.flatten() + _N_ROLES + _N_POSITIONS])
    size = _N_ROLES + _N_POSITIONS + cap + 1
    losses = torch.where(counted, token_loss.detach().float(), 0.0).flatten().repeat(3)
    ones = counted.flatten().float().repeat(3)
    sums = torch.zeros(size, dtype=torch.float32, device=device).index_add_(0, buckets, losses)
    counts = torch.zeros(size, dtype=torch.float32, device=device).index_add_(0, buckets, ones)
    head = torch.stack([counted.sum().float(), entropy.detach().float().sum(), is_top1.sum().float()])
    edges = (0, _N_ROLES, _N_ROLES + _N_POSITIONS, size)
    blocks = [head]
    for start, end in zip(edges, edges[1:]):
        blocks += [sums[start:end], counts[start:end]]
    return torch.cat(blocks)


def _folded(values: torch.Tensor, k: int) -> torch.Tensor:
    """Buckets 1..k of ``values`` (bucket 0 is "none"), the k-th holding every later bucket too, added in order."""
    last = values[k:k + 1]
    for bucket in range(k + 1, values.numel()):
        last = last + values[bucket:bucket + 1]
    return torch.cat([values[1:k], last])


def adaptive_group_sums(stats: torch.Tensor, adaptive, cap: int) -> torch.Tensor:
    """Float64 ``[loss sum per group, token count per group]`` of ``adaptive``'s groups (an ``AdaptiveWeightState``)
    from one micro-batch's gathered :func:`micro_batch_stats`, on its device."""
    _, role_sums, role_counts, _, _, index_sums, index_counts = stats.double().split(_block_sizes(cap))
    if adaptive.config.groups == "role":
        return torch.cat([role_sums[1:], role_counts[1:]])
    k = len(adaptive.names)
    return torch.cat([_folded(index_sums, k), _folded(index_counts, k)])


class MetricSums:
    """One mode's (train or eval) logged metrics since the last log, as float64 sums on the device."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.micro_batches = 0
        self.sums: torch.Tensor | None = None  # [entropy and accuracy means, group loss sums, group token counts]
        self.aux_losses = 0
        self.aux_sum: torch.Tensor | None = None

    def add(self, stats: torch.Tensor, cap: int) -> None:
        """One micro-batch's :func:`micro_batch_stats`, summed over ranks."""
        head, role_sums, role_counts, position_sums, position_counts, index_sums, index_counts = \
            stats.double().split(_block_sizes(cap))
        counted = head[0]
        means = torch.where(counted > 0, head[1:] / counted, 0.0)  # entropy and accuracy of this micro-batch
        k = len(TURN_INDEX_GROUPS)
        row = torch.cat([means, role_sums, position_sums[1:], _folded(index_sums, k),
                         role_counts, position_counts[1:], _folded(index_counts, k)])
        self.sums = row if self.sums is None else self.sums.to(row.device) + row
        self.micro_batches += 1

    def add_aux_loss(self, value: torch.Tensor) -> None:
        """One micro-batch's MoE load-balancing loss (0-d, averaged over ranks)."""
        value = value.detach().double().reshape(1)
        self.aux_sum = value if self.aux_sum is None else self.aux_sum.to(value.device) + value
        self.aux_losses += 1

    def state_dict(self) -> dict:
        """The window so far as plain Python values (read back from the device), for a training checkpoint."""
        return {"micro_batches": self.micro_batches, "aux_losses": self.aux_losses,
                "sums": None if self.sums is None else self.sums.tolist(),
                "aux_sum": None if self.aux_sum is None else self.aux_sum.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the window of :meth:`state_dict` (float64 on the CPU until the next micro-batch moves it)."""
        self.reset()
        self.micro_batches, self.aux_losses = int(state["micro_batches"]), int(state["aux_losses"])
        for name in ("sums", "aux_sum"):
            if state[name] is not None:
                setattr(self, name, torch.tensor(state[name], dtype=torch.float64))

    def flush(self, train_tokens: torch.Tensor | None) -> tuple[dict[str, float], dict[str, float]] | None:
        """The window's values, read with one host synchronisation, and an empty window; None if it is empty.

        Returns ``({"aux_loss"?, "entropy", "mean_token_accuracy", "num_tokens"}, {group: mean loss})`` (groups
        without a counted token left out). ``train_tokens``: the tokens trained on so far (int64 0-d tensor, None
        before the first training micro-batch).
        """
        if self.sums is None:
            return None
        parts = [self.sums] + ([self.aux_sum] if self.aux_sum is not None else [])
        if train_tokens is not None:
            parts.append(train_tokens.reshape(1).double())
        values = torch.cat(parts).tolist()
        n = len(LOGGED_GROUPS)
        means, sums, counts = values[:2], values[2:2 + n], values[2 + n:2 + 2 * n]
        metrics = {"aux_loss": values[2 + 2 * n] / self.aux_losses} if self.aux_sum is not None else {}
        metrics.update(entropy=means[0] / self.micro_batches, mean_token_accuracy=means[1] / self.micro_batches,
                       num_tokens=int(values[-1]) if train_tokens is not None else 0)
        groups = {name: total / count for name, total, count in zip(LOGGED_GROUPS, sums, counts) if count > 0}
        self.reset()
        return metrics, groups
