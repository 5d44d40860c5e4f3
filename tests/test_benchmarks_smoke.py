"""The benchmark suite: its accuracy reference, its workloads, and a smoke run of the CPU mode end to end."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fused_wce
from benchmarks import cli, measure, report, roofline
from benchmarks.providers import PROVIDERS_BY_NAME
from benchmarks.reference import fp32_log_prob_reference, fp32_reference, relative_error
from benchmarks.runner import CPU_PROVIDERS, LOG_PROB_PROVIDERS, MODES
from benchmarks.workloads import (CPU_SMOKE, HEADLINE_GPU, VARIANTS, counted_mask, make_inputs, policy_objective,
                                  workload)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_fp32_reference_matches_float64_reference(frozen_head, fraction, variant):
    # Small chunks so that several chunks (and a ragged last one) are exercised.
    spec = workload("smoke", 300, fraction, dtype="float32", frozen_head=frozen_head, variant=variant)
    inputs = make_inputs(spec, "cpu", seed=3)
    reference = fp32_reference(inputs.hidden, inputs.weight, inputs.target, inputs.token_weight,
                               need_grad_weight=not frozen_head, chunk_bytes=4 * 1000 * 70, **spec.loss_keywords)
    hidden = inputs.hidden.clone().double().requires_grad_(True)
    weight = inputs.weight.clone().double().requires_grad_(True)
    expected = fused_wce.reference_linear_cross_entropy(hidden, weight, inputs.target, inputs.token_weight,
                                                        **spec.loss_keywords)
    expected.backward()
    assert abs(reference.loss.item() - expected.item()) <= 1e-6 * abs(expected.item())
    assert relative_error(reference.grad_hidden, hidden.grad) < 1e-5
    # Uncounted rows have exactly zero gradient.
    uncounted = inputs.token_weight == 0
    assert torch.count_nonzero(reference.grad_hidden[uncounted]) == 0
    if frozen_head:
        assert reference.grad_weight is None
    else:
        assert relative_error(reference.grad_weight, weight.grad) < 1e-5


def _float64_log_prob_objective(inputs, **variant):
    """The log-prob workloads' objective from fused_wce.reference_linear_log_prob in float64, and its gradients."""
    hidden = inputs.hidden.clone().double().requires_grad_(True)
    weight = inputs.weight.clone().double().requires_grad_(True)
    log_prob, entropy = fused_wce.reference_linear_log_prob(hidden, weight, inputs.target, return_entropy=True,
                                                            **variant)
    objective = policy_objective(log_prob, entropy, inputs.target, inputs.token_weight.double())
    objective.backward()
    return objective.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("variant", ["plain", "softcap", "logit_scale"])
def test_fp32_log_prob_reference_matches_float64_reference(variant):
    spec = workload("smoke", 2048, 0.5, dtype="float32", objective="log_prob", variant=variant)  # 4 answers
    inputs = make_inputs(spec, "cpu", seed=4)
    advantage = inputs.token_weight
    assert (advantage < 0).any() and (advantage > 0).any()  # signed, like GRPO's advantages
    assert torch.equal(advantage != 0, inputs.target != -100)
    reference = fp32_log_prob_reference(inputs.hidden, inputs.weight, inputs.target, advantage,
                                        chunk_bytes=4 * 1000 * 70, **spec.loss_keywords)
    expected, expected_hidden, expected_weight = _float64_log_prob_objective(inputs, **spec.loss_keywords)
    assert abs(reference.loss.item() - expected.item()) <= 1e-6 * abs(expected.item())
    assert relative_error(reference.grad_hidden, expected_hidden) < 1e-5
    assert relative_error(reference.grad_weight, expected_weight) < 1e-5


@pytest.mark.parametrize("provider", LOG_PROB_PROVIDERS)
@pytest.mark.parametrize("variant", ["plain", "softcap"])
def test_log_prob_providers_match_float64_reference(provider, variant):
    """fused_wce's, TRL's and the materialised log-probs (and entropies) give the same objective and gradients."""
    spec = workload("smoke", 200, 0.5, dtype="float32", objective="log_prob", variant=variant)
    inputs = make_inputs(spec, "cpu", seed=6)
    chosen = PROVIDERS_BY_NAME[provider]
    assert chosen.objective == "log_prob" and chosen.variant_support(spec.loss_keywords) is None
    objective_fn = chosen.make("cpu", spec.loss_keywords)
    hidden, weight = (t.clone().requires_grad_(True) for t in (inputs.hidden, inputs.weight))
    objective = objective_fn(hidden, weight, inputs.target, inputs.token_weight)
    objective.backward()
    expected, expected_hidden, expected_weight = _float64_log_prob_objective(inputs, **spec.loss_keywords)
    assert abs(objective.item() - expected.item()) <= 1e-5 * abs(expected.item())
    assert relative_error(hidden.grad, expected_hidden) < 1e-5
    assert relative_error(weight.grad, expected_weight) < 1e-5


