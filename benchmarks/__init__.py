"""fused_wce's benchmark suite: time, peak memory and accuracy of every loss kernel, side by side.

    python -m benchmarks --quick --out bench_out     # GPU: the < 8 minute profile on one H200
    python -m benchmarks --out bench_out             # GPU: the full profile; without a GPU: the CPU mode
    python -m benchmarks --smoke --out bench_out     # CPU: tiny shapes, one repeat (the test suite runs this)

See benchmarks/README.md. Imports only fused_wce's public API.
"""
