"""Roofline of the vocabulary-parallel loss: one rank of a tensor-parallel group, against gathering the head.

Pure Python, in the conventions of :mod:`benchmarks.roofline` (phases at the card's GEMM rate and HBM bandwidth,
tensors alive at each candidate peak), plus the communication. A tensor-parallel LM head holds
``V_r = ceil(V / W)`` vocabulary rows on each of ``W`` ranks, and every rank has the same ``N`` tokens (``M``
counted). Two ways to compute the loss and its gradients:

- ``vocab_parallel`` (``fused_wce.linear_cross_entropy`` with the sharded weight, fused_wce/vocab_parallel.py):
  the slice summaries (``vocab_partials`` over the rank's rows, ``2 M H V_r``), one all-gather of ``k = 4``
  fp32 numbers per token and rank, then vocabulary slabs of the rank's rows with the known lse (cuBLAS fp32
  logits, ``logit_rows``, the ``dW`` and ``dX`` GEMMs: ``6 M H V_r``), one all-reduce of ``dX`` in fp32.
  ``dW`` stays on its rank. ``8 M H V / W`` FLOPs per rank.
- ``gather_head``: all-gather the weight into ``[V, H]`` on every rank, run the one-process loss on it
  (:func:`benchmarks.roofline._fused_wce`, ``6 M H V`` on every rank: the ranks repeat each other's work), keep
  the rank's rows of ``dW``. No ``dX`` all-reduce (every rank computes all of it).

Communication on a ring of ``W`` ranks: an all-gather whose output is ``X`` bytes sends and receives
``(W - 1) / W * X`` per rank, an all-reduce of ``X`` bytes ``2 (W - 1) / W * X``; its time is that over one
direction of the card's NVLink bandwidth, not overlapped with compute (the time column is the sum; a run that
overlaps them can only be faster). The loss variants, as in the roofline, change none of it (label smoothing:
``k = 5``).

``python -m benchmarks roofline --vocab-parallel [--card H200] [--out DIR]`` prints the table and writes
vocab_parallel.md/.csv.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass

from fused_wce import budget as fused_wce_budget

from .roofline import (CARDS, MIB, Algorithm, Card, Phase, Prediction, Problem, _cdiv, _fused_wce, _gemm,
                       markdown_table, predict_algorithm)

# NVLink bandwidth per GPU and direction (datasheets: 900 GB/s bidirectional on H100/H200, 600 GB/s on A100).
LINK_BYTES_PER_S = {"H200": 450e9, "H100 SXM": 450e9, "A100 SXM": 300e9}
MODELS = {"Llama-3-8B": (4096, 128256), "Gemma-3-27B": (5376, 262144)}
TP_SIZES = (2, 4, 8)
TOKENS = 16384
SUMMARIES_PER_TOKEN = 4  # (m, s, e, target logit); 5 with label smoothing (sum z)
FINGERPRINT_BYTES = 3 * 8  # the replicated-tokens check: 3 int64 per rank


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of a tensor-parallel loss: its compute (a roofline :class:`Prediction`) and the bytes it
    sends (= receives) over the ring."""

    plan: str
    model: str
    tp: int
    prediction: Prediction
    comm_bytes: float
    link_bytes_per_s: float

    @property
    def comm_s(self) -> float:
        return self.comm_bytes / self.link_bytes_per_s

    def row(self) -> dict:
        p = self.prediction
        return {"model": self.model, "tp": self.tp, "tokens": p.problem.tokens, "counted": p.problem.counted,
                "plan": self.plan, "tflop_per_rank": round(p.flops / 1e12, 2),
                "compute_ms": round(p.time_s * 1e3, 2), "comm_mib_per_rank": round(self.comm_bytes / MIB, 1),
                "comm_ms": round(self.comm_s * 1e3, 2), "total_ms": round((p.time_s + self.comm_s) * 1e3, 2),
                "peak_mib": round(p.peak_bytes / MIB, 1), "peak_at": p.peak_moment, "algorithm": p.summary}


def all_gather_bytes(output_bytes: float, tp: int) -> float:
    return (tp - 1) / tp * output_bytes


def all_reduce_bytes(tensor_bytes: float, tp: int) -> float:
    return 2 * (tp - 1) / tp * tensor_bytes