@pytest.mark.parametrize("tokens,fraction", [(4096, 0.5), (1000, 0.5), (64, 1.0), (700, 0.25)])
def test_counted_fraction_is_exact_and_in_spans(tokens, fraction):
    mask = counted_mask(tokens, fraction)
    assert abs(mask.float().mean().item() - fraction) <= 1.0 / 512 + 1.0 / tokens
    # assistant-only SFT: counted tokens come in contiguous spans (few switches), not scattered
    switches = (mask[1:] != mask[:-1]).sum().item()
    assert switches <= 2 * math.ceil(tokens / 512)


def test_inputs_look_like_hidden_states():
    spec = workload("smoke", 256, 0.5, dtype="float32")
    inputs = make_inputs(spec, "cpu", seed=0, rotations=2)
    assert 0.9 < inputs.hidden.pow(2).mean().sqrt().item() < 1.1  # unit RMS, like post-RMSNorm states
    logits = inputs.hidden @ inputs.weight.T
    assert 1.5 < logits.std().item() < 2.5
    assert not torch.equal(inputs.hidden, inputs.extra_hidden[0])
    counted = inputs.target != -100
    assert torch.equal(counted, inputs.token_weight > 0)
    assert set(inputs.token_weight[counted].unique().tolist()) <= {0.5, 1.0}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    scratch = tmp_path_factory.mktemp("scratch")  # TMPDIR of the run and its workers: must stay empty
    env = dict(os.environ, TMPDIR=str(scratch))
    env.pop("TRITON_INTERPRET", None)
    completed = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)], cwd=REPO_ROOT,
                               env=env, capture_output=True, text=True, timeout=3600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return out, completed.stdout, scratch


def test_smoke_run_writes_every_output_and_no_other_file(smoke_run):
    out, stdout, scratch = smoke_run
    for name in ("results.csv", "results.json", "results.md", "e2e.csv"):
        assert (out / name).stat().st_size > 0, name
    plots = list((out / "plots").glob("*.png"))
    assert len(plots) >= 2 * len(MODES)  # time and memory against N per (fraction, mode)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert "== targets ==" in stdout
    # Nothing temporary is left: no work directory, no saved tensors, nothing in TMPDIR; worker logs only
    # where a worker wrote to stderr.
    outputs = {"results.csv", "results.json", "results.md", "e2e.csv", "rows_raw.jsonl", "plots", "worker_logs"}
    assert {path.name for path in out.iterdir()} <= outputs
    assert not list(out.rglob("*.pt"))
    assert all(path.suffix == ".log" and path.stat().st_size > 0 for path in out.glob("worker_logs/*"))
    assert not list(scratch.iterdir()), sorted(str(p) for p in scratch.rglob("*"))[:20]


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"plain"}))
def test_eager_variant_matches_float64_reference(variant):
    """The eager provider writes each loss variant by hand on materialised logits: same loss and gradients."""
    spec = workload("smoke", 200, 0.5, dtype="float32", variant=variant)
    inputs = make_inputs(spec, "cpu", seed=5)
    provider = PROVIDERS_BY_NAME["torch_eager"]
    assert provider.variant_support(spec.loss_keywords) is None
    loss_fn = provider.make("cpu", spec.loss_keywords)
    results = []
    for fn, dtype in ((loss_fn, torch.float32), (fused_wce.reference_linear_cross_entropy, torch.float64)):
        hidden = inputs.hidden.clone().to(dtype).requires_grad_(True)
        weight = inputs.weight.clone().to(dtype).requires_grad_(True)
        extra = spec.loss_keywords if fn is not loss_fn else {}
        loss = fn(hidden, weight, inputs.target, inputs.token_weight, **extra)
        loss.backward()
        results.append((loss.item(), hidden.grad, weight.grad))
    (loss, grad_hidden, grad_weight), (expected, expected_hidden, expected_weight) = results
    assert abs(loss - expected) <= 1e-5 * abs(expected)
    assert relative_error(grad_hidden, expected_hidden) < 1e-5
    assert relative_error(grad_weight, expected_weight) < 1e-5


