"""Robustness: every way an argument can be wrong has a documented outcome, and nothing is silently wrong.

``CASES`` is the bad-input matrix: ``python tests/test_robustness.py`` prints it as markdown, and
``python tests/test_robustness.py --write-docs`` writes it into docs/robustness.md. Each case is run on every path: a wrong argument must
raise a TypeError/ValueError naming it *before any pass runs*; an unusual but valid one must give the float64
reference's loss and gradients (finite), or the documented defined result (a 0.0 loss connected to the graph,
a non-finite loss for non-finite inputs). No case may crash, hang, read out of bounds or return a silent NaN.

The second half checks non-finite inputs in detail: NaN or +-Inf in hidden, weight or bias makes the loss
non-finite on every path (and, for reduction="none", exactly the affected tokens'), rows that do not count
are never read, and a -inf logit (a banned vocabulary entry) is a valid input with a finite loss.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

import fused_wce
from conftest import INTERPRETING
from helpers import assert_close

H, V = 16, 50
SHAPE = (2, 3)
NAN, INF = float("nan"), float("inf")


def base_args() -> dict:
    """A valid call: 6 tokens in a [2, 3] batch, one ignored, one with weight 0; no bias."""
    g = torch.Generator().manual_seed(1234)
    target = torch.randint(0, V, SHAPE, generator=g)
    target[0, 1] = -100
    token_weight = torch.rand(SHAPE, generator=g) + 0.5
    token_weight[1, 2] = 0.0
    return dict(hidden=torch.randn(*SHAPE, H, generator=g), weight=torch.randn(V, H, generator=g) / 2,
                target=target, token_weight=token_weight, options={},
                bias_values=torch.randn(V, generator=g))


# ---- outcomes -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Raises:
    """A TypeError/ValueError whose message contains ``fragment`` (which names the argument)."""

    error: type
    fragment: str

    @property
    def doc(self) -> str:
        return f"`{self.error.__name__}`: \"{self.fragment}...\""


@dataclass(frozen=True)
class Defined:
    """A defined result: ``kind`` "reference" (the float64 reference's loss and gradients, all finite),
    "zero" (loss 0.0, connected, zero gradients) or "nonfinite" (the loss is NaN or +-Inf)."""

    text: str
    kind: str = "reference"

    @property
    def doc(self) -> str:
        return self.text


@dataclass(frozen=True)
class Case:
    argument: str
    wrong: str
    mutate: Callable[[dict], None]
    outcome: Raises | Defined
    # paths (backend names) on which the documented outcome does not hold yet: xfail(strict) there, with the bug
    xfail: dict = field(default_factory=dict)
    needs_cpu_only_triton_error: bool = False

    @property
    def id(self) -> str:
        return f"{self.argument}: {self.wrong}"


def _set(**values):
    def mutate(a):
        for key, value in values.items():
            if key in ("bias", "normalizer", "reduction", "chunk_size", "ignore_index", "backend", "label_smoothing",
                       "z_loss", "softcap", "logit_scale", "dft", "process_group", "vocab_start", "sequence_parallel"):
                a["options"][key] = value(a) if callable(value) else value
            else:
                a[key] = value(a) if callable(value) else value
    return mutate


def _poke(key, index, value):
    def mutate(a):
        a[key] = a[key].clone()
        a[key][index] = value
    return mutate


def _with_bias(a):
    a["options"]["bias"] = a["bias_values"]


def _poke_bias(index, value):
    def mutate(a):
        bias = a["bias_values"].clone()
        bias[index] = value
        a["options"]["bias"] = bias
    return mutate


def _counted_row(a):
    """(i, j) of a counted token of the base problem."""
    return (0, 0)


def _nan_in_uncounted_rows(a):
    a["hidden"] = a["hidden"].clone()
    a["hidden"][0, 1] = NAN  # target == ignore_index
    a["hidden"][1, 2, 3] = INF  # weight 0


def _clean_uncounted_rows(a):
    a["hidden"] = torch.where(torch.isfinite(a["hidden"]), a["hidden"], 0.0)


def _empty(a):
    a.update(hidden=torch.randn(0, H), target=torch.zeros(0, dtype=torch.long), token_weight=torch.rand(0))


def _empty_batch(a):
    a.update(hidden=torch.randn(2, 0, H), target=torch.zeros(2, 0, dtype=torch.long), token_weight=torch.rand(2, 0))


def _single_token(a):
    a.update(hidden=a["hidden"][0, 0], target=a["target"][0, 0], token_weight=a["token_weight"][0, 0])


def _vocab(n):
    def mutate(a):
        a["weight"] = a["weight"][:n].clone()
        a["target"] = torch.where(a["target"] == -100, -100, a["target"] % n)
        a["bias_values"] = a["bias_values"][:n]
    return mutate


def _hidden_size(n):
    def mutate(a):
        a["hidden"] = a["hidden"][..., :n].clone()
        a["weight"] = a["weight"][:, :n].clone() * 4
    return mutate


def _transposed(key):
    """The same values, stored transposed (column-major): a non-contiguous view."""
    def mutate(a):
        value = a[key]
        a[key] = value.transpose(0, -1).contiguous().transpose(0, -1)
        assert not a[key].is_contiguous()
    return mutate


def _strided(key):
    """The same values as every other element of a twice-as-large tensor (last-dimension stride 2)."""
    def mutate(a):
        value = a[key] if key != "bias" else a["bias_values"]
        wide = torch.stack([value, torch.full_like(value, 1e4)], dim=-1).flatten(-2)
        view = wide[..., ::2]
        assert torch.equal(view, value) and not view.is_contiguous()
        if key == "bias":
            a["options"]["bias"] = view
        else:
            a[key] = view
    return mutate


def _row_slice(a):
    wide = torch.cat([a["weight"], torch.full_like(a["weight"], 1e4)], dim=1)
    a["weight"] = wide[:, :H]


def _expanded_weight(a):
    a["weight"] = a["weight"][:1].expand(V, H)


def _out_of_range_zero_weight(a):
    a["target"] = a["target"].clone()
    a["target"][1, 2] = V + 3  # this token has weight 0
    assert a["token_weight"][1, 2] == 0


def _ignore_a_class(a):
    ignored = int(a["target"][0, 0])
    a["target"] = torch.where(a["target"] == -100, ignored, a["target"])
    a["options"]["ignore_index"] = ignored


def _no_interpreter(a):
    a["options"]["backend"] = "triton"


M = "meta"  # "another device": a meta tensor exercises the device checks without a second GPU

CASES = [
    # hidden
    Case("hidden", "not a tensor", _set(hidden=lambda a: a["hidden"].tolist()), Raises(TypeError, "hidden must be a torch.Tensor")),
    Case("hidden", "integer dtype", _set(hidden=lambda a: a["hidden"].long()), Raises(TypeError, "hidden must be float32, float16 or bfloat16")),
    Case("hidden", "float64", _set(hidden=lambda a: a["hidden"].double(), weight=lambda a: a["weight"].double()), Raises(TypeError, "hidden must be float32, float16 or bfloat16")),
    Case("hidden", "0-d", _set(hidden=torch.tensor(1.0), target=torch.tensor(1), token_weight=None), Raises(ValueError, "hidden must have shape [..., H]")),
    Case("hidden", "last dimension != weight.shape[1]", _set(hidden=lambda a: a["hidden"][..., :-1]), Raises(ValueError, "hidden's last dimension")),
    Case("hidden", "requires grad, weight another dtype (fp16)", _set(weight=lambda a: a["weight"].half()), Raises(TypeError, "weight.dtype")),
    Case("hidden", "a single token: shape [H], target 0-d", _single_token, Defined("that token's loss")),
    Case("hidden", "non-contiguous (transposed storage)", _transposed("hidden"), Defined("same as contiguous")),
    Case("hidden", "non-contiguous (stride 2 along H)", _strided("hidden"), Defined("same as contiguous")),
    Case("hidden", "empty: N = 0 ([0, H])", _empty, Defined("loss 0.0, connected, zero gradients", "zero")),
    Case("hidden", "empty batch dimension ([2, 0, H])", _empty_batch, Defined("loss 0.0, connected, zero gradients", "zero")),
    Case("hidden", "H = 1", _hidden_size(1), Defined("correct loss and gradients")),
    Case("hidden", "NaN in a counted row", _poke("hidden", (0, 0, 5), NAN), Defined("non-finite loss", "nonfinite")),
    Case("hidden", "+Inf in a counted row", _poke("hidden", (0, 0, 5), INF), Defined("non-finite loss", "nonfinite")),
    Case("hidden", "NaN / Inf in rows that do not count", _nan_in_uncounted_rows, Defined("never read: finite loss, as if those rows were 0; their gradient is 0")),
    # weight
    Case("weight", "not a tensor", _set(weight=lambda a: a["weight"].tolist()), Raises(TypeError, "weight must be a torch.Tensor")),
    Case("weight", "1-d", _set(weight=lambda a: a["weight"].flatten()), Raises(ValueError, "weight must have shape [V, H]")),
    Case("weight", "3-d", _set(weight=lambda a: a["weight"][None]), Raises(ValueError, "weight must have shape [V, H]")),
    Case("weight", "dtype != hidden.dtype", _set(weight=lambda a: a["weight"].bfloat16()), Raises(TypeError, "weight.dtype")),
    Case("weight", "V = 0", _set(weight=torch.randn(0, H)), Raises(ValueError, "weight must have V >= 1 and H >= 1")),
    Case("weight", "H = 0", _set(weight=torch.randn(V, 0), hidden=torch.randn(*SHAPE, 0)), Raises(ValueError, "weight must have V >= 1 and H >= 1")),
    Case("weight", "on another device", _set(weight=lambda a: a["weight"].to(M)), Raises(ValueError, "weight is on meta")),
    Case("weight", "V = 1", _vocab(1), Defined("loss exactly 0.0, zero gradients", "zero")),
    Case("weight", "V = 2", _vocab(2), Defined("correct loss and gradients")),
    Case("weight", "non-contiguous (lm_head stored transposed)", _transposed("weight"), Defined("same as contiguous (the Triton path copies it once)")),
    Case("weight", "row stride > H (a slice)", _row_slice, Defined("same as contiguous")),
    Case("weight", "stride-0 rows (expanded)", _expanded_weight, Defined("same as contiguous")),
    Case("weight", "NaN entry", _poke("weight", (7, 3), NAN), Defined("non-finite loss", "nonfinite")),
    Case("weight", "+Inf entry", _poke("weight", (7, 3), INF), Defined("non-finite loss", "nonfinite")),
    # target
    Case("target", "not a tensor", _set(target=lambda a: a["target"].tolist()), Raises(TypeError, "target must be a torch.Tensor")),
    Case("target", "float dtype", _set(target=lambda a: a["target"].float()), Raises(TypeError, "target must be int64 or int32")),
    Case("target", "bool / uint8 / int16", _set(target=lambda a: a["target"].clamp_min(0).to(torch.int16)), Raises(TypeError, "target must be int64 or int32")),
    Case("target", "shape != hidden.shape[:-1]", _set(target=lambda a: a["target"].flatten()), Raises(ValueError, "target shape")),
    Case("target", "value >= V", _poke("target", (0, 0), V), Raises(ValueError, "target has values outside [0, V=50)")),
    Case("target", "negative, not ignore_index", _poke("target", (0, 0), -5), Raises(ValueError, "target has values outside [0, V=50)")),
    Case("target", "out of range on a weight-0 token", _out_of_range_zero_weight, Raises(ValueError, "target has values outside [0, V=50)")),
    Case("target", "value >= 2**31", _poke("target", (0, 0), 2**40), Raises(ValueError, "target has values outside [0, V=50)")),
    Case("target", "on another device", _set(target=lambda a: a["target"].to(M)), Raises(ValueError, "target is on meta")),
    Case("target", "int32", _set(target=lambda a: a["target"].int()), Defined("same as int64")),
    Case("target", "non-contiguous", _transposed("target"), Defined("same as contiguous")),
    Case("target", "every token == ignore_index", _set(target=lambda a: torch.full_like(a["target"], -100)), Defined("loss 0.0, connected, zero gradients", "zero")),
    # token_weight
    Case("token_weight", "not a tensor", _set(token_weight=lambda a: a["token_weight"].tolist()), Raises(TypeError, "token_weight must be a torch.Tensor")),
    Case("token_weight", "integer or bool dtype", _set(token_weight=lambda a: a["token_weight"] > 0), Raises(TypeError, "token_weight must be a floating-point tensor")),
    Case("token_weight", "shape != target.shape", _set(token_weight=lambda a: a["token_weight"].flatten()), Raises(ValueError, "token_weight shape")),
    Case("token_weight", "negative", _poke("token_weight", (0, 0), -0.5), Raises(ValueError, "token_weight must be finite and >= 0")),
    Case("token_weight", "NaN", _poke("token_weight", (0, 0), NAN), Raises(ValueError, "token_weight must be finite and >= 0")),
    Case("token_weight", "+Inf", _poke("token_weight", (0, 0), INF), Raises(ValueError, "token_weight must be finite and >= 0")),
    Case("token_weight", "NaN on an ignored token", _poke("token_weight", (0, 1), NAN), Raises(ValueError, "token_weight must be finite and >= 0")),
    Case("token_weight", "float64 beyond float32's range (1e39)", _set(token_weight=lambda a: a["token_weight"].double() * 1e39), Raises(ValueError, "token_weight must be finite and >= 0")),
    Case("token_weight", "requires grad", _set(token_weight=lambda a: a["token_weight"].requires_grad_()), Raises(ValueError, "token_weight must not require grad")),
    Case("token_weight", "on another device", _set(token_weight=lambda a: a["token_weight"].to(M)), Raises(ValueError, "token_weight is on meta")),
    Case("token_weight", "all zero", _set(token_weight=lambda a: torch.zeros_like(a["token_weight"])), Defined("loss 0.0, connected, zero gradients", "zero")),
    Case("token_weight", "float16 / bfloat16 / float64", _set(token_weight=lambda a: a["token_weight"].double()), Defined("used as float32")),
    Case("token_weight", "non-contiguous", _transposed("token_weight"), Defined("same as contiguous")),
    Case("token_weight", "tiny (1e-40, subnormal), reduction mean", _set(token_weight=lambda a: (a["token_weight"] > 0) * 1e-40),
         Defined("the weighted mean (weights are relative)")),
    # bias
    Case("bias", "not a tensor", _set(bias=lambda a: a["bias_values"].tolist()), Raises(TypeError, "bias must be a torch.Tensor")),
    Case("bias", "length != V", _set(bias=lambda a: a["bias_values"][:-1]), Raises(ValueError, "bias must have shape [V]")),
    Case("bias", "2-d", _set(bias=lambda a: a["bias_values"][None]), Raises(ValueError, "bias must have shape [V]")),
    Case("bias", "dtype != weight.dtype", _set(bias=lambda a: a["bias_values"].double()), Raises(TypeError, "bias.dtype")),
    Case("bias", "on another device", _set(bias=lambda a: a["bias_values"].to(M)), Raises(ValueError, "bias is on meta")),
    Case("bias", "non-contiguous (stride 2)", _strided("bias"), Defined("same as contiguous")),
    Case("bias", "NaN entry", _poke_bias(7, NAN), Defined("non-finite loss", "nonfinite")),
    Case("bias", "+Inf entry", _poke_bias(7, INF), Defined("non-finite loss", "nonfinite")),
    # options
    Case("ignore_index", "float", _set(ignore_index=1.5), Raises(TypeError, "ignore_index must be an int")),
    Case("ignore_index", "bool", _set(ignore_index=True), Raises(TypeError, "ignore_index must be an int")),
    Case("ignore_index", "beyond int64 (2**70)", _set(ignore_index=2**70), Raises(ValueError, "ignore_index must fit in int64")),
    Case("ignore_index", "inside [0, V)", _ignore_a_class, Defined("that class never counts")),
    Case("reduction", "unknown ('avg', None)", _set(reduction="avg"), Raises(ValueError, "reduction must be one of")),
    Case("normalizer", "0, negative, NaN or Inf", _set(normalizer=0.0), Raises(ValueError, "normalizer must be finite and > 0")),
    Case("normalizer", "NaN", _set(normalizer=NAN), Raises(ValueError, "normalizer must be finite and > 0")),
    Case("normalizer", "0-d tensor, 0 or NaN", _set(normalizer=torch.tensor(NAN)), Raises(ValueError, "normalizer must be finite and > 0")),
    Case("normalizer", "1-d tensor", _set(normalizer=torch.ones(1)), Raises(ValueError, "normalizer must be a float or a 0-d tensor")),
    Case("normalizer", "str or bool", _set(normalizer=True), Raises(TypeError, "normalizer must be a float or a 0-d tensor")),
    Case("normalizer", "requires grad", _set(normalizer=torch.tensor(2.0, requires_grad=True)), Raises(ValueError, "normalizer must not require grad")),
    Case("normalizer", "with reduction='none'", _set(normalizer=2.0, reduction="none"), Raises(ValueError, "normalizer applies to reduced losses")),
    Case("normalizer", "tensor on another (non-CPU) device", _set(normalizer=torch.tensor(2.0, device=M)), Raises(ValueError, "normalizer is on meta")),
    Case("normalizer", "int, or integer tensor", _set(normalizer=torch.tensor(3)), Defined("used as float32")),
    Case("chunk_size", "0 or negative", _set(chunk_size=0), Raises(ValueError, "chunk_size must be >= 1")),
    Case("chunk_size", "float or bool", _set(chunk_size=2.0), Raises(TypeError, "chunk_size must be an int or None")),
    Case("chunk_size", "1", _set(chunk_size=1), Defined("correct (one token per chunk)")),
    Case("chunk_size", "larger than N (10**12)", _set(chunk_size=10**12), Defined("correct (one chunk)")),
    Case("backend", "unknown", _set(backend="cuda"), Raises(ValueError, "backend must be one of")),
    Case("backend", "'triton' for CPU tensors without TRITON_INTERPRET", _no_interpreter, Raises(ValueError, "backend='triton' needs CUDA tensors"),
         needs_cpu_only_triton_error=True),
    Case("label_smoothing", "outside [0, 1)", _set(label_smoothing=1.0), Raises(ValueError, "label_smoothing")),
    Case("z_loss", "negative", _set(z_loss=-1.0), Raises(ValueError, "z_loss")),
    Case("softcap", "0 or negative", _set(softcap=0.0), Raises(ValueError, "softcap")),
    Case("logit_scale", "0 or negative", _set(logit_scale=0.0), Raises(ValueError, "logit_scale")),
    Case("dft", "not a bool", _set(dft="yes"), Raises(TypeError, "dft")),
    # vocabulary parallelism (a sharded head: tests/test_vocab_parallel.py runs the group cases)
    Case("process_group", "not a ProcessGroup", _set(process_group="tp", vocab_start=0),
         Raises(TypeError, "process_group must be a torch.distributed ProcessGroup")),
    Case("vocab_start", "without process_group", _set(vocab_start=3),
         Raises(ValueError, "vocab_start and sequence_parallel need process_group")),
    Case("sequence_parallel", "True without process_group", _set(sequence_parallel=True),
         Raises(ValueError, "vocab_start and sequence_parallel need process_group")),
]


def markdown_table() -> str:
    lines = ["| argument | what is wrong | outcome |", "|---|---|---|"]
    for case in CASES:
        gap = "".join(f" (open bug on the {backend} path: {reason})" for backend, reason in sorted(case.xfail.items()))
        lines.append(f"| `{case.argument}` | {case.wrong} | {case.outcome.doc}{gap} |")
    return "\n".join(lines)


DOCS = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"
TABLE_BEGIN = "<!-- bad-input table: generated from tests/test_robustness.py CASES by " \
              "`python tests/test_robustness.py --write-docs`; edit the cases, not the table -->"
TABLE_END = "<!-- end of the generated table -->"


def write_table(document: Path) -> None:
    """Replace what lies between ``TABLE_BEGIN`` and ``TABLE_END`` in ``document`` with :func:`markdown_table`."""
    text = document.read_text(encoding="utf-8")
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{document}: the markers of the generated table are missing:\n{TABLE_BEGIN}\n{TABLE_END}")
    head, rest = text.split(TABLE_BEGIN, 1)
    tail = rest.split(TABLE_END, 1)[1]
    document.write_text(f"{head}{TABLE_BEGIN}\n{markdown_table()}\n{TABLE_END}{tail}", encoding="utf-8")


def _prepare(case: Case, path) -> dict:
    args = base_args()
    case.mutate(args)
    device = path[0]

    def place(value, grad):
        if not isinstance(value, torch.Tensor) or value.device.type == "meta":
            return value
        value = value.to(device)
        if grad and value.is_floating_point() and not value.requires_grad:
            value = value.detach().requires_grad_(True)  # detach keeps the strides
        return value

    for key in ("hidden", "weight", "target", "token_weight"):
        args[key] = place(args[key], key in ("hidden", "weight"))
    options = args["options"]
    if "bias" in options:
        options["bias"] = place(options["bias"], True)
    if isinstance(options.get("normalizer"), torch.Tensor) and options["normalizer"].device.type == "cpu":
        options["normalizer"] = options["normalizer"].to(device)
    options.setdefault("backend", path[1])
    return args


def _call(args, **extra):
    return fused_wce.linear_cross_entropy(args["hidden"], args["weight"], args["target"], args["token_weight"],
                                          **args["options"], **extra)


def _differentiable(args):
    return [t for t in (args["hidden"], args["weight"], args["options"].get("bias"))
            if isinstance(t, torch.Tensor) and t.requires_grad]


def _forbid_passes(monkeypatch):
    import fused_wce.backends.torch_blocks as torch_backend

    def no_pass(request):
        raise AssertionError("a pass ran before the bad input was rejected")

    monkeypatch.setattr(torch_backend, "run_pass", no_pass)
    if INTERPRETING or torch.cuda.is_available():
        import fused_wce.backends.triton_chunks as triton_backend

        monkeypatch.setattr(triton_backend, "run_pass", no_pass)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_matrix(case, path, monkeypatch, request):
    if case.xfail.get(path[1]):
        request.applymarker(pytest.mark.xfail(strict=True, reason=case.xfail[path[1]]))
    if case.needs_cpu_only_triton_error:
        if path[0] != "cpu":
            pytest.skip("only CPU tensors need the interpreter")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _prepare(case, path)
    outcome = case.outcome
    if isinstance(outcome, Raises):
        _forbid_passes(monkeypatch)
        with pytest.raises(outcome.error, match=re.escape(outcome.fragment)):
            _call(args)
        return

    loss = _call(args)
    inputs = _differentiable(args)
    assert loss.dtype == torch.float32
    if outcome.kind == "nonfinite":
        assert not torch.isfinite(loss).all(), f"finite loss {loss} hides a non-finite input"
        return
    assert torch.isfinite(loss).all(), f"{case.id}: non-finite loss {loss}"
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    if outcome.kind == "zero":
        assert loss.item() == 0.0 and loss.requires_grad
        for grad, tensor in zip(grads, inputs):
            assert grad is not None and grad.shape == tensor.shape and torch.count_nonzero(grad) == 0
        return
    # the float64 reference on the same inputs (non-finite values in rows that do not count replaced by 0)
    reference_args = {**args, "options": {k: v for k, v in args["options"].items() if k not in ("chunk_size", "backend")}}
    if case.mutate is _nan_in_uncounted_rows:
        _clean_uncounted_rows(reference_args)
    ref = fused_wce.reference_linear_cross_entropy(reference_args["hidden"], reference_args["weight"],
                                                   reference_args["target"], reference_args["token_weight"],
                                                   **reference_args["options"])
    ref_inputs = [reference_args["hidden"], reference_args["weight"], reference_args["options"].get("bias")]
    ref_inputs = [t for t in ref_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    _assert_close_fp32(loss, ref, "loss")
    for name, grad, ref_grad in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        assert grad is not None and torch.isfinite(grad).all(), name
        _assert_close_fp32(grad, ref_grad, name)


def _assert_close_fp32(actual, expected, name):
    """fp32 rounding relative to the result's scale, or to 0.05 where the result is a cancellation (a uniform
    distribution's grad_hidden is 0 up to rounding of terms ~ |p| |w|)."""
    expected = expected.double()
    error = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 0.05)
    assert error <= 2e-5 * scale, f"{name}: max error {error:.3g} > {2e-5 * scale:.3g}"