def vocab_parallel_rank(p: Problem, tp: int, lean: bool = False) -> tuple[Algorithm, float]:
    """One rank of fused_wce's vocabulary-parallel loss (cuBLAS plan, trainable head; ``lean``: lean_memory, dW
    written per slab in the input dtype): its algorithm and the bytes it communicates. The slab sizes are the
    plan's (fused_wce.budget, as triton_chunks._Plan computes them)."""
    b, h, n, m = p.dtype_bytes, p.hidden, p.tokens, p.counted
    v = _cdiv(p.vocab, tp)
    shard = dataclasses.replace(p, vocab=v)
    spend = fused_wce_budget.budget_bytes(cpu=False, lean=lean)
    rows = min(fused_wce_budget.chunk_rows(v, 4 if lean else b, budget=spend, multiple=128), max(m, 1))
    slab = fused_wce_budget.slab_columns(m, v, rows, extra_rows=h)  # the fp32 [S, H] block counted as the plan does
    slabs = _cdiv(v, slab)
    buffer_rows = max(rows, _cdiv(m * slab, v))
    k = SUMMARIES_PER_TOKEN
    w_r = v * h * b
    phases = [
        Phase("gather counted rows", 0, n * h * b + m * h * b),
        _gemm("slice summaries: vocab_partials over the rank's rows", m, shard, w_r + m * h * b + k * m * 4),
        Phase("merge the W slices' summaries", 0, (tp + 1) * k * m * 4),
        _gemm("slabs: logits (cuBLAS, fp32 out)", m, shard, w_r + slabs * m * h * b + m * v * 4),
        Phase("slabs: logit_rows with the known lse (dlogits in place)", 0, m * v * 4 + m * v * b),
        _gemm("slabs: dW[slab] = dlogits^T @ X (fp32 out)", m, shard, m * v * b + slabs * m * h * b + v * h * 4),
        _gemm("slabs: dX += dlogits @ W[slab] (fp32)", m, shard, m * v * b + w_r + (2 * slabs - 1) * m * h * 4),
        Phase("dX fp32 -> input dtype, scatter to [N, H]", 0, m * h * (4 + b) + n * h * b),
        Phase("dW fp32 -> input dtype" + (" (per slab)" if lean else ""), 0, v * h * (4 + b)),
    ]
    stats = {"per-token stats": 7 * m * 4, "gathered hidden [M, H]": m * h * b}
    # lean: dW exists in the input dtype from the start, an fp32 [S, H] block per slab; else an fp32 [V/W, H]
    dw = {"dW [V/W, H]": v * h * b} if lean else {"dW fp32 [V/W, H]": v * h * 4}
    slab_dw = {"dW fp32 slab block [S, H]": slab * h * 4} if lean else {}
    live = {
        "slice summaries": {**stats, "summaries, gathered [W, k, M] fp32": (tp + 1) * k * m * 4,
                            **(dw if lean else {})},
        "slab loop": {**stats, "fp32 logits slab buffer": buffer_rows * v * 4, "dX fp32 [M, H]": m * h * 4, **dw,
                      **slab_dw},
        "dX all-reduced and cast": {**stats, "dX fp32 [M, H]": m * h * 4, "dX [M, H]": m * h * b,
                                    "dX [N, H]": n * h * b, **dw},
        "backward (casts)": {**dw, "dW [V/W, H]": v * h * b, "dX [N, H]": n * h * b},
    }
    comm = (all_gather_bytes(tp * k * m * 4, tp) + all_gather_bytes(tp * FINGERPRINT_BYTES, tp)
            + all_reduce_bytes(m * h * 4, tp))
    summary = f"V/W = {v} rows, {slabs} slabs of {slab}; all-gather {k} fp32/token, all-reduce dX fp32"
    name = "vocab_parallel_lean" if lean else "vocab_parallel"
    return Algorithm(name, summary, m, tuple(phases), live), comm


def gather_head_rank(p: Problem, tp: int) -> tuple[Algorithm, float]:
    """One rank that all-gathers the head and runs the one-process loss (default plan) on all of it."""
    whole = _fused_wce(p)
    gathered = {"gathered head [V, H]": p.vocab * p.hidden * p.dtype_bytes}
    phases = (Phase("all-gather: write the gathered head", 0, p.vocab * p.hidden * p.dtype_bytes), *whole.phases)
    live = {moment: {**gathered, **tensors} for moment, tensors in whole.live.items()}
    summary = f"all-gather [V, H], then {whole.summary} (every rank the whole loss)"
    return Algorithm("gather_head", summary, whole.rows, phases, live), all_gather_bytes(p.vocab * p.hidden
                                                                                          * p.dtype_bytes, tp)


PLANS = {"vocab_parallel": vocab_parallel_rank,
         "vocab_parallel_lean": lambda p, tp: vocab_parallel_rank(p, tp, lean=True),
         "gather_head": gather_head_rank}


def rank_plan(plan: str, model: str, tp: int, card: Card, tokens: int = TOKENS,
              counted_fraction: float = 1.0) -> RankPlan:
    hidden, vocab = MODELS[model]
    problem = Problem(f"{model}/N{tokens}/TP{tp}", hidden, vocab, tokens, round(tokens * counted_fraction))
    algorithm, comm = PLANS[plan](problem, tp)
    return RankPlan(plan, model, tp, predict_algorithm(algorithm, problem, card), comm, LINK_BYTES_PER_S[card.name])


def rank_plans(card: Card, models=tuple(MODELS), tps=TP_SIZES) -> list[RankPlan]:
    return [rank_plan(plan, model, tp, card) for model in models for tp in tps for plan in PLANS]


COLUMNS = ("model", "tp", "plan", "tflop_per_rank", "compute_ms", "comm_mib_per_rank", "comm_ms", "total_ms",
           "peak_mib", "peak_at")


def main(cards: list[str], out_dir: str) -> int:
    rows = [plan.row() | {"card": card} for card in cards for plan in rank_plans(CARDS[card])]
    table = markdown_table(rows, COLUMNS + ("card",))
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab_parallel.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "vocab_parallel.md"), "w") as file:
        file.write("# Vocabulary-parallel loss per rank vs gathering the head\n\nGenerated by "
                   "`python -m benchmarks roofline --vocab-parallel`; model in benchmarks/roofline_vocab_parallel.py."
                   f" bf16, N = {TOKENS} tokens all counted, trainable head.\n\n{table}\n")
    print(f"\nwrote {os.path.join(out_dir, 'vocab_parallel.md')} and {os.path.join(out_dir, 'vocab_parallel.csv')}")
    return 0