def test_variant_support_names_what_is_missing():
    everything = VARIANTS["all"]
    assert PROVIDERS_BY_NAME["fused_wce"].variant_support(everything) is None
    assert PROVIDERS_BY_NAME["torch_eager"].variant_support(everything) is None
    assert PROVIDERS_BY_NAME["trl_chunked"].variant_support(VARIANTS["softcap"]) is None
    reason = PROVIDERS_BY_NAME["trl_chunked"].variant_support(everything)
    assert "label_smoothing" in reason and "z_loss" in reason and "softcap" not in reason.split("(")[0]
    assert PROVIDERS_BY_NAME["liger"].variant_support(VARIANTS["z_loss"]) is None
    assert "logit_scale" in PROVIDERS_BY_NAME["liger"].variant_support(everything)
    assert PROVIDERS_BY_NAME["torch_chunked"].variant_support(VARIANTS["label_smoothing"])


def test_smoke_run_has_a_sane_row_per_provider(smoke_run):
    out, _, _ = smoke_run
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = {(w.name, p, m) for w in CPU_SMOKE for p in CPU_PROVIDERS for m in w.modes
                if PROVIDERS_BY_NAME[p].objective == w.objective}
    seen = {(r["workload"], r["provider"], r["mode"]) for r in rows}
    assert expected == seen
    assert {r["provider"] for r in rows if r["objective"] == "log_prob"} == set(LOG_PROB_PROVIDERS)
    # At least one loss-variant row was measured and checked; a provider that cannot express a variant has a
    # skipped row that says why.
    variant_rows = [r for r in rows if r["variant"] != "plain"]
    assert {r["variant"] for r in variant_rows if r["status"] == "ok"} >= {"all", "softcap"}
    for row in variant_rows:
        keywords = VARIANTS[row["variant"]]
        reason = PROVIDERS_BY_NAME[row["provider"]].variant_support(keywords)
        assert row["status"] == ("ok" if reason is None else "skipped"), row
        if reason is not None:
            assert row["reason"] == reason and "cannot express" in reason
        else:
            assert row["mode"] == "forward_backward" and float(row["time_vs_plain"]) > 0
    assert {r["provider"] for r in variant_rows if r["variant"] == "all" and r["status"] == "ok"} == {
        "torch_eager", "fused_wce"}
    for row in rows:
        if row["status"] == "skipped":
            continue
        assert row["status"] == "ok", row
        assert 0 < float(row["time_ms"]) < 60_000
        peak, peak_rss = float(row["peak_memory_bytes"]), float(row["peak_rss_bytes"])
        assert 0 <= peak < 1 << 30 and 0 <= peak_rss < 1 << 30
        if row["mode"] == "forward_backward":  # the gradients it returns were allocated in the measured call
            tokens, hidden, vocab = int(row["tokens"]), int(row["hidden"]), int(row["vocab"])
            assert peak >= 4 * (tokens * hidden + vocab * hidden), row
        assert 0 < float(row["busy_threads"]) and int(row["repeats"]) == 1
        assert float(row["tflops"]) > 0
        assert row["accurate"] == "True", row
        assert float(row["loss_rel_err"]) < 1e-4
        if row["mode"] == "forward_backward":
            assert float(row["grad_hidden_rel_err"]) < 1e-4
            assert float(row["grad_weight_rel_err"]) < 1e-4
        assert row["card"].startswith("CPU") and row["torch"] == torch.__version__
        assert row["weights_used"] == "weighted"  # every CPU provider takes the per-token weights


