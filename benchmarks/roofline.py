"""Roofline model of every benchmarked provider: FLOPs, minimum HBM bytes, predicted time and peak memory.

Pure Python (no torch, no GPU): a workload (H, V, N tokens, M counted, bytes per element, frozen head or not) and
a provider's *algorithm* give a list of phases (one kernel or GEMM each, summed over chunks) and the tensors alive
at the provider's memory peak. On a card with GEMM rate ``R`` and bandwidth ``B`` each phase takes
``max(flops / R, bytes / B)`` and the phases add up (they run one after another); the prediction is therefore a
lower bound that a measurement should approach, and every gap over 20% is explained in benchmarks/NOTES.md.

Conventions (docs/design.md, "Static report and roofline"):
- FLOPs: ``2 * rows * H * V`` per ``[rows, H] x [H, V]`` GEMM; ``rows`` is M (counted tokens) for providers that
  drop the others first (fused_wce, TRL, CCE) and N for those that do not (eager, torch.compile, torch's chunked
  op, Liger).
- Minimum HBM bytes: each operand read once per phase and each output written once (tile re-reads inside a GEMM
  are assumed to hit L2), plus the re-reads an algorithm forces by design: the weight once per chunk and per GEMM
  that reads it, an fp32 accumulator read and written once per chunk.
- Peak memory: bytes allocated by the loss beyond its inputs (hidden, weight, target, token weights), including
  the gradients it returns (``dX`` ``[N, H]``, ``dW`` ``[V, H]`` in the input dtype), at the worst moment.
- Loss variants (label smoothing, z-loss, softcap, logit scale, DFT; the suite's variant rows) are not modelled:
  they change no GEMM and no tensor alive at the peak, only add O(N V) elementwise work to the epilogues (a tanh per
  logit for the softcap, a row sum for smoothing), so a variant's prediction is its plain problem's.

API (for the benchmark suite)::

    from benchmarks.roofline import CARDS, PROVIDERS, Problem, predict, compare
    problem = Problem.of(workload)                  # any object with .shape.hidden/.vocab, .tokens, .n_counted,
                                                    # .dtype ("bfloat16"...) and optionally .frozen_head
    p = predict("fused_wce", problem, CARDS["H200"])    # Prediction: flops, hbm_bytes, time_s, peak_bytes, ...
    row = compare(p, measured_s=0.041, measured_peak_bytes=3.2e9)   # ratios and whether the gap is > 20%

``python -m benchmarks roofline [--card H200] [--out DIR]`` (or ``python -m benchmarks.roofline``) prints the
tables and writes roofline.md/.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass, field

from fused_wce import budget as fused_wce_budget

MIB = 2**20
GIB = 2**30
FUSED_WCE_VOCAB_TILE = 128  # summaries per row: one per 128-wide vocabulary tile (SM90 configs; sm_80: 64)
FUSED_WCE_ROW_BLOCK = 128  # rows per vocab_partials program (the GPU configs' block_m)
FUSED_WCE_GROUP_M = 8  # row blocks that share a vocabulary split's weight tiles (grouped program order)
FUSED_WCE_SMS = 132  # streaming multiprocessors of an H100/H200 (the stats pass sizes its vocabulary split by it)
TRL_TOKEN_CHUNK = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE (TRL 1.16)
GAP_THRESHOLD = 0.20  # a measurement this much above (or below) its prediction needs an explanation in NOTES.md


@dataclass(frozen=True)
class Card:
    """A GPU: dense GEMM rates in FLOP/s (bf16/fp16 tensor cores, fp32 without TF32), HBM bandwidth in B/s."""

    name: str
    gemm_flops: float
    hbm_bytes_per_s: float
    memory_bytes: float
    fp32_flops: float
    source: str


CARDS = {
    "H200": Card("H200", 790e12, 4.3e12, 141e9, 67e12,
                 "measured: bf16 GEMM 790 TFLOP/s, copy 4.3 TB/s (shared/peers.md); fp32 datasheet"),
    "H100": Card("H100 SXM", 989e12, 3.35e12, 80e9, 67e12, "datasheet (dense bf16 989 TFLOP/s, 3.35 TB/s)"),
    "A100": Card("A100 SXM", 312e12, 2.04e12, 80e9, 19.5e12, "datasheet (dense bf16 312 TFLOP/s, 2.04 TB/s)"),
}

# The benchmark suite's LM-head shapes (benchmarks/workloads.py SHAPES): name -> (H, V).
MODELS = {
    "Llama-3.2-1B": (2048, 128256),
    "Llama-3-8B": (4096, 128256),
    "Qwen2.5-7B": (3584, 152064),
    "Gemma-2-2B": (2304, 256000),
    "V262k-4B": (2560, 262144),
}
TOKEN_COUNTS = (4096, 8192, 16384, 32768)
COUNTED_FRACTIONS = (1.0, 0.5)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Problem:
    """One loss problem: ``tokens`` (N) rows of hidden size H, vocabulary V, ``counted`` (M <= N) of them counted;
    ``dtype_bytes`` per element of hidden/weight; ``frozen_head``: the weight needs no gradient; ``device``:
    ``"cuda"`` or ``"cpu"`` (only the budgets differ: the card's rates model a GPU)."""

    name: str
    hidden: int
    vocab: int
    tokens: int
    counted: int
    dtype_bytes: int = 2
    frozen_head: bool = False
    device: str = "cuda"

    def __post_init__(self):
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if not 0 <= self.counted <= self.tokens:
            raise ValueError(f"counted must be in [0, tokens], got {self.counted} of {self.tokens}")
        if min(self.hidden, self.vocab, self.tokens) < 1 or self.dtype_bytes not in (2, 4):
            raise ValueError(f"bad problem {self}")

    @classmethod
    def of(cls, workload) -> "Problem":
        """From a benchmark-suite workload (benchmarks.workloads.Workload) or anything shaped like one."""
        return cls(name=getattr(workload, "name", "workload"), hidden=workload.shape.hidden,
                   vocab=workload.shape.vocab, tokens=workload.tokens, counted=workload.n_counted,
                   dtype_bytes=_DTYPE_BYTES[str(workload.dtype).replace("torch.", "")],
                   frozen_head=bool(getattr(workload, "frozen_head", False)))

    @classmethod
    def model(cls, model: str, tokens: int, counted_fraction: float, frozen_head: bool = False) -> "Problem":
        hidden, vocab = MODELS[model]
        name = f"{model}/N{tokens}/{round(counted_fraction * 100)}pct/bfloat16" + ("/frozen-head" if frozen_head else "")
        return cls(name, hidden, vocab, tokens, round(tokens * counted_fraction), 2, frozen_head)


def problems(models=tuple(MODELS), token_counts=TOKEN_COUNTS, fractions=COUNTED_FRACTIONS) -> list[Problem]:
    """The suite's GPU grid: every model x N x counted fraction, bf16, trainable head."""
    return [Problem.model(m, n, f) for m in models for n in token_counts for f in fractions]


@dataclass(frozen=True)
class Phase:
    """One kernel (or GEMM) summed over chunks: ``flops`` at ``rate`` ("gemm" or "fp32"), ``bytes`` of HBM."""

    name: str
    flops: float
    bytes: float
    rate: str = "gemm"

    def seconds(self, card: Card) -> float:
        flops_per_s = card.gemm_flops if self.rate == "gemm" else card.fp32_flops
        return max(self.flops / flops_per_s, self.bytes / card.hbm_bytes_per_s)


@dataclass(frozen=True)
class Algorithm:
    """What a provider does on a problem: ``phases`` in order, and ``live`` = the tensors alive at each candidate
    memory peak (name -> {tensor: bytes}); the peak is the largest of those sums."""

    provider: str
    summary: str
    rows: int  # tokens the GEMMs run on (N or M)
    phases: tuple[Phase, ...]
    live: dict = field(default_factory=dict)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    @property
    def hbm_bytes(self) -> float:
        return sum(p.bytes for p in self.phases)

    def peak(self) -> tuple[str, float, dict]:
        moment, tensors = max(self.live.items(), key=lambda item: sum(item[1].values()))
        return moment, float(sum(tensors.values())), tensors


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gemm(name: str, rows: int, p: Problem, extra_bytes: float, rate: str = "gemm") -> Phase:
    return Phase(name, 2.0 * rows * p.hidden * p.vocab, extra_bytes, rate)


# --- providers -----------------------------------------------------------------------------------------------------
# fused_wce's chunk and slab sizes come from fused_wce.budget, the policy the package itself runs.
def _fused_wce_rows(p: Problem, lean: bool) -> int:
    """Rows per chunk of the Triton path (both logits plans): the budget's [C, V] in the input dtype; in lean
    mode (the cuBLAS plan) the quarter budget's [C, V] in fp32."""
    spend = fused_wce_budget.budget_bytes(cpu=False, lean=lean)
    bytes_per_element = 4 if lean else p.dtype_bytes
    return min(fused_wce_budget.chunk_rows(p.vocab, bytes_per_element, budget=spend, multiple=128), max(p.counted, 1))


def _fused_wce_chunk_phases(p: Problem, chunks: int, plan: str, prefix: str = "",
                            known_lse: bool = False) -> list[Phase]:
    """The Triton path's chunk loop up to dX, for the logits plan ``plan``: "cublas" (fp32 logits from a cuBLAS
    GEMM, logit_rows reads each row twice and writes dlogits in place) or "tiled" (vocab_partials stores
    tile-relative logits in the input dtype, combine, softmax_grad in place). ``known_lse``: the rows' lse is
    given (the log-prob backward): logit_rows reads each row once, the tiled plan has no combine."""
    b, h, v, n, m = p.dtype_bytes, p.hidden, p.vocab, p.tokens, p.counted
    w = v * h * b
    phases = [Phase(f"{prefix}gather counted rows", 0, n * h * b + m * h * b)]
    if plan == "cublas":
        logits32 = m * v * 4
        reads = 1 if known_lse else 2
        phases += [
            _gemm(f"{prefix}logits = X @ W^T (cuBLAS, fp32 out)", m, p, chunks * w + m * h * b + logits32),
            Phase(f"{prefix}logit_rows ({'one read' if known_lse else 'two reads'}, dlogits in place)", 0,
                  reads * logits32 + m * v * b),
        ]
    else:
        tiles = _cdiv(v, FUSED_WCE_VOCAB_TILE)
        summaries = 3 * m * tiles * 4
        logits = m * v * b
        phases.append(_gemm(f"{prefix}vocab_partials (logits + online lse)", m, p,
                            chunks * w + m * h * b + logits + summaries))
        if not known_lse:
            phases.append(Phase(f"{prefix}combine", 0, summaries))
        phases.append(Phase(f"{prefix}softmax_grad (in place)", 0, 2 * logits + m * tiles * 4))
    phases.append(_gemm(f"{prefix}dX = dlogits @ W", m, p, m * v * b + chunks * w + m * h * b))
    return phases


def _chunk_buffers(p: Problem, chunk: int, plan: str) -> dict:
    if plan == "cublas":
        return {"fp32 logits chunk [C, V]": chunk * p.vocab * 4}
    return {"logits chunk [C, V]": chunk * p.vocab * p.dtype_bytes,
            "tile summaries": 3 * chunk * _cdiv(p.vocab, FUSED_WCE_VOCAB_TILE) * 4}


def _fused_wce_gradient_pass(p: Problem, plan: str, prefix: str = "", known_lse: bool = False
                             ) -> tuple[int, int, list[Phase], dict]:
    """The gradient pass over M counted rows: per chunk of C rows the plan's dlogits and the dX and dW GEMMs, then
    dW's cast and dX's scatter. Returns (chunk rows, chunks, phases, tensors alive at its two peaks)."""
    b, h, v, n, m = p.dtype_bytes, p.hidden, p.vocab, p.tokens, p.counted
    chunk = _fused_wce_rows(p, lean=False)
    chunks = _cdiv(m, chunk) if m else 0
    phases = _fused_wce_chunk_phases(p, chunks, plan, prefix, known_lse)
    if not p.frozen_head:  # cuBLAS, fp32 output: the first chunk writes dW, later chunks read and write it
        phases.append(_gemm(f"{prefix}dW += dlogits^T @ X (fp32)", m, p,
                            m * v * b + m * h * b + v * h * 4 * max(2 * chunks - 1, 0)))
        phases.append(Phase(f"{prefix}dW fp32 -> input dtype", 0, v * h * (4 + b)))
    phases.append(Phase(f"{prefix}scatter dX to [N, H]", 0, n * h * b + m * h * b))
    dw32 = {} if p.frozen_head else {"dW fp32": v * h * 4}
    live = {
        "chunk loop": {**_chunk_buffers(p, chunk, plan), "gathered hidden [M, H]": m * h * b,
                       "dX [M, H]": m * h * b, **dw32, "per-token stats": 6 * m * 4},
        "casts": {**dw32, "dW": 0 if p.frozen_head else v * h * b, "dX [M, H]": m * h * b,
                  "dX [N, H]": n * h * b},
    }
    return chunk, chunks, phases, live


def _fused_wce(p: Problem, plan: str = "cublas") -> Algorithm:
    """Gradients in forward (reduced loss): per chunk of C counted rows, the plan's dlogits, then the dX and dW
    GEMMs; backward scatters dX and casts dW (docs/design.md)."""
    chunk, chunks, phases, live = _fused_wce_gradient_pass(p, plan)
    live = {"forward (chunk loop)": live["chunk loop"], "backward (casts)": live["casts"]}
    name = "fused_wce" if plan == "cublas" else "fused_wce_tiled"
    return Algorithm(name, f"{plan} logits, grad in forward on M counted rows, {chunks} chunks of {chunk}", p.counted,
                     tuple(phases), live)


def _fused_wce_log_prob(p: Problem, stats_plan: str = "tiled") -> Algorithm:
    """fused_wce.linear_log_prob with both outputs differentiated: the forward is the statistics-only pass, the
    backward one gradient pass given the forward's lse and entropy (the default cuBLAS plan, logit_rows reading
    each fp32 row once): 8 M H V FLOPs. ``stats_plan`` "tiled" (the default): vocab_partials over all M rows,
    the vocabulary split so that ~4 programs per SM run, grouped program order, then combine; "cublas"
    (``logits_gemm="cublas"``): per chunk of the budget's fp32 [C, V], cuBLAS logits and one logit_rows read."""
    b, h, v, n, m = p.dtype_bytes, p.hidden, p.vocab, p.tokens, p.counted
    forward, forward_live, forward_summary = (_cublas_statistics(p) if stats_plan == "cublas" else
                                              _tiled_statistics(p))
    chunk, chunks, backward, live = _fused_wce_gradient_pass(p, "cublas", prefix="backward: ", known_lse=True)
    live = {"forward": {"gathered hidden [M, H]": m * h * b, **forward_live, "outputs": 3 * n * 4},
            "backward (chunk loop)": live["chunk loop"], "backward (casts)": live["casts"]}
    phases = [Phase("forward: gather counted rows", 0, n * h * b + m * h * b), *forward,
              Phase("forward: scatter outputs", 0, 6 * n * 4)]
    name = "fused_wce_log_prob" if stats_plan == "tiled" else "fused_wce_log_prob_cublas"
    return Algorithm(name, f"{forward_summary}, then one gradient pass with the known lse: {chunks} chunks of {chunk}",
                     m, tuple(phases + backward), live)


def _tiled_statistics(p: Problem) -> tuple[list[Phase], dict, str]:
    """The register-tiled statistics pass: its phases, tensors alive, summary."""
    b, h, v, m = p.dtype_bytes, p.hidden, p.vocab, p.counted
    tiles = _cdiv(v, FUSED_WCE_VOCAB_TILE)
    row_blocks = _cdiv(m, FUSED_WCE_ROW_BLOCK) if m else 0
    splits = min(tiles, _cdiv(4 * FUSED_WCE_SMS, max(row_blocks, 1)))
    # Grouped program order: the GROUP_M row blocks that run together share each split's weight tiles and (across
    # splits) their hidden rows in L2, so the weight is read once per group and the hidden states once.
    weight_reads = _cdiv(row_blocks, FUSED_WCE_GROUP_M)
    summaries = 3 * splits * m * 4
    phases = [_gemm("forward: vocab_partials (statistics only)", m, p,
                    weight_reads * v * h * b + m * h * b + summaries),
              Phase("forward: combine", 0, summaries)]
    return phases, {"summaries": summaries}, f"statistics pass ({splits} splits)"


def _cublas_statistics(p: Problem) -> tuple[list[Phase], dict, str]:
    """The statistics pass on cuBLAS logits: per chunk of the budget's fp32 [C, V], one GEMM with fp32 output
    and one logit_rows read of each row."""
    b, h, v, m = p.dtype_bytes, p.hidden, p.vocab, p.counted
    spend = fused_wce_budget.budget_bytes(cpu=False, lean=False)
    chunk = min(fused_wce_budget.chunk_rows(v, 4, budget=spend, multiple=128), max(m, 1))
    chunks = _cdiv(m, chunk) if m else 0
    logits32 = m * v * 4
    phases = [_gemm("forward: logits = X @ W^T (cuBLAS, fp32 out)", m, p, chunks * v * h * b + m * h * b + logits32),
              Phase("forward: logit_rows (one read, statistics)", 0, logits32 + 6 * m * 4)]
    return phases, {"fp32 logits chunk [C, V]": chunk * v * 4}, f"cuBLAS statistics ({chunks} chunks of {chunk})"


def _fused_wce_lean(p: Problem) -> Algorithm:
    """lean_memory=True (default cuBLAS plan): the chunk loop without its dW GEMM (chunks of a quarter budget),
    then per vocabulary slab of S columns over all M rows: cuBLAS recomputes the slab's fp32 logits, logit_rows
    writes dlogits with the known lse, dW[slab] = dlogits^T @ X into an fp32 [S, H] block rounded once into the
    input dtype (docs/design.md). No fp32 [V, H]; 8 M H V FLOPs."""
    b, h, v, n, m = p.dtype_bytes, p.hidden, p.vocab, p.tokens, p.counted
    if p.frozen_head:  # lean mode only changes the weight gradient: without one it is the default plan
        algo = _fused_wce(p)
        return Algorithm("fused_wce_lean", algo.summary, algo.rows, algo.phases, algo.live)
    chunk = _fused_wce_rows(p, lean=True)
    chunks = _cdiv(m, chunk) if m else 0
    slab = fused_wce_budget.slab_columns(m, v, chunk, extra_rows=h)
    slabs = _cdiv(v, slab)
    w, logits32 = v * h * b, m * v * 4
    phases = _fused_wce_chunk_phases(p, chunks, "cublas", prefix="chunks: ") + [
        _gemm("slabs: logits (cuBLAS, fp32 out)", m, p, w + slabs * m * h * b + logits32),
        Phase("slabs: logit_rows (dlogits in place)", 0, logits32 + m * v * b),
        _gemm("slabs: dW[slab] = dlogits^T @ X (fp32 out)", m, p, m * v * b + slabs * m * h * b + v * h * 4),
        Phase("slabs: dW fp32 block -> input dtype", 0, v * h * (4 + b)),
        Phase("scatter dX to [N, H]", 0, n * h * b + m * h * b),
    ]
    common = {"gathered hidden [M, H]": m * h * b, "dX [M, H]": m * h * b, "dW": w, "per-token stats": 7 * m * 4}
    live = {
        "chunk loop": {"fp32 logits chunk [C, V]": chunk * v * 4, **common},
        "slab loop": {"fp32 logits slab [M, S]": m * slab * 4, "dW slab fp32 [S, H]": slab * h * 4, **common},
        "backward (scatter)": {"dW": w, "dX [M, H]": m * h * b, "dX [N, H]": n * h * b},
    }
    return Algorithm("fused_wce_lean", f"{chunks} chunks of {chunk}, then {slabs} vocabulary slabs of {slab}", m,
                     tuple(phases), live)


def _fused_wce_torch(p: Problem) -> Algorithm:
    """fused_wce(backend="torch"): fp32 [C, B] blocks, two passes (statistics, then gradients with the logits
    recomputed), fp32 GEMMs on blocks upcast on use: 8 M H V FLOPs, dW rows written once per block."""
    b, h, v, n, m = p.dtype_bytes, p.hidden, p.vocab, p.tokens, p.counted
    spend = fused_wce_budget.budget_bytes(cpu=p.device == "cpu", lean=False)
    rows, columns = fused_wce_budget.block_shape(max(m, 1), v, h, budget=spend, weight_upcast=b != 4, lean=False)
    blocks = _cdiv(v, columns)
    chunks = _cdiv(m, rows) if m else 0
    w32, logits32 = v * h * 4, m * v * 4
    phases = [Phase("gather counted rows", 0, n * h * b + m * h * b),
              _gemm("pass 1: logits (fp32)", m, p, chunks * (w32 + v * h * b) + m * h * 4 + logits32, rate="fp32"),
              Phase("pass 1: online summaries", 0, 3 * logits32),
              _gemm("pass 2: logits again (fp32)", m, p, w32 + v * h * b + blocks * m * h * 4 + logits32,
                    rate="fp32"),
              Phase("pass 2: dlogits", 0, 3 * logits32),
              _gemm("pass 2: dX (fp32)", m, p, logits32 + w32 + blocks * m * h * 4 * 2, rate="fp32")]
    if not p.frozen_head:
        phases.append(_gemm("pass 2: dW (fp32)", m, p, logits32 + blocks * m * h * 4 + w32, rate="fp32"))
    dw32 = {} if p.frozen_head else {"dW fp32": w32}
    live = {"pass 2": {"two fp32 [C, B] blocks": 2 * rows * columns * 4,
                       "weight block fp32": columns * h * 4 if b != 4 else 0,
                       **dw32, "dX fp32 [M, H]": m * h * 4, "gathered hidden": m * h * b},
            "backward": {**dw32, "dW": 0 if p.frozen_head else v * h * b, "dX [N, H]": n * h * b,
                         "dX [M, H]": m * h * b}}
    return Algorithm("fused_wce[torch]", f"fp32 blocks of {rows} x {columns}, two passes", m, tuple(phases), live)


def _materialised_log_softmax(p: Problem, name: str, summary: str, between: list[Phase], live: dict) -> Algorithm:
    """Logits [N, V] in the input dtype, upcast, log_softmax, the phases ``between`` (what is computed from the
    log-probs and its backward), log_softmax_backward, the gradient's cast and the dX / dW GEMMs, on all N rows;
    ``live`` adds the caller's peaks to the GEMMs' one."""
    b, h, v, n = p.dtype_bytes, p.hidden, p.vocab, p.tokens
    nv = n * v
    phases = [_gemm("logits = X @ W^T", n, p, v * h * b + n * h * b + nv * b),
              Phase("upcast to fp32", 0, nv * (b + 4)),
              Phase("log_softmax", 0, nv * 8),
              *between,
              Phase("log_softmax_backward", 0, nv * 12),
              Phase("grad cast to input dtype", 0, nv * (4 + b)),
              _gemm("dX = dlogits @ W", n, p, nv * b + v * h * b + n * h * b)]
    if not p.frozen_head:
        phases.append(_gemm("dW = dlogits^T @ X", n, p, nv * b + n * h * b + v * h * b))
    live = {**live, "backward (GEMMs)": {"logits grad fp32": nv * 4, "logits grad": nv * b, "dX": n * h * b,
                                         "dW": 0 if p.frozen_head else v * h * b}}
    return Algorithm(name, summary, n, tuple(phases), live)


def _torch_eager(p: Problem) -> Algorithm:
    """benchmarks.providers.eager_loss: bf16 logits [N, V], .float(), F.cross_entropy(reduction="none"), autograd.
    Every row runs (ignored rows are masked in the loss, not skipped)."""
    nv = p.tokens * p.vocab
    live = {"forward (log_softmax)": {"fp32 logits": nv * 4, "log-probs fp32": nv * 4},
            "backward (log_softmax_backward)": {"log-probs fp32": nv * 4, "nll grad fp32": nv * 4,
                                                "logits grad fp32": nv * 4}}
    return _materialised_log_softmax(p, "torch_eager", "materialised [N, V] logits, fp32 upcast, all N rows",
                                     [Phase("nll_loss_backward (dense)", 0, nv * 4)], live)


def _torch_compile(p: Problem) -> Algorithm:
    """The eager loss under torch.compile: Inductor fuses the upcast, log-softmax and NLL into one reduction and the
    backward into one elementwise kernel; one fp32 [N, V] tensor stays (CCE's published 16 GB at 2.1e9 logits,
    7.6 bytes per logit, shows it)."""
    b, h, v, n = p.dtype_bytes, p.hidden, p.vocab, p.tokens
    nv = n * v
    phases = [_gemm("logits = X @ W^T", n, p, v * h * b + n * h * b + nv * b),
              Phase("fused upcast + log_softmax + nll", 0, nv * (b + 4)),
              Phase("fused softmax backward", 0, nv * (4 + b)),
              _gemm("dX = dlogits @ W", n, p, nv * b + v * h * b + n * h * b)]
    if not p.frozen_head:
        phases.append(_gemm("dW = dlogits^T @ X", n, p, nv * b + n * h * b + v * h * b))
    live = {"backward": {"logits": nv * b, "fp32 saved for backward": nv * 4, "logits grad": nv * b,
                         "dX": n * h * b, "dW": 0 if p.frozen_head else v * h * b}}
    return Algorithm("torch_compile", "fused elementwise kernels around [N, V] logits, all N rows", n,
                     tuple(phases), live)


def _torch_chunked(p: Problem) -> Algorithm:
    """torch 2.13 F.linear_cross_entropy(options=LinearCrossEntropyOptions()) with reduction="none" (the suite's
    call): chunks of next_pow2(ceil(N / ceil(V / H))) / 2 rows (CUDA bf16 auto: "aspect_ratio:2", "compact");
    the forward keeps only the logsumexp and the backward recomputes each chunk (8 N H V on all rows); dW
    accumulates with addmm_ into the input dtype (fp32 inside cuBLAS)."""
    b, h, v, n = p.dtype_bytes, p.hidden, p.vocab, p.tokens
    chunk = max(1, _next_pow2(_cdiv(n, _cdiv(v, h))) // 2)
    chunks = _cdiv(n, chunk)
    w, nv = v * h * b, n * v
    phases = [_gemm("forward logits", n, p, chunks * w + n * h * b + nv * b),
              Phase("forward logsumexp (fp32)", 0, nv * b),
              _gemm("backward recompute logits", n, p, chunks * w + n * h * b + nv * b),
              Phase("softmax grad", 0, 2 * nv * b),
              _gemm("dX", n, p, nv * b + chunks * w + n * h * b)]
    if not p.frozen_head:
        phases.append(_gemm("dW addmm_", n, p, nv * b + n * h * b + 2 * chunks * w))
    live = {"backward chunk": {"logits chunk": chunk * v * b, "fp32 softmax chunk": chunk * v * 4,
                               "dX": n * h * b, "dW": 0 if p.frozen_head else w}}
    return Algorithm("torch_chunked", f"recompute backward, all N rows, {chunks} chunks of {chunk}", n,
                     tuple(phases), live)


def _trl(p: Problem, name: str = "trl_chunked") -> Algorithm:
    """TRL 1.16 ChunkedLogProbFunction on the labelled rows: cuBLAS [4096, 32768] bf16 tiles, Triton fold;
    backward recomputes every tile (8 M H V) and accumulates dX and dW in fp32 with addmm."""
    b, h, v, n, m = p.dtype_bytes, p.hidden, p.vocab, p.tokens, p.counted
    token_chunks = _cdiv(m, TRL_TOKEN_CHUNK) if m else 0
    vocab_chunks = _cdiv(v, TRL_VOCAB_CHUNK)
    w, mv = v * h * b, m * v
    phases = [Phase("gather labelled rows", 0, n * h * b + m * h * b),
              _gemm("forward tiles", m, p, token_chunks * w + m * h * b + mv * b),
              Phase("forward fold (online lse)", 0, mv * b),
              _gemm("backward recompute tiles", m, p, token_chunks * w + m * h * b + mv * b),
              Phase("backward grad tile", 0, 2 * mv * b),
              _gemm("dX += tile @ W (fp32)", m, p, mv * b + token_chunks * w + 2 * vocab_chunks * m * h * 4)]
    if not p.frozen_head:
        phases.append(_gemm("dW += tile^T @ X (fp32)", m, p, mv * b + m * h * b + 2 * token_chunks * v * h * 4))
        phases.append(Phase("dW fp32 -> input dtype", 0, v * h * (4 + b)))
    phases.append(Phase("dX fp32 -> input dtype, scatter", 0, m * h * (4 + b) + n * h * b))
    tile = min(m, TRL_TOKEN_CHUNK) * min(v, TRL_VOCAB_CHUNK) * b
    dw32 = {} if p.frozen_head else {"dW fp32": v * h * 4}
    live = {"backward": {"tile buffer": tile, "dX fp32 [M, H]": m * h * 4, **dw32, "gathered hidden": m * h * b},
            "casts": {**dw32, "dW": 0 if p.frozen_head else w, "dX [M, H]": m * h * b, "dX [N, H]": n * h * b,
                      "gathered hidden": m * h * b}}
    return Algorithm(name, f"recompute backward on M rows, {token_chunks} x {vocab_chunks} tiles", m,
                     tuple(phases), live)


def _torch_log_softmax(p: Problem) -> Algorithm:
    """benchmarks.providers' naive log-probs: bf16 logits [N, V], .float(), log_softmax, gather, entropy
    ``-(exp(log p) * log p).sum()``, autograd. Every row runs."""
    nv = p.tokens * p.vocab
    live = {"forward (entropy)": {"log-probs fp32": nv * 4, "probs fp32": nv * 4, "product fp32": nv * 4},
            "backward (entropy, log_softmax)": {"log-probs fp32": nv * 4, "probs fp32": nv * 4,
                                                "grad of log-probs fp32": nv * 4, "logits grad fp32": nv * 4}}
    between = [Phase("entropy: exp, product, sum", 0, nv * 20), Phase("entropy backward", 0, nv * 16)]
    return _materialised_log_softmax(p, "torch_log_softmax", "materialised [N, V] logits, fp32 log_softmax and "
                                     "entropy, all N rows", between, live)


def _liger(p: Problem, fp32_accumulation: bool) -> Algorithm:
    """Liger-Kernel fused linear CE: chunks of next_pow2(ceil(N / ceil(V / H))) rows (all N rows); per chunk cuBLAS
    logits, a Triton row kernel writing dlogits in place, cuBLAS dX; dW accumulated per chunk in the weight dtype
    (default) or fp32 (accum_dtype=float32)."""
    b, h, v, n = p.dtype_bytes, p.hidden, p.vocab, p.tokens
    chunk = _next_pow2(_cdiv(n, _cdiv(v, h)))
    chunks = _cdiv(n, chunk)
    w, nv = v * h * b, n * v
    acc = 4 if fp32_accumulation else b
    phases = [_gemm("chunk logits", n, p, chunks * w + n * h * b + nv * b),
              Phase("row kernel: loss, dlogits in place", 0, 2 * nv * b),
              _gemm("dX = dlogits @ W", n, p, nv * b + chunks * w + n * h * b)]
    if not p.frozen_head:
        phases.append(_gemm("dW += dlogits^T @ X", n, p, nv * b + n * h * b + 2 * chunks * v * h * acc))
        if fp32_accumulation:
            phases.append(Phase("dW fp32 -> input dtype", 0, v * h * (4 + b)))
    dw = {} if p.frozen_head else {"dW accumulator": v * h * acc}
    live = {"forward (chunk loop)": {"logits chunk": chunk * v * b, **dw, "dX": n * h * b, "loss per row": n * 4},
            "cast": {**dw, "dW": v * h * b if fp32_accumulation and not p.frozen_head else 0, "dX": n * h * b}}
    name = "liger_fp32acc" if fp32_accumulation else "liger"
    return Algorithm(name, f"grad in forward, all N rows, {chunks} chunks of {chunk}", n, tuple(phases), live)


def _cce(p: Problem, exact: bool) -> Algorithm:
    """Cut Cross-Entropy on the non-ignored rows: forward tiles into an fp32 accumulator and a per-row LSE; backward
    recomputes each tile and accumulates dE and dC (8 M H V). impl="cce" skips tiles whose gradient is below
    bf16 eps / 32 (data-dependent, not modelled: its prediction is the unfiltered upper bound)."""
    b, h, v, n, m = p.dtype_bytes, p.hidden, p.vocab, p.tokens, p.counted
    w = v * h * b
    phases = [Phase("gather rows", 0, n * h * b + m * h * b),
              _gemm("forward: logits tiles + LSE", m, p, w + m * h * b + m * 4),
              _gemm("backward: recompute tiles", m, p, w + m * h * b + m * 4),
              _gemm("backward: dE", m, p, m * h * b)]
    if not p.frozen_head:
        phases.append(_gemm("backward: dC", m, p, w))
    live = {"backward": {"dE [M, H]": m * h * b, "dE [N, H]": n * h * b, "dC": 0 if p.frozen_head else w,
                         "LSE": m * 4}}
    note = "no gradient filtering" if exact else "gradient filtering not modelled (upper bound)"
    return Algorithm("cce_exact" if exact else "cce", f"recompute backward on M rows, {note}", m,
                     tuple(phases), live)


PROVIDERS = {
    "fused_wce": _fused_wce,
    "fused_wce_tiled": lambda p: _fused_wce(p, plan="tiled"),
    "fused_wce_lean": _fused_wce_lean,
    "fused_wce[torch]": _fused_wce_torch,
    "torch_eager": _torch_eager,
    "torch_compile": _torch_compile,
    "torch_chunked": _torch_chunked,
    "trl_chunked": _trl,
    "liger": lambda p: _liger(p, fp32_accumulation=False),
    "liger_fp32acc": lambda p: _liger(p, fp32_accumulation=True),
    "cce": lambda p: _cce(p, exact=False),
    "cce_exact": lambda p: _cce(p, exact=True),
    # The log-prob workloads (objective "log_prob"): TRL's GRPO head runs the same function as its SFT head.
    "fused_wce_log_prob": _fused_wce_log_prob,
    "fused_wce_log_prob_cublas": lambda p: _fused_wce_log_prob(p, stats_plan="cublas"),
    "trl_chunked_log_prob": lambda p: _trl(p, name="trl_chunked_log_prob"),
    "torch_log_softmax": _torch_log_softmax,
}


def algorithm(provider: str, problem: Problem) -> Algorithm:
    try:
        return PROVIDERS[provider](problem)
    except KeyError:
        raise ValueError(f"provider: unknown {provider!r}; known: {sorted(PROVIDERS)}") from None


@dataclass(frozen=True)
class Prediction:
    provider: str
    problem: Problem
    card: Card
    summary: str
    flops: float
    hbm_bytes: float
    compute_s: float  # all FLOPs at the card's rate (no memory)
    memory_s: float  # all bytes at the card's bandwidth (no compute)
    time_s: float  # sum over phases of max(compute, memory)
    peak_bytes: float
    peak_moment: str
    peak_tensors: dict
    phase_times: tuple  # (name, seconds, bound)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def row(self) -> dict:
        return {"provider": self.provider, "workload": self.problem.name, "card": self.card.name,
                "hidden": self.problem.hidden, "vocab": self.problem.vocab, "tokens": self.problem.tokens,
                "counted": self.problem.counted, "tflop": round(self.flops / 1e12, 3),
                "hbm_gb": round(self.hbm_bytes / 1e9, 2), "compute_ms": round(self.compute_s * 1e3, 2),
                "memory_ms": round(self.memory_s * 1e3, 2), "predicted_ms": round(self.time_s * 1e3, 2),
                "bound": self.bound, "peak_mib": round(self.peak_bytes / MIB, 1), "peak_at": self.peak_moment,
                "algorithm": self.summary}


def predict(provider: str, problem: Problem, card: Card) -> Prediction:
    return predict_algorithm(algorithm(provider, problem), problem, card)


def predict_algorithm(algo: Algorithm, problem: Problem, card: Card) -> Prediction:
    """The prediction of any :class:`Algorithm` (a provider's, or one rank's of a tensor-parallel loss)."""
    moment, peak, tensors = algo.peak()
    phase_times = tuple((ph.name, ph.seconds(card),
                         "compute" if ph.flops / (card.gemm_flops if ph.rate == "gemm" else card.fp32_flops)
                         >= ph.bytes / card.hbm_bytes_per_s else "memory") for ph in algo.phases)
    compute = sum(ph.flops / (card.gemm_flops if ph.rate == "gemm" else card.fp32_flops) for ph in algo.phases)
    return Prediction(algo.provider, problem, card, algo.summary, algo.flops, algo.hbm_bytes, compute,
                      algo.hbm_bytes / card.hbm_bytes_per_s, sum(t for _, t, _ in phase_times), peak, moment,
                      tensors, phase_times)


def compare(prediction: Prediction, measured_s: float | None = None,
            measured_peak_bytes: float | None = None) -> dict:
    """The prediction's row with measured values beside it: ``time_ratio`` = measured / predicted (>= 1 expected:
    the model is a lower bound), ``memory_ratio`` likewise; ``needs_note`` when either is off by more than 20%."""
    row = prediction.row()
    row["measured_ms"] = None if measured_s is None else round(measured_s * 1e3, 2)
    row["time_ratio"] = None if measured_s is None else round(measured_s / prediction.time_s, 3)
    row["measured_peak_mib"] = None if measured_peak_bytes is None else round(measured_peak_bytes / MIB, 1)
    row["memory_ratio"] = (None if measured_peak_bytes is None or prediction.peak_bytes == 0
                           else round(measured_peak_bytes / prediction.peak_bytes, 3))
    row["needs_note"] = any(r is not None and abs(r - 1.0) > GAP_THRESHOLD
                            for r in (row["time_ratio"], row["memory_ratio"]))
    return row


def predict_all(problem_list=None, providers=tuple(PROVIDERS), cards=("H200",)) -> list[Prediction]:
    problem_list = problems() if problem_list is None else problem_list
    return [predict(name, problem, CARDS[card]) for card in cards for problem in problem_list for name in providers]


COLUMNS = ("provider", "workload", "card", "tflop", "hbm_gb", "compute_ms", "memory_ms", "predicted_ms", "bound",
           "peak_mib", "peak_at", "algorithm")


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |"
              for row in rows]
    return "\n".join(lines)


def phase_table(prediction: Prediction) -> str:
    lines = ["| phase | ms | bound |", "|---|---|---|"]
    lines += [f"| {name} | {seconds * 1e3:.2f} | {bound} |" for name, seconds, bound in prediction.phase_times]
    return "\n".join(lines)


def write_outputs(predictions: list[Prediction], out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    rows = [p.row() for p in predictions]
    csv_path = os.path.join(out_dir, "roofline.csv")
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md_path = os.path.join(out_dir, "roofline.md")
    cards = sorted({p.card.name for p in predictions})
    with open(md_path, "w") as file:
        file.write("# Roofline predictions\n\nGenerated by `python -m benchmarks.roofline`; model and conventions in "
                   "docs/design.md (\"Static report and roofline\"). Cards:\n\n")
        for card in CARDS.values():
            if card.name in cards:
                file.write(f"- {card.name}: {card.source}\n")
        file.write("\n" + markdown_table(rows) + "\n")
    return md_path, csv_path


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks.roofline") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--card", action="append", choices=sorted(CARDS),
                        help="card(s) to predict for (default: H200)")
    parser.add_argument("--provider", action="append", choices=sorted(PROVIDERS), help="default: all")
    parser.add_argument("--out", default="bench_out", help="writes roofline.md and roofline.csv here")
    parser.add_argument("--phases", action="store_true", help="also print each prediction's phases")
    parser.add_argument("--vocab-parallel", action="store_true",
                        help="instead: the vocabulary-parallel loss per rank against gathering the head, at TP 2/4/8 "
                             "(benchmarks/roofline_vocab_parallel.py); writes vocab_parallel.md/.csv")
    args = parser.parse_args(argv)
    if args.vocab_parallel:
        from .roofline_vocab_parallel import main as vocab_parallel_main

        return vocab_parallel_main(args.card or ["H200"], args.out)
    predictions = predict_all(providers=args.provider or tuple(PROVIDERS), cards=args.card or ("H200",))
    print(markdown_table([p.row() for p in predictions]))
    if args.phases:
        for p in predictions:
            print(f"\n{p.provider} on {p.problem.name} ({p.card.name}):\n{phase_table(p)}")
    md_path, csv_path = write_outputs(predictions, args.out)
    print(f"\nwrote {md_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
