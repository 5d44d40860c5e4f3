"""linear_log_prob: per-token log-probs and entropies of the tempered logits, and their gradients for any
upstream gradients, on every path (CPU torch, Triton interpreted/compiled, both logits plans) against the float64
reference; the no-grad single pass; the custom ops under opcheck and torch.compile; bad input."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import fused_wce
import fused_wce.custom_ops as custom_ops
from fused_wce.log_prob_ops import _log_prob_backward_op, _log_prob_op
from fused_wce.options import LOG_PROB_FIELDS, LossOptions
from fused_wce.passes import KnownRowStats, PassRequest
from helpers import assert_close, make_problem, run_inside_custom_op, torch_eager_log_prob
from test_memory_bound import AllocationRecorder

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The logits of make_problem have std ~3: a softcap of 4 bends them, a temperature above and below 1.
VARIANTS = {
    "plain": {},
    "temperature": dict(temperature=0.7),
    "softcap+scale+temperature": dict(softcap=4.0, logit_scale=1.4, temperature=1.6),
}
UPSTREAMS = ("log_prob", "entropy", "both")


@pytest.fixture
def path(every_plan_path):
    """Every execution path, and both logits plans of the Triton path."""
    return every_plan_path


def _upstream(kind: str, shape, device, scale: float = 3.0):
    """Random signed upstream gradients of (log_prob, entropy); None for the output not differentiated."""
    def draw():
        return torch.randn(shape, dtype=torch.float64, device=device) * scale

    return (draw() if kind in ("log_prob", "both") else None), (draw() if kind in ("entropy", "both") else None)


def _objective(log_prob, entropy, upstream):
    """``sum(g_lp * log_prob) + sum(g_H * entropy)`` over the outputs that have an upstream gradient."""
    total = 0.0
    for value, grad in zip((log_prob, entropy), upstream):
        if grad is not None:
            total = total + (value * grad.to(value.dtype)).sum()
    return total


def _inputs(problem):
    return [t for t in (problem.hidden, problem.weight, problem.bias) if t is not None]


def check_against_reference(problem, path, dtype, upstream_kind="both", *, factor=2.0, **kwargs):
    """log_prob, entropy and the gradients of ``path`` against the float64 reference; in half precision
    torch's error from logits materialised in that dtype is the yardstick. Returns the outputs."""
    variant = {k: v for k, v in kwargs.items() if k in ("temperature", "softcap", "logit_scale", "ignore_index")}
    log_prob, entropy = fused_wce.linear_log_prob(problem.hidden, problem.weight, problem.target, bias=problem.bias,
                                                  return_entropy=True, backend=path[1], **kwargs)
    ref = fused_wce.reference_linear_log_prob(problem.hidden, problem.weight, problem.target, bias=problem.bias,
                                              return_entropy=True, **variant)
    eager = torch_eager_log_prob(problem, **variant) if dtype != torch.float32 else (None, None)
    ignored = problem.target == kwargs.get("ignore_index", -100)
    for name, value, expected, yardstick in zip(("log_prob", "entropy"), (log_prob, entropy), ref, eager):
        assert value.dtype == torch.float32 and value.shape == problem.target.shape, name
        assert (value[ignored] == 0).all(), f"{name} is not 0 where ignored"
        assert_close(value, expected, yardstick, dtype, name, factor)

    upstream = _upstream(upstream_kind, problem.target.shape, log_prob.device)
    grads = torch.autograd.grad(_objective(log_prob, entropy, upstream), _inputs(problem))
    ref_grads = torch.autograd.grad(_objective(*ref, upstream), _inputs(problem))
    eager_grads = ((None,) * len(grads) if eager[0] is None else
                   torch.autograd.grad(_objective(*eager, upstream), _inputs(problem)))
    for name, grad, ref_grad, eager_grad in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads,
                                                eager_grads):
        assert grad.dtype == dtype, name
        assert_close(grad, ref_grad, eager_grad, dtype, name, factor)
    return log_prob, entropy