def test_smoke_run_json_targets_and_end_to_end(smoke_run):
    out, _, _ = smoke_run
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["versions"]["torch"]
    assert data["environment"]["gemm"]["tflops"] > 0
    verdicts = {t["target"]: t["verdict"] for t in data["targets"]}
    assert len(verdicts) == 2 and all(v in ("met", "not met", "not measured") for v in verdicts.values())
    assert all(v != "not measured" for v in verdicts.values())  # both providers ran, so both were read
    e2e = {row["provider"]: row for row in data["e2e"]}
    assert set(e2e) == {"hf_model_loss", "trl_fused_lm_head", "fused_wce"}
    for row in e2e.values():
        assert row["status"] == "ok", row
        assert math.isfinite(row["loss"]) and row["time_ms"] > 0
        # a training step allocates a gradient for every parameter (fp32 here): the peak cannot be below that
        assert 4 * row["n_params"] <= row["peak_memory_bytes"] < 1 << 30, row
        assert 0 <= row["peak_rss_bytes"] < 1 << 30 and measure.ALLOCATED_METHOD in row["memory_method"]
    if measure.rss_high_water_supported():
        assert data["environment"]["cpu_memory_method"] == measure.RSS_METHOD_HIGH_WATER
        assert all(measure.RSS_METHOD_HIGH_WATER in row["memory_method"] for row in data["e2e"])
    markdown = (out / "results.md").read_text()
    for provider in CPU_PROVIDERS:
        assert f"| {provider} |" in markdown
    assert "| smoke/N128/50pct/float32/log_prob | plain | forward | fused_wce_log_prob |" in markdown
    assert "| variant |" in markdown and "| all | forward_backward | fused_wce |" in markdown