def test_write_table_puts_one_row_per_case_between_the_markers(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text(f"# Title\n\nbefore\n{TABLE_BEGIN}\n| stale |\n{TABLE_END}\nafter\n", encoding="utf-8")
    for _ in range(2):  # idempotent
        write_table(document)
        text = document.read_text(encoding="utf-8")
        assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{TABLE_END}\nafter\n")
        table = text.split(TABLE_BEGIN)[1].split(TABLE_END)[0].strip().splitlines()
        assert len(table) == 2 + len(CASES) and "| stale |" not in table
        assert all(row.startswith(f"| `{case.argument}` | {case.wrong} |") for row, case in zip(table[2:], CASES))
    document.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="markers"):
        write_table(document)


# ---- non-finite inputs in detail ------------------------------------------------------------------------------

def _problem(path, dtype=torch.float32, bias=True, seed=7):
    g = torch.Generator().manual_seed(seed)
    n, hidden_size, vocab = 12, 24, 300
    hidden = torch.randn(n, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5 * 2
    bias_tensor = torch.randn(vocab, generator=g) if bias else None
    target = torch.randint(0, vocab, (n,), generator=g)
    target[3] = -100
    token_weight = torch.rand(n, generator=g) + 0.25
    device = path[0]
    return dict(hidden=hidden.to(device, dtype), weight=weight.to(device, dtype),
                bias=None if bias_tensor is None else bias_tensor.to(device, dtype),
                target=target.to(device), token_weight=token_weight.to(device))


NONFINITE = [
    # (where, index, value, tokens whose loss must be non-finite: "row" = that token, "all" = every counted token)
    ("hidden", (0, 5), NAN, "row"),
    ("hidden", (0, 5), INF, "row"),
    ("hidden", (0, 5), -INF, "row"),
    ("weight", (17, 2), NAN, "all"),
    ("weight", (17, 2), INF, "some"),
    ("bias", (17,), NAN, "all"),
    ("bias", (17,), INF, "all"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where, index, value, affected", NONFINITE,
                         ids=[f"{w}{list(i)}={v}" for w, i, v, _ in NONFINITE])
def test_non_finite_input_gives_non_finite_loss(path, where, index, value, affected, reduction, dtype):
    """Never a finite number that hides a NaN/Inf input: the reduced loss is non-finite; per token
    (reduction="none") exactly the affected tokens are non-finite and the others are untouched."""
    problem = _problem(path, dtype)
    clean = fused_wce.linear_cross_entropy(**problem, reduction="none", backend=path[1], chunk_size=5)
    problem[where] = problem[where].clone()
    problem[where][index] = value
    for name in ("hidden", "weight", "bias"):
        problem[name].requires_grad_(True)
    loss = fused_wce.linear_cross_entropy(**problem, reduction=reduction, backend=path[1], chunk_size=5)
    counted = (problem["target"] != -100) & (problem["token_weight"] > 0)
    if reduction != "none":
        assert not torch.isfinite(loss), f"finite loss {loss.item()} hides {where}{list(index)} = {value}"
        grads = torch.autograd.grad(loss, [problem["hidden"], problem["weight"]])
        assert not torch.isfinite(grads[1]).all(), "grad_weight hides the non-finite input"
        return
    bad = ~torch.isfinite(loss)
    assert not bad[~counted].any()
    if affected == "row":
        expected = torch.zeros_like(bad)
        expected[index[0]] = True
        assert torch.equal(bad, expected), bad
        # the other tokens are exactly what they were (rows are independent)
        assert torch.equal(loss[~expected], clean[~expected])
    elif affected == "all":
        assert torch.equal(bad, counted), bad
    else:  # +Inf in weight: z_v = +-Inf by the sign of hidden[:, 2]; a token with z_v = +Inf has lse = +Inf
        plus_inf = problem["hidden"][:, index[1]] > 0
        assert bad[counted & plus_inf].all()


def test_non_finite_values_in_rows_that_do_not_count_are_never_read(path):
    """Padding may hold garbage: rows with target == ignore_index or weight 0 are not gathered, so NaN/Inf in
    them changes nothing, bitwise, and their gradient is exactly 0."""
    problem = _problem(path)
    problem["token_weight"][5] = 0.0
    outputs = []
    for garbage in (None, NAN, INF):
        hidden = problem["hidden"].clone()
        if garbage is not None:
            hidden[3] = garbage  # ignored
            hidden[5] = -garbage  # weight 0
        hidden.requires_grad_(True)
        weight = problem["weight"].clone().requires_grad_(True)
        loss = fused_wce.linear_cross_entropy(hidden, weight, problem["target"], problem["token_weight"],
                                              bias=problem["bias"], backend=path[1], chunk_size=4)
        loss.backward()
        outputs.append((loss.detach(), hidden.grad, weight.grad))
    for loss, grad_hidden, grad_weight in outputs[1:]:
        assert torch.equal(loss, outputs[0][0]) and torch.equal(grad_weight, outputs[0][2])
        assert torch.equal(grad_hidden, outputs[0][1]) and torch.count_nonzero(grad_hidden[[3, 5]]) == 0


def _exact_cross_entropy(problem):
    """float64 weighted-mean cross-entropy and per-token entropy straight from torch.nn.functional (handles
    -inf logits: they get probability 0)."""
    logits = problem["hidden"].double() @ problem["weight"].double().T + problem["bias"].double()
    target, weight = problem["target"], problem["token_weight"].double()
    counted = target != -100
    per_token = torch.nn.functional.cross_entropy(logits[counted], target[counted], reduction="none")
    loss = (weight[counted] * per_token).sum() / weight[counted].sum()
    log_probs = logits[counted].log_softmax(-1)
    probs = log_probs.exp()
    entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(-1)
    return loss, entropy, counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minus_inf_bias_bans_a_token(path, dtype):
    """bias[v] = -inf (a banned vocabulary entry) is valid: probability 0, a finite loss and finite gradients
    equal to the float64 result, as long as no target is a banned entry."""
    problem = _problem(path, dtype)
    problem["bias"][[17, 200, 201]] = -INF
    problem["target"][problem["target"] == 17] = 18
    for name in ("hidden", "weight"):
        problem[name].requires_grad_(True)
    loss = fused_wce.linear_cross_entropy(**problem, backend=path[1], chunk_size=5)
    expected, _, _ = _exact_cross_entropy(problem)
    assert torch.isfinite(loss)
    assert_close(loss, expected, None, dtype, "loss", 1.0)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [problem["hidden"], problem["weight"]])
    assert torch.isfinite(grad_hidden).all() and torch.isfinite(grad_weight).all()
    assert torch.count_nonzero(grad_weight[[17, 200, 201]]) == 0  # a banned entry gets no gradient
    # a banned target: its probability is 0, its loss +inf
    problem["target"][0] = 17
    loss = fused_wce.linear_cross_entropy(**problem, backend=path[1], reduction="none")
    assert loss[0] == INF and torch.isfinite(loss[1:]).all()


def test_minus_inf_bias_entropy_is_finite(path):
    problem = _problem(path)
    problem["bias"][[17, 200]] = -INF
    problem["target"][problem["target"] == 17] = 18
    out = fused_wce.linear_cross_entropy(**problem, backend=path[1], return_stats=True)
    _, entropy, counted = _exact_cross_entropy(problem)
    assert torch.isfinite(out.entropy).all()
    assert_close(out.entropy[counted], entropy, None, torch.float32, "entropy")


# ---- offsets beyond 2**31 --------------------------------------------------------------------------------------

# Row stride, in elements, of views into a sparse file: row 2 starts at 2 * BIG_STRIDE > 2**31 elements, so
# `row * stride` wraps to a negative offset in int32. The file is sparse and mapped shared: only the pages of
# the few rows touched exist, nothing of that size is allocated.
BIG_STRIDE = 2**30 + 64


def _sparse_rows(directory: Path, name: str, rows: int, cols: int, values: torch.Tensor | None = None):
    numel = (rows - 1) * BIG_STRIDE + cols
    file = directory / name
    with open(file, "wb") as handle:
        handle.truncate(numel * 4)
    view = torch.from_file(str(file), shared=True, size=numel, dtype=torch.float32).as_strided((rows, cols),
                                                                                             (BIG_STRIDE, 1))
    assert (rows - 1) * view.stride(0) >= 2**31
    if values is not None:
        view.copy_(values)
    return view


def test_weight_rows_beyond_2_31_elements(path, tmp_path):
    """The public API on an lm_head weight whose rows sit 2**30 elements apart (V * stride > 2**31): the Triton
    path reads it in place (unit stride along H), so vocab_partials and the grad_hidden GEMM must compute
    ``v * stride`` in int64; any int32 product would read at a negative offset."""
    if path[0] != "cpu":
        pytest.skip("sparse-file views are host memory")
    g = torch.Generator().manual_seed(5)
    values = torch.randn(3, H, generator=g)
    weight = _sparse_rows(tmp_path, "weight.bin", 3, H, values).detach().requires_grad_(True)
    hidden = torch.randn(5, H, generator=g, requires_grad=True)
    target = torch.tensor([2, 0, 2, 1, 2])
    loss = fused_wce.linear_cross_entropy(hidden, weight, target, backend=path[1], chunk_size=2)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight])
    dense = values.clone().requires_grad_(True)
    ref = fused_wce.reference_linear_cross_entropy(hidden, dense, target)
    ref_grad_hidden, ref_grad_weight = torch.autograd.grad(ref, [hidden, dense])
    _assert_close_fp32(loss, ref, "loss")
    _assert_close_fp32(grad_hidden, ref_grad_hidden, "grad_hidden")
    _assert_close_fp32(grad_weight, ref_grad_weight, "grad_weight")


