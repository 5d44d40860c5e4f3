"""How many tokens (or vocabulary columns) a pass processes at once: the memory budget, in one place.

Pure arithmetic (no torch): the backends and the roofline model (``benchmarks/roofline.py``) both call it.

The Triton path holds one chunk of ``[C, V]`` logits at a time; ``C`` is the largest row count whose logits,
counted in the compute dtype, fit the budget: on a GPU, 256 MiB keeps Llama-3's V = 128256 at 1024 rows per
chunk (the cuBLAS plan holds them in fp32), enough rows for the gradient GEMMs to fill the machine and far
below the ``N V`` logits a pass replaces (16384 tokens: 4 GiB in bf16). The PyTorch path holds two fp32
``[C, B]`` blocks of ``C`` tokens by ``B`` vocabulary columns; on CPU its 3 MiB keep ``C`` = 1024 rows (the GEMMs'
rate) with ``B`` = 384 columns, so that its peak stays at or below torch's chunked ``F.linear_cross_entropy``
(benchmarks/NOTES.md). ``lean_memory`` trades FLOPs for memory: its chunks and vocabulary slabs get a quarter
of the budget, so that at Llama-3-8B (16384 tokens) its peak stays at or below Liger-Kernel's default.
"""
from __future__ import annotations

DEFAULT_CHUNK_BUDGET_BYTES = 256 * 2**20
CPU_CHUNK_BUDGET_BYTES = 3 * 2**20
LEAN_BUDGET_DIVISOR = 4

# The PyTorch path's blocks: two fp32 [C, B] blocks are alive at once (the logits and their exponentials or
# probabilities; a third for the entropy's gradient under a softcap); a chunk's rows are the GEMMs' rows (CPU GEMMs reach their rate well below 1024); block widths
# are multiples of 64 columns.
MAX_BLOCK_ROWS = 1024
BLOCK_MULTIPLE = 64


def budget_bytes(*, cpu: bool, lean: bool) -> int:
    """The bytes one chunk (or lean slab) of temporaries may take."""
    budget = CPU_CHUNK_BUDGET_BYTES if cpu else DEFAULT_CHUNK_BUDGET_BYTES
    return budget // LEAN_BUDGET_DIVISOR if lean else budget


def chunk_rows(vocab_size: int, bytes_per_logit: int, *, budget: int, multiple: int = 1) -> int:
    """Rows of a ``[C, V]`` chunk whose temporaries (``bytes_per_logit`` per element) fit ``budget``,
    rounded down to ``multiple`` when at least one multiple fits; at least 1."""
    rows = budget // (vocab_size * bytes_per_logit)
    if rows >= multiple:
        rows -= rows % multiple
    return max(1, rows)


def slab_columns(num_tokens: int, vocab_size: int, rows: int, *, multiple: int = 1, extra_rows: int = 0) -> int:
    """Columns ``S`` of a lean-mode vocabulary slab ``[M, S]`` over all ``num_tokens`` rows that, with
    ``extra_rows`` more rows per column (the slab's ``[S, H]`` weight-gradient block, in buffer elements),
    spends the elements of a ``[rows, V]`` chunk: ``rows * V // (M + extra_rows)``, rounded down to
    ``multiple`` (at least one), at most the vocabulary rounded up to ``multiple``."""
    columns = rows * vocab_size // max(1, num_tokens + extra_rows)
    columns = max(multiple, columns - columns % multiple)
    return min(columns, -(-vocab_size // multiple) * multiple)


def block_shape(num_tokens: int, vocab_size: int, hidden_size: int, *, budget: int, weight_upcast: bool,
                lean: bool, chunk_size: int | None = None, blocks: int = 2) -> tuple[int, int]:
    """``(C, B)`` of the PyTorch path's ``[C, B]`` blocks: ``C`` is ``chunk_size`` or as many rows (up to
    ``MAX_BLOCK_ROWS``) as leave room for ``BLOCK_MULTIPLE`` columns; ``B`` spends the rest of ``budget`` on the
    ``blocks`` fp32 blocks' rows, the block's fp32 ``[B, H]`` copy of a reduced-precision weight
    (``weight_upcast``) and, in lean mode, its fp32 ``[B, H]`` weight-gradient rows; at most ``vocab_size``."""
    bytes_per_logit = 4 * blocks
    rows = chunk_size or min(MAX_BLOCK_ROWS, budget // (bytes_per_logit * BLOCK_MULTIPLE))
    rows = max(1, min(rows, num_tokens))
    per_column = bytes_per_logit * rows + 4 * hidden_size * (int(weight_upcast) + int(lean))
    columns = max(BLOCK_MULTIPLE, budget // per_column // BLOCK_MULTIPLE * BLOCK_MULTIPLE)
    return rows, min(columns, vocab_size)