@pytest.mark.skipif(not measure.rss_high_water_supported(), reason="the peak RSS cannot be reset on this OS")
def test_rss_peak_sees_a_step_after_memory_was_freed():
    """The CPU peak is exact in a process that allocated and freed more before: what the allocator kept from
    earlier steps would otherwise absorb the step's allocations (the end-to-end row once read 4 KiB)."""
    mib = 1 << 20

    def allocate(total_mib, piece_mib):
        pieces = [torch.ones(piece_mib * mib // 4) for _ in range(total_mib // piece_mib)]
        return sum(piece.numel() * 4 for piece in pieces)

    allocate(256, 1)  # 1 MiB pieces: below glibc's mmap threshold once it has grown, kept on the heap when freed
    allocate(256, 64)
    for total, piece in ((64, 1), (96, 32), (160, 80)):
        peak, baseline, method = measure.rss_peak_above(lambda: allocate(total, piece))
        assert method == measure.RSS_METHOD_HIGH_WATER and baseline > 0
        assert (total - 1) * mib <= peak <= (total + 8) * mib, (total, piece, peak / mib)  # pages kept: < 1 MiB


def test_cpu_allocated_peak_counts_tensors_alive_at_the_peak():
    """The CPU peak of torch's allocations: a 24 MiB tensor alive while a 40 MiB one comes and goes is 64 MiB;
    what was allocated before the step does not count, what the step frees before its peak does not add up."""
    mib = 1 << 20
    before = torch.ones(16 * mib // 4)

    def step():
        first = torch.ones(8 * mib // 4)
        del first
        kept = torch.ones(24 * mib // 4)
        transient = torch.ones(40 * mib // 4)
        del transient
        return kept

    peak = measure.cpu_allocated_peak_above(step)
    assert peak is not None and 64 * mib <= peak <= 64 * mib + (1 << 16)
    assert before.numel()


def test_smoke_run_has_no_roofline_columns_on_cpu(smoke_run):
    """The CPU mode is not predicted: no prediction column in the CSV, the JSON rows or the Markdown."""
    out, stdout, _ = smoke_run
    with open(out / "results.csv") as handle:
        columns = next(csv.reader(handle))
    assert not set(report.ROOFLINE_COLUMNS) & set(columns)
    data = json.loads((out / "results.json").read_text())
    assert all("predicted_ms" not in row for row in data["rows"])
    markdown = (out / "results.md").read_text()
    assert "predicted ms" not in markdown and "Roofline gaps" not in markdown
    assert "roofline gaps" not in stdout


# --- roofline prediction beside each GPU measurement (unit test on fake CUDA rows: no GPU needed) -------------
def _fake_cuda_row(spec, provider, mode, time_ms, peak_bytes, status="ok"):
    raw = {"workload_params": spec.params(), "provider": provider, "mode": mode, "device": "cuda", "status": status,
           "weights_support": PROVIDERS_BY_NAME[provider].weights_support, "exact": PROVIDERS_BY_NAME[provider].exact}
    if status == "ok":
        raw.update(time_ms=time_ms, time_p20_ms=time_ms, time_p80_ms=time_ms, peak_memory_bytes=peak_bytes,
                   loss_rel_err=1e-3, grad_hidden_rel_err=2e-3, grad_weight_rel_err=2e-3, weights_used="weighted")
    else:
        raw["reason"] = "worker exited with -11"
    return raw


def _predicted(provider, spec, card="H200"):
    return roofline.predict(provider, roofline.Problem.of(spec), roofline.CARDS[card])


def test_roofline_columns_beside_fake_gpu_rows():
    environment = {"card": "NVIDIA H200", "versions": {}}
    frozen = workload("Llama-3-8B", 16384, 0.5, frozen_head=True)
    softcap = workload("Gemma-2-2B", 8192, 0.5, variant="softcap")
    fused, liger = _predicted("fused_wce", HEADLINE_GPU), _predicted("liger", HEADLINE_GPU)
    fused_frozen, cce_softcap = _predicted("fused_wce", frozen), _predicted("cce_exact", softcap)
    raw = [
        # within 20%: 1.1x the predicted time, the predicted peak
        _fake_cuda_row(HEADLINE_GPU, "fused_wce", "forward_backward", fused.time_s * 1e3 * 1.1, fused.peak_bytes),
        # a time gap (1.5x) and a peak gap (0.5x)
        _fake_cuda_row(HEADLINE_GPU, "liger", "forward_backward", liger.time_s * 1e3 * 1.5, liger.peak_bytes / 2),
        # forward only: not modelled
        _fake_cuda_row(HEADLINE_GPU, "fused_wce", "forward", 12.0, 1 << 30),
        # a crashed row: nothing to compare
        _fake_cuda_row(HEADLINE_GPU, "cce", "forward_backward", None, None, status="crashed"),
        # frozen head and a loss variant get their own problem's prediction (the variant's plain problem)
        _fake_cuda_row(frozen, "fused_wce", "forward_backward", fused_frozen.time_s * 1e3, fused_frozen.peak_bytes),
        _fake_cuda_row(softcap, "cce_exact", "forward_backward", cce_softcap.time_s * 1e3 * 0.7,
                       cce_softcap.peak_bytes * 1.05),
    ]
    rows = [report.flatten(row, environment, 790.0) for row in raw]
    report.add_relative_columns(rows)
    gaps = report.add_roofline_columns(rows, environment)
    good, gap, forward, crashed, frozen_row, variant_row = rows

    assert environment["roofline_card"] == "H200" and "roofline_card_note" not in environment
    assert good["predicted_ms"] == pytest.approx(fused.time_s * 1e3)
    assert good["measured_over_predicted"] == pytest.approx(1.1, abs=1e-3)
    assert good["predicted_peak_mib"] == pytest.approx(fused.peak_bytes / 2**20)
    assert good["peak_over_predicted"] == pytest.approx(1.0) and good["needs_note"] is False
    assert gap["measured_over_predicted"] == pytest.approx(1.5, abs=1e-3)
    assert gap["peak_over_predicted"] == pytest.approx(0.5, abs=1e-3) and gap["needs_note"] is True
    for row in (forward, crashed):
        assert row["roofline_card"] == "H200"
        assert row["predicted_ms"] is None and row["needs_note"] is None
    assert frozen_row["predicted_ms"] == pytest.approx(fused_frozen.time_s * 1e3)
    assert frozen_row["predicted_ms"] < good["predicted_ms"] and frozen_row["needs_note"] is False
    assert variant_row["measured_over_predicted"] == pytest.approx(0.7, abs=1e-3) and variant_row["needs_note"]
    assert gaps == [gap, variant_row] == report.roofline_gaps(rows)

    markdown = report.markdown(environment, rows, [], [], [], [])
    header = next(line for line in markdown.splitlines() if line.startswith("| workload | variant"))
    for column in ("predicted ms", "measured/predicted", "predicted peak MiB", "needs note"):
        assert f"| {column} |" in header
    separator = markdown.splitlines()[markdown.splitlines().index(header) + 1]
    assert separator.count("|") == header.count("|")
    assert "## Roofline gaps over 20%" in markdown and "H200 values" in markdown
    gap_section = markdown.split("## Roofline gaps over 20%")[1]
    assert f"- {HEADLINE_GPU.name} forward_backward liger: time" in gap_section and "(1.5x)" in gap_section
    assert "peak" in gap_section and "(0.5x)" in gap_section
    assert f"{softcap.name} forward_backward cce_exact" in gap_section
    assert "fused_wce:" not in gap_section


def test_roofline_models_the_log_prob_providers():
    """fused_wce's and TRL's log-probs run 8 M H V FLOPs on the counted rows (statistics, then one recomputing
    gradient pass), the materialised log_softmax 6 N H V on every row; a measured log-prob row gets its own
    provider's prediction."""
    spec = workload("Llama-3-8B", 8192, 0.5, objective="log_prob")
    problem = roofline.Problem.of(spec)
    counted_gemm = 2 * problem.counted * problem.hidden * problem.vocab
    assert roofline.algorithm("fused_wce_log_prob", problem).flops == 4 * counted_gemm
    assert roofline.algorithm("trl_chunked_log_prob", problem).flops == 4 * counted_gemm
    assert roofline.algorithm("torch_log_softmax", problem).flops == 3 * counted_gemm * problem.tokens / problem.counted
    predicted = _predicted("fused_wce_log_prob", spec)
    naive = _predicted("torch_log_softmax", spec)
    assert naive.peak_bytes >= 4 * problem.tokens * problem.vocab * 4 > predicted.peak_bytes  # [N, V] fp32 blocks
    row = report.flatten(_fake_cuda_row(spec, "fused_wce_log_prob", "forward_backward", predicted.time_s * 1e3,
                                        predicted.peak_bytes), {"card": "NVIDIA H200", "versions": {}}, 790.0)
    report.add_roofline_columns([row], {"card": "NVIDIA H200", "versions": {}})
    assert row["predicted_ms"] == pytest.approx(predicted.time_s * 1e3) and row["needs_note"] is False


def test_roofline_columns_leave_cpu_rows_alone():
    spec = workload("cpu-32k", 1024, 1.0, dtype="float32")
    raw = {"workload_params": spec.params(), "provider": "fused_wce", "mode": "forward_backward", "device": "cpu",
           "status": "ok", "time_ms": 700.0, "peak_memory_bytes": 100 << 20}
    rows = [report.flatten(raw, {"card": "CPU: x", "versions": {}}, 1.0)]
    before = dict(rows[0])
    environment = {"card": "CPU: x"}
    assert report.add_roofline_columns(rows, environment) == []
    assert rows[0] == before and "roofline_card" not in environment
    assert "predicted ms" not in report.markdown(environment, rows, [], [], [], [])


@pytest.mark.parametrize("name,key,noted", [("NVIDIA H200", "H200", False), ("NVIDIA H100 80GB HBM3", "H100", False),
                                            ("NVIDIA A100-SXM4-80GB", "A100", False),
                                            ("NVIDIA GeForce RTX 4090", "H100", True), (None, "H100", True)])
def test_roofline_card_from_device_name(name, key, noted):
    got, note = report.roofline_card(name)
    assert got == key and (note is not None) == noted
    if noted:
        assert "H100" in note and repr(name) in note


def test_unknown_card_uses_h100_values_and_says_so():
    environment = {"card": "NVIDIA L40S", "versions": {}}
    h100 = _predicted("fused_wce", HEADLINE_GPU, "H100")
    rows = [report.flatten(_fake_cuda_row(HEADLINE_GPU, "fused_wce", "forward_backward", h100.time_s * 1e3,
                                          h100.peak_bytes), environment, None)]
    report.add_roofline_columns(rows, environment)
    assert rows[0]["roofline_card"] == "H100 SXM" and rows[0]["predicted_ms"] == pytest.approx(h100.time_s * 1e3)
    assert "L40S" in environment["roofline_card_note"]
    assert "Note: card 'NVIDIA L40S'" in report.markdown(environment, rows, [], [], [], [])


# --- subcommands -----------------------------------------------------------------------------------------------
def test_roofline_subcommand_writes_its_tables(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "benchmarks", "roofline", "--card", "A100", "--provider",
                                "fused_wce", "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=3600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    with open(tmp_path / "roofline.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["provider"] for r in rows} == {"fused_wce"} and {r["card"] for r in rows} == {"A100 SXM"}
    assert len(rows) == len(roofline.problems())
    assert "| fused_wce |" in completed.stdout


def test_static_and_roofline_subcommands_delegate(monkeypatch, capsys):
    import benchmarks.static as static

    calls = []
    monkeypatch.setattr(static, "main", lambda argv, prog: calls.append((argv, prog)) or 3)
    assert cli.main(["static", "--targets", "90", "--only", "combine"]) == 3
    assert calls == [(["--targets", "90", "--only", "combine"], "python -m benchmarks static")]
    with pytest.raises(SystemExit) as raised:
        cli.main(["roofline", "--help"])
    assert raised.value.code == 0
    assert "usage: python -m benchmarks roofline" in capsys.readouterr().out
    help_text = cli.make_parser().format_help()
    assert "static" in help_text and "roofline" in help_text and "--budget-s" in help_text
    with pytest.raises(SystemExit, match="budget-s"):
        cli.main(["--budget-s", "0"])