# --------------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_matches_reference(path, variant, upstream, poison):
    # V and H are multiples of no block size; 2-D target; several chunks, the last one partial; a bias.
    problem = make_problem((3, 11), 40, 600, torch.float32, path[0], bias=True, weighted=False, ignore_fraction=0.25)
    check_against_reference(problem, path, torch.float32, upstream, chunk_size=8, **VARIANTS[variant])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "softcap+scale+temperature"])
def test_statistics_pass_through_cublas(path, variant, dtype, monkeypatch, poison):
    """logits_gemm="cublas": the forward (the statistics-only pass) runs on cuBLAS fp32 logits and logit_rows;
    the outputs and the gradients given them match the reference."""
    if path[1] != "triton" or len(path) == 3:
        pytest.skip("the Triton path's default logits plan: logits_gemm='cublas' changes only its statistics pass")
    import fused_wce.backends.triton_chunks as triton_chunks

    calls = []
    original = triton_chunks._cublas_stats_pass
    monkeypatch.setattr(triton_chunks, "_cublas_stats_pass", lambda *args: calls.append(1) or original(*args))
    problem = make_problem((3, 11), 40, 600, dtype, path[0], bias=dtype == torch.float32, weighted=False,
                           ignore_fraction=0.25)
    check_against_reference(problem, path, dtype, "both", chunk_size=8, logits_gemm="cublas", **VARIANTS[variant])
    assert calls == [1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_against_torch_same_dtype_error(path, dtype, poison):
    problem = make_problem((2, 13), 48, 500, dtype, path[0], bias=dtype == torch.float32, weighted=False)
    check_against_reference(problem, path, dtype, "both", chunk_size=16, **VARIANTS["softcap+scale+temperature"])


def test_custom_ignore_index_int32_and_one_dimensional(path, poison):
    problem = make_problem((29,), 32, 300, torch.float32, path[0], ignore_index=-1, weighted=False,
                           ignore_fraction=0.4)
    problem.target = problem.target.int()
    check_against_reference(problem, path, torch.float32, "both", ignore_index=-1, chunk_size=7)


def test_nothing_counted_is_zero_and_connected(path):
    problem = make_problem((2, 5), 32, 100, torch.float32, path[0], weighted=False)
    problem.target.fill_(-100)
    log_prob, entropy = fused_wce.linear_log_prob(problem.hidden, problem.weight, problem.target,
                                                  return_entropy=True, backend=path[1])
    assert torch.equal(log_prob, torch.zeros_like(log_prob)) and torch.equal(entropy, torch.zeros_like(entropy))
    grads = torch.autograd.grad((log_prob - entropy).sum(), [problem.hidden, problem.weight])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_lean_memory_and_compute_dtype(path, poison):
    """lean_memory (vocabulary slabs for the weight gradient, entropy term included) and fp32 weights with bf16
    matmuls: within bf16's tolerance of the reference."""
    problem = make_problem((3, 10), 48, 500, torch.bfloat16, path[0], weighted=False)
    check_against_reference(problem, path, torch.bfloat16, "both", lean_memory=True, chunk_size=8, temperature=0.8)
    master = make_problem((3, 10), 48, 500, torch.float32, path[0], weighted=False)
    log_prob, entropy = fused_wce.linear_log_prob(master.hidden, master.weight, master.target, return_entropy=True,
                                                  backend=path[1], compute_dtype=torch.bfloat16)
    ref = fused_wce.reference_linear_log_prob(master.hidden, master.weight, master.target, return_entropy=True)
    upstream = _upstream("both", master.target.shape, path[0])
    grads = torch.autograd.grad(_objective(log_prob, entropy, upstream), [master.hidden, master.weight])
    ref_grads = torch.autograd.grad(_objective(*ref, upstream), [master.hidden, master.weight])
    for name, value, expected in zip(("log_prob", "entropy", "grad_hidden", "grad_weight"),
                                     (log_prob, entropy, *grads), (*ref, *ref_grads)):
        assert value.dtype == torch.float32, name  # fp32 inputs get fp32 gradients
        assert_close(value, expected, None, torch.bfloat16, name)


def test_fp16_small_upstream_gradients_keep_their_precision(path):
    """fp16 dlogits from upstream gradients of 1e-5 (a mean over many tokens) would be subnormal without the
    power-of-two gradient scale (errors of 1-2%). fp32 inputs with fp16 matmuls return fp32 gradients, so only
    the dlogits' precision is at stake: within fp16's floor of the float64 reference on the fp16-rounded inputs."""
    problem = make_problem((2, 9), 32, 300, torch.float32, path[0], weighted=False)
    log_prob, entropy = fused_wce.linear_log_prob(problem.hidden, problem.weight, problem.target, return_entropy=True,
                                                  backend=path[1], compute_dtype=torch.float16)
    rounded = [t.detach().half().double().requires_grad_() for t in (problem.hidden, problem.weight)]
    ref = fused_wce.reference_linear_log_prob(*rounded, problem.target, return_entropy=True)
    upstream = _upstream("both", problem.target.shape, path[0], scale=1e-5)
    grads = torch.autograd.grad(_objective(log_prob, entropy, upstream), [problem.hidden, problem.weight])
    ref_grads = torch.autograd.grad(_objective(*ref, upstream), rounded)
    for name, grad, ref_grad in zip(("grad_hidden", "grad_weight"), grads, ref_grads):
        assert grad.dtype == torch.float32
        assert_close(grad, ref_grad, None, torch.float16, name)


# ------------------------------------------------------------------------------------------ passes and FLOPs
class _PassRecorder:
    """Wraps the backends: every PassRequest a call makes, with its result."""

    def __init__(self, monkeypatch):
        self.passes = []
        original = custom_ops.backend_for

        def recording_backend_for(backend, device):
            module = original(backend, device)
            recorder = self

            class Recording:
                @staticmethod
                def run_pass(request):
                    result = module.run_pass(request)
                    recorder.passes.append((request, result))
                    return result

            return Recording

        monkeypatch.setattr(custom_ops, "backend_for", recording_backend_for)


class _MatmulFlops(TorchDispatchMode):
    """FLOPs of the matrix products (mm, addmm) run anywhere, inside the custom ops too."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = run_inside_custom_op(self, func, args, kwargs)
        if inside is not None:
            return inside
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2:] if name != "mm" else args[:2]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("how", ["no_grad", "no_input_requires_grad"])
def test_no_grad_call_is_one_statistics_pass(path, how, monkeypatch):
    recorder = _PassRecorder(monkeypatch)
    problem = make_problem((4, 9), 32, 300, torch.float32, path[0], weighted=False,
                           requires_grad=how == "no_grad")
    counted = int((problem.target != -100).sum())
    flops = _MatmulFlops()
    with torch.no_grad() if how == "no_grad" else torch.enable_grad(), flops:
        log_prob, entropy = fused_wce.linear_log_prob(problem.hidden, problem.weight, problem.target,
                                                      return_entropy=True, backend=path[1], chunk_size=8)
    assert not log_prob.requires_grad and not entropy.requires_grad
    assert len(recorder.passes) == 1
    request, result = recorder.passes[0]
    assert request.coef is None and request.known is None and request.num_tokens == counted
    assert result.gradients == (None, None, None)
    # The CPU path's logits blocks are the only products; the Triton path's stats kernel is no aten matmul.
    expected = 2 * counted * 32 * 300 if path[1] == "torch" else 0
    assert flops.flops == expected


@pytest.mark.parametrize("frozen_weight", [False, True], ids=["head", "frozen_head"])
def test_backward_is_one_gradient_pass_with_the_forward_statistics(path, frozen_weight, monkeypatch):
    recorder = _PassRecorder(monkeypatch)
    problem = make_problem((4, 9), 32, 300, torch.float32, path[0], weighted=False, bias=True)
    problem.weight.requires_grad_(not frozen_weight)
    problem.bias.requires_grad_(not frozen_weight)
    counted = int((problem.target != -100).sum())
    flops = _MatmulFlops()
    with flops:
        log_prob, entropy = fused_wce.linear_log_prob(problem.hidden, problem.weight, problem.target,
                                                      bias=problem.bias, return_entropy=True, backend=path[1])
        (request, _), = recorder.passes
        assert request.coef is None  # the forward is the statistics pass alone
        (log_prob * 2.0 - entropy).sum().backward()
    assert len(recorder.passes) == 2
    request, result = recorder.passes[1]
    assert request.known is not None and request.entropy_coef is not None and result.stats is None
    # Upstream 2 on log_prob is coef -2; -1 on entropy is entropy_coef -1 (fp32: no gradient scale).
    assert torch.equal(request.coef, torch.full((counted,), -2.0, device=path[0]))
    assert torch.equal(request.entropy_coef, torch.full((counted,), -1.0, device=path[0]))
    assert (result.gradients.weight is None) == frozen_weight and (result.gradients.bias is None) == frozen_weight
    if path[1] == "torch":  # forward logits, backward logits + dX (+ dW): no second statistics pass
        assert flops.flops == 2 * counted * 32 * 300 * (3 if frozen_weight else 4)


@pytest.mark.parametrize("variant", ["plain", "softcap+scale+temperature"])
def test_no_allocation_of_n_times_v(path, variant):
    """Forward and backward of both outputs never hold a tensor of N * V elements, and nothing [V]-wide has
    more than a chunk's rows."""
    num_tokens, hidden_size, vocab_size, chunk = 64, 24, 700, 16  # N > H: the [V, H] gradients are below N V
    problem = make_problem((num_tokens,), hidden_size, vocab_size, torch.float32, path[0], bias=True,
                           ignore_fraction=0.0, weighted=False)
    recorder = AllocationRecorder()
    with recorder:
        log_prob, entropy = fused_wce.linear_log_prob(problem.hidden, problem.weight, problem.target,
                                                      bias=problem.bias, return_entropy=True, backend=path[1],
                                                      chunk_size=chunk, **VARIANTS[variant])
        (log_prob + entropy).sum().backward()
    name, shape = recorder.largest()
    assert torch.Size(shape).numel() < num_tokens * vocab_size, f"{name} allocated {shape}"
    wide = [s for _, s in recorder.shapes if len(s) == 2 and s[1] == vocab_size]
    assert wide and all(s[0] <= 2 * chunk for s in wide), wide


def test_entropy_coefficient_in_a_pass_that_finds_its_statistics(path):
    """A gradient pass with entropy coefficients and no known statistics (the kernels' HAS_ENTROPY_GRAD with the
    statistics found in the same pass) gives the gradients of the pass given the statistics."""
    problem = make_problem((37,), 40, 500, torch.float32, path[0], bias=True, weighted=False, ignore_fraction=0.0,
                           requires_grad=False)
    options = LossOptions(softcap=5.0, logit_scale=1.2, chunk_size=16, compute_dtype=torch.float32)
    coef, entropy_coef = (torch.randn(37, device=path[0]) for _ in range(2))
    backend = custom_ops.backend_for(path[1], problem.hidden.device)

    def run(known=None):
        request = PassRequest(problem.hidden, problem.weight, problem.bias, problem.target, options,
                              torch.float32, torch.float32, coef=coef, need_grad_hidden=True, need_grad_weight=True,
                              need_grad_bias=True, entropy_coef=entropy_coef, known=known)
        return backend.run_pass(request)

    found = run()
    given = run(KnownRowStats(found.stats.lse, found.stats.entropy))
    ref = fused_wce.reference_linear_log_prob(*(t.requires_grad_() for t in (problem.hidden, problem.weight)),
                                              problem.target, bias=problem.bias.requires_grad_(), return_entropy=True,
                                              softcap=5.0, logit_scale=1.2)
    ref_grads = torch.autograd.grad(_objective(*ref, (-coef.double(), entropy_coef.double())),
                                    [problem.hidden, problem.weight, problem.bias])
    for name, a, b, expected in zip(("hidden", "weight", "bias"), found.gradients, given.gradients, ref_grads):
        assert_close(a, expected, None, torch.float32, name)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_temperature_is_a_rescaled_softcap():
    """The identity the kernels rely on: softcap(s r) / T is the softcap of width cap / T of (s / T) r."""
    options = LossOptions(softcap=30.0, logit_scale=0.5).tempered(0.6)
    assert options.softcap == pytest.approx(50.0) and options.logit_scale == pytest.approx(0.5 / 0.6)
    raw = torch.randn(1000, dtype=torch.float64) * 80
    tempered = 30.0 * torch.tanh(0.5 * raw / 30.0) / 0.6
    rescaled = options.softcap * torch.tanh(options.logit_scale * raw / options.softcap)
    torch.testing.assert_close(rescaled, tempered, rtol=1e-14, atol=0)
    assert LossOptions().tempered(1.0) == LossOptions()


# ------------------------------------------------------------------------------------ custom ops and compile
def _op_arguments(problem, **option):
    option.setdefault("compute_dtype", problem.hidden.dtype)
    keywords = LossOptions(chunk_size=8, **option).op_kwargs(LOG_PROB_FIELDS)
    return (problem.hidden, problem.weight, problem.bias, problem.target), keywords


@pytest.mark.parametrize("option", [{}, dict(softcap=3.0, logit_scale=0.8), dict(lean_memory=True)],
                         ids=["plain", "softcap", "lean"])
def test_opcheck_forward(device, option):
    problem = make_problem((24,), 16, 200, torch.float32, device, bias=True, weighted=False, seed=1)
    tensors, keywords = _op_arguments(problem, **option)
    torch.library.opcheck(_log_prob_op, tensors, keywords)


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_opcheck_backward(device, upstream):
    problem = make_problem((24,), 16, 200, torch.float32, device, bias=True, weighted=False, seed=2)
    tensors, keywords = _op_arguments(problem)
    with torch.no_grad():
        _, entropy, lse = _log_prob_op(*tensors, **keywords)
    grad_log_prob, grad_entropy = (None if g is None else g.float() for g in _upstream(upstream, (24,), device))
    detached = tuple(None if t is None else t.detach() for t in tensors)
    torch.library.opcheck(_log_prob_backward_op, (*detached, lse, entropy, grad_log_prob, grad_entropy),
                          dict(keywords, grad_hidden=True, grad_weight=True, grad_bias=True))


def _grpo_like(hidden, weight, target, advantage, bias):
    log_prob, entropy = fused_wce.linear_log_prob(hidden, weight, target, bias=bias, return_entropy=True,
                                                  temperature=0.9, softcap=30.0)
    return -(advantage * log_prob.exp() / log_prob.detach().exp()).sum() - 0.01 * entropy.sum(), log_prob


def test_fullgraph_compile_is_one_node_without_recompiles(device):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_grpo_like, fullgraph=True, backend=counter)
    counted = set()
    for seed in range(3):  # a different number of ignored tokens each time
        problem = make_problem((4, 9), 32, 300, torch.float32, device, bias=True, seed=seed, ignore_fraction=0.3,
                               weighted=False)
        counted.add(int((problem.target != -100).sum()))
        advantage = torch.randn(4, 9, device=device)
        inputs = (problem.hidden, problem.weight, problem.target, advantage, problem.bias)
        loss, log_prob = compiled(*inputs)
        grads = torch.autograd.grad(loss, [problem.hidden, problem.weight, problem.bias])
        eager_loss, eager_log_prob = _grpo_like(*inputs)
        eager_grads = torch.autograd.grad(eager_loss, [problem.hidden, problem.weight, problem.bias])
        torch.testing.assert_close(log_prob, eager_log_prob, rtol=0, atol=0)
        torch.testing.assert_close(loss, eager_loss)
        for grad, eager_grad in zip(grads, eager_grads):
            torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-7)
    assert len(counted) == 3, "the check needs three different counts"
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    ops = [node.target for graph in counter.graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert sum(op is torch.ops.fused_wce.linear_log_prob.default for op in ops) == 1, ops


def test_ops_are_cudagraph_unsafe():
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("this torch has no cudagraph_unsafe tag")
    assert torch.Tag.cudagraph_unsafe in torch.ops.fused_wce.linear_log_prob.default.tags
    assert torch.Tag.cudagraph_unsafe in torch.ops.fused_wce.linear_log_prob_backward.default.tags


# ------------------------------------------------------------------------------------------------ bad input
H, V = 8, 20
BAD = [
    # (name, keyword overrides, exception, message fragment)
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature negative", dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature inf", dict(temperature=float("inf")), ValueError, "temperature"),
    ("temperature nan", dict(temperature=float("nan")), ValueError, "temperature"),
    ("temperature str", dict(temperature="1"), TypeError, "temperature"),
    ("temperature bool", dict(temperature=True), TypeError, "temperature"),
    ("temperature overflows the scale", dict(temperature=1e-320), ValueError, "temperature"),
    ("return_entropy int", dict(return_entropy=1), TypeError, "return_entropy"),
    ("softcap 0", dict(softcap=0.0), ValueError, "softcap"),
    ("logit_scale negative", dict(logit_scale=-2.0), ValueError, "logit_scale"),
    ("ignore_index float", dict(ignore_index=1.5), TypeError, "ignore_index"),
    ("chunk_size 0", dict(chunk_size=0), ValueError, "chunk_size"),
    ("backend", dict(backend="cuda"), ValueError, "backend"),
    ("logits_gemm", dict(logits_gemm="tiled"), ValueError, "logits_gemm"),
    ("compute_dtype", dict(compute_dtype=torch.float64), TypeError, "compute_dtype"),
    ("target too large", dict(target=torch.full((2, 3), V)), ValueError, "target"),
    ("target float", dict(target=torch.zeros(2, 3)), TypeError, "target"),
    ("target shape", dict(target=torch.zeros(6, dtype=torch.long)), ValueError, "target shape"),
    ("weight dtype", dict(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "weight.dtype"),
    ("hidden size", dict(weight=torch.randn(V, H + 1)), ValueError, "weight.shape[1]"),
    ("bias shape", dict(bias=torch.randn(V + 1)), ValueError, "bias"),
]


@pytest.mark.parametrize("name, overrides, error, fragment", BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_named(name, overrides, error, fragment, monkeypatch):
    import fused_wce.backends.torch_blocks as backend

    def no_launch(request):
        raise AssertionError("a pass ran before the bad input was rejected")

    monkeypatch.setattr(backend, "run_pass", no_launch)
    args = dict(hidden=torch.randn(2, 3, H), weight=torch.randn(V, H), target=torch.randint(0, V, (2, 3)))
    args.update(overrides)
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        fused_wce.linear_log_prob(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)


def test_lean_frozen_hidden_runs_only_the_slabs(path, monkeypatch):
    """With known statistics and only the weight's gradient wanted in lean mode, the slabs are the whole pass."""
    recorder = _PassRecorder(monkeypatch)
    problem = make_problem((3, 10), 32, 300, torch.bfloat16, path[0], weighted=False)
    problem.hidden.requires_grad_(False)
    log_prob, entropy = fused_wce.linear_log_prob(problem.hidden, problem.weight, problem.target, return_entropy=True,
                                                  backend=path[1], lean_memory=True)
    upstream = _upstream("both", problem.target.shape, path[0])
    grad, = torch.autograd.grad(_objective(log_prob, entropy, upstream), [problem.weight])
    ref = fused_wce.reference_linear_log_prob(problem.hidden, problem.weight, problem.target, return_entropy=True)
    ref_grad, = torch.autograd.grad(_objective(*ref, upstream), [problem.weight])
    assert_close(grad, ref_grad, None, torch.bfloat16, "grad_weight")
    request, result = recorder.passes[-1]
    assert request.lean and result.gradients.hidden is None
