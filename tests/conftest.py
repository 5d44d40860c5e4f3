"""Test configuration: Triton's CPU interpreter when there is no GPU, device/backend parametrisation."""
from __future__ import annotations

import os

# One intra-op thread for the tests and every process they start (set before torch is imported; a value set by
# the caller is kept). The tests' tensors are small, so a second thread gains nothing on an idle machine, and on a
# shared one OpenMP threads spin at every barrier while their partner waits for a core: with two busy processes
# beside it, test_linear_cross_entropy + test_loss_variants took 64 s with 2 threads and 23 s with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The gradient GEMMs are cuBLAS: under torch.use_deterministic_algorithms (test_determinism on CUDA) torch
# requires a fixed cuBLAS workspace, set before CUDA initialises.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # (in case torch was imported before this file)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is imported anywhere: @triton.jit reads it when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests build tiny models and tokenizers; nothing from a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default; silences its warning
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRETING:
    import interpreter_fixes

    interpreter_fixes.install()

# (device, backend) pairs every path test runs on: the CPU path, the Triton path (interpreted on CPU, compiled
# on CUDA), and on a GPU both backends on CUDA tensors.
PATHS = [("cpu", "torch"), ("cpu", "triton")] if INTERPRETING else [("cpu", "torch")]
if HAS_CUDA:
    PATHS += [("cuda", "triton"), ("cuda", "torch")]


# The Triton path's gradient pass has two plans for a chunk's logits (LossOptions.logits_gemm): the default
# ("cublas") runs on every Triton path above; the tests of the loss itself also run the other one, marked by a
# third element "tiled".
PLAN_PATHS = PATHS + [(device, "triton", "tiled") for device, backend in PATHS if backend == "triton"]


def path_id(path):
    return "-".join(path)


@pytest.fixture(params=PATHS, ids=path_id)
def path(request):
    """``(device, backend)`` of one execution path."""
    return request.param


@pytest.fixture(params=PLAN_PATHS, ids=path_id)
def every_plan_path(request, monkeypatch):
    """``path``, plus the Triton path's register-tiled logits plan (``(device, "triton", "tiled")``: "auto"
    selects it for the duration of the test). Test modules of the loss itself use it as their ``path``."""
    if len(request.param) == 3:
        import fused_wce.backends.triton_chunks as triton_chunks

        monkeypatch.setattr(triton_chunks, "DEFAULT_LOGITS_GEMM", "triton")
    return request.param


@pytest.fixture(params=["cpu", "cuda"] if HAS_CUDA else ["cpu"])
def device(request):
    """A device for tests of the default backend there (PyTorch on CPU, Triton on CUDA)."""
    return request.param


@pytest.fixture
def poison(monkeypatch):
    """Fill every buffer a pass must write in full with garbage (NaN / 7), so unwritten elements show."""
    import fused_wce.passes as passes

    def poisoned(*shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 7
        if dtype == torch.bool:
            fill = True
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(passes, "uninitialized", poisoned)


@pytest.fixture(scope="module")
def tokenizer():
    """The shipped tokenizer (ChatML template), one per test module."""
    from fused_wce.trl_integration.chat_data import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama_path(tokenizer, tmp_path_factory):
    """A saved tiny Llama: GRPOTrainer builds its reference model (beta > 0) from the policy's path."""
    from trl_helpers import tiny_model

    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", tokenizer).save_pretrained(path)
    return str(path)