@pytest.mark.skipif(not INTERPRETING, reason="runs the kernels on host memory under the interpreter")
def test_kernels_address_rows_beyond_2_31_elements(tmp_path):
    """Every kernel on operands whose row offsets pass 2**31 elements: hidden rows (``rows * H``), the stored
    logits and dlogits (``rows * V``), each a strided view into a sparse file. (The GEMMs are cuBLAS, which
    addresses with 64-bit offsets itself.)"""
    from fused_wce.kernels import combine, logit_rows, softmax_grad, vocab_partials
    from fused_wce.kernels.configs import INTERPRETER_CONFIGS as configs
    from fused_wce.options import PLAIN
    from fused_wce.passes import TokenStatBuffers

    g = torch.Generator().manual_seed(6)
    rows, vocab = 3, 300
    hidden = _sparse_rows(tmp_path, "hidden.bin", rows, H, torch.randn(rows, H, generator=g))
    weight = torch.randn(vocab, H, generator=g) / 2
    target = torch.tensor([5, 299, 130])
    logits = _sparse_rows(tmp_path, "logits.bin", rows, vocab)
    num_tiles = -(-vocab // configs.vocab_partials.block_n)
    partials = tuple(torch.empty(num_tiles, rows) for _ in range(3))
    target_logit, token_loss, lse, entropy = (torch.empty(rows) for _ in range(4))
    is_top1 = torch.empty(rows, dtype=torch.int8)

    stats = TokenStatBuffers(token_loss, lse, entropy, is_top1, None)
    vocab_partials(hidden, weight, None, target, partials, target_logit, logits, 1, configs.vocab_partials,
                   options=PLAIN)
    combine(partials, target_logit, stats, configs.combine, options=PLAIN, vocab_size=vocab)
    exact = hidden.double() @ weight.double().T
    exact_lse = exact.logsumexp(-1)
    tile_max = torch.stack([exact[:, i:i + configs.vocab_partials.block_n].amax(-1)
                            for i in range(0, vocab, configs.vocab_partials.block_n)])
    tile_of = torch.arange(vocab) // configs.vocab_partials.block_n
    _assert_close_fp32(logits, exact - tile_max[tile_of].T, "stored logits")
    _assert_close_fp32(lse, exact_lse, "lse")
    _assert_close_fp32(token_loss, exact_lse - exact.gather(1, target[:, None]).squeeze(1), "token_loss")

    coef = torch.tensor([0.5, 1.0, 2.0])
    softmax_grad(logits, partials[0], lse, target, coef, configs.softmax_grad, configs.vocab_partials.block_n,
                 options=PLAIN, num_classes=vocab)
    dlogits = (exact - exact_lse[:, None]).exp()
    dlogits[torch.arange(rows), target] -= 1
    dlogits *= coef[:, None].double()
    _assert_close_fp32(logits, dlogits, "dlogits")

    # the cuBLAS plan's row kernel: raw fp32 logits rows 2**31 elements apart, dlogits written in place
    raw = _sparse_rows(tmp_path, "raw.bin", rows, vocab, (hidden @ weight.T).float())
    row_stats = TokenStatBuffers(*(torch.empty(rows) for _ in range(3)), torch.empty(rows, dtype=torch.int8), None)
    logit_rows(raw, raw, None, target, coef, row_stats.lse, configs.logit_rows, options=PLAIN, num_classes=vocab,
               stats=row_stats)
    _assert_close_fp32(row_stats.lse, exact_lse, "logit_rows lse")
    _assert_close_fp32(row_stats.token_loss, exact_lse - exact.gather(1, target[:, None]).squeeze(1),
                       "logit_rows token_loss")
    _assert_close_fp32(raw, dlogits, "logit_rows dlogits")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The bad-input table, generated from CASES.")
    parser.add_argument("--write-docs", action="store_true", help=f"write it into {DOCS.relative_to(DOCS.parents[1])}"
                                                                 " (between its markers) instead of printing it")
    if parser.parse_args().write_docs:
        write_table(DOCS)
    else:
        print(markdown_table())
