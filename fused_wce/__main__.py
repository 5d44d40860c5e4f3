"""``python -m fused_wce``: a self-check on an embedded default problem.

Computes a weighted loss and its gradients with fused_wce (the CPU path here, the Triton path on a GPU, and
the Triton path under the CPU interpreter on a small shape), prints their error against the float64
reference, and the memory the ``[N, V]`` logits would have taken.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def _problem(num_tokens: int, hidden_size: int, vocab_size: int, dtype, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) * (3.0 / hidden_size**0.5)
    target = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    # multi-turn SFT: half the tokens are prompts (ignored), the rest weighted by turn
    target[: num_tokens // 2] = -100
    token_weight = torch.rand(num_tokens, generator=generator).round(decimals=1)
    return (hidden.to(device, dtype).requires_grad_(), weight.to(device, dtype).requires_grad_(),
            target.to(device), token_weight.to(device))


def _check(name: str, num_tokens: int, hidden_size: int, vocab_size: int, dtype, device, backend: str) -> None:
    import fused_wce

    hidden, weight, target, token_weight = _problem(num_tokens, hidden_size, vocab_size, dtype, device)
    start = time.perf_counter()
    loss = fused_wce.linear_cross_entropy(hidden, weight, target, token_weight, backend=backend)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    elapsed = time.perf_counter() - start
    reference = fused_wce.reference_linear_cross_entropy(hidden, weight, target, token_weight)
    ref_hidden, ref_weight = torch.autograd.grad(reference, (hidden, weight))

    def relative(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    logits_bytes = num_tokens * vocab_size * torch.finfo(dtype).bits // 8
    print(f"{name}: N={num_tokens} H={hidden_size} V={vocab_size} {str(dtype).removeprefix('torch.')} "
          f"on {device} ({backend}), {elapsed:.2f} s")
    print(f"  loss {loss.item():.6f}  reference {reference.item():.6f}  |error| {abs(loss.item() - reference.item()):.2e}")
    print(f"  relative error: grad_hidden {relative(grad_hidden, ref_hidden):.2e}, "
          f"grad_weight {relative(grad_weight, ref_weight):.2e}")
    print(f"  logits not materialised: {logits_bytes / 2**20:.1f} MiB in {str(dtype).removeprefix('torch.')} "
          f"(+{num_tokens * vocab_size * 4 / 2**20:.1f} MiB fp32 upcast in a plain implementation)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fused_wce", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        # Before triton is first imported (torch's custom-op machinery may import it during the first call):
        # the interpreter mode is read at import time.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if torch.cuda.is_available():
        _check("triton", args.tokens, args.hidden, args.vocab, torch.bfloat16, "cuda", "triton")
    _check("cpu path", args.tokens, args.hidden, args.vocab, torch.float32, "cpu", "torch")
    if not torch.cuda.is_available():
        if os.environ["TRITON_INTERPRET"] == "1":
            _check("triton (CPU interpreter)", 64, 96, 1000, torch.float32, "cpu", "triton")


if __name__ == "__main__":
    main()
