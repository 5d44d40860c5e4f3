"""Rows -> derived numbers, targets, CSV, JSON, a Markdown table and PNG plots."""
from __future__ import annotations

import csv
import json
import math
import os

MIB = 1 << 20

# Accuracy flag: relative error of the loss and of each gradient (Frobenius) at most this, per input dtype.
ACCURACY_TOLERANCE = {"bfloat16": 3e-2, "float16": 4e-3, "float32": 1e-4}

GPU_TARGETS = {"time_vs_fastest_exact_peer": 0.8, "fraction_of_gemm_rate": 0.8}
CPU_TARGETS = {"time_vs_torch_chunked": 1.0, "memory_vs_torch_chunked": 1.0}
# The roofline model (benchmarks/roofline.py) covers forward+backward only: a forward-only row gets no prediction.
ROOFLINE_MODES = ("forward_backward",)
ROOFLINE_COLUMNS = ("roofline_card", "predicted_ms", "measured_over_predicted", "predicted_peak_mib",
                    "peak_over_predicted", "needs_note")


def flatten(row: dict, environment: dict, gemm_tflops: float | None) -> dict:
    """One loss row with every parameter, environment field and derived number at the top level."""
    flat = {key: value for key, value in row.items() if key not in ("workload_params", "traceback")}
    params = row.get("workload_params") or {}
    flat.update(params)
    for key in ("card", "driver", "cuda", "torch", "triton", "date", "profile"):
        flat[key] = environment.get(key)
    for distribution, version in environment.get("versions", {}).items():
        flat[f"version_{distribution}"] = version
    if row.get("status") == "ok" and params and row.get("time_ms"):
        workload = _workload_of(params)
        flops = workload.counted_flops(row["mode"])
        flat["counted_flops"] = flops
        flat["tflops"] = flops / (row["time_ms"] * 1e-3) / 1e12
        flat["gemm_tflops"] = gemm_tflops
        flat["fraction_of_gemm"] = flat["tflops"] / gemm_tflops if gemm_tflops else None
    if row.get("peak_memory_bytes") is not None:
        flat["peak_memory_mib"] = row["peak_memory_bytes"] / MIB
    if row.get("peak_rss_bytes") is not None:
        flat["peak_rss_mib"] = row["peak_rss_bytes"] / MIB
    if row.get("status") == "ok" and "loss_rel_err" in row:
        tolerance = ACCURACY_TOLERANCE.get(params.get("dtype") or row.get("dtype"), 3e-2)
        errors = [row.get(key) for key in ("loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err")]
        flat["accurate"] = all(e is not None and e <= tolerance for e in errors if e is not None)
        flat["accuracy_tolerance"] = tolerance
    return flat


def add_relative_columns(rows: list[dict]) -> None:
    """``time_vs_fastest_exact_peer`` for every ok row of a (workload, mode), and for a loss-variant row
    ``time_vs_plain`` / ``memory_vs_plain``: the same provider's time and peak on the plain loss of the same problem."""
    plain = {}
    for row in rows:
        if row.get("status") == "ok" and row.get("workload") and row.get("variant", "plain") == "plain":
            plain[(row["workload"], row["provider"], row["mode"])] = row
    for row in rows:
        variant = row.get("variant", "plain")
        if row.get("status") != "ok" or variant == "plain" or not row.get("workload"):
            continue
        base = plain.get((row["workload"][:-len("/" + variant)], row["provider"], row["mode"]))
        if base is not None and base.get("time_ms"):
            row["time_vs_plain"] = row["time_ms"] / base["time_ms"]
            if base.get("peak_memory_bytes"):
                row["memory_vs_plain"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
    groups = {}
    for row in rows:
        if row.get("status") == "ok" and row.get("workload"):
            groups.setdefault((row["workload"], row["mode"]), []).append(row)
    for group in groups.values():
        peers = [r for r in group if not r["provider"].startswith("fused_wce") and r.get("exact")
                 and r.get("accurate", True)]
        if not peers:
            continue
        fastest = min(peers, key=lambda r: r["time_ms"])
        for row in group:
            row["fastest_exact_peer"] = fastest["provider"]
            row["time_vs_fastest_exact_peer"] = row["time_ms"] / fastest["time_ms"]


def roofline_card(device_name: str | None) -> tuple[str, str | None]:
    """The ``roofline.CARDS`` key for ``torch.cuda.get_device_name()``, and a note when the card is not modelled
    (then the H100's values are used: the closest Hopper part)."""
    name = (device_name or "").upper()
    for key in ("H200", "H100", "A100"):
        if key in name:
            return key, None
    return "H100", f"card {device_name!r} is not in benchmarks.roofline.CARDS: predictions use the H100's values"


def _workload_of(row: dict):
    from .workloads import SHAPES, Workload

    return Workload(SHAPES[row["shape"]], row["tokens"], row["counted_fraction"], row["dtype"], row["frozen_head"],
                    row["weights"], row["headline"], row.get("variant", "plain"), row.get("objective", "loss"))


def add_roofline_columns(rows: list[dict], environment: dict) -> list[dict]:
    """Put the roofline prediction beside every measured CUDA loss row; returns the rows whose gap needs a note.

    For each ok forward+backward row on ``cuda`` whose provider the model knows, ``roofline.predict(provider,
    Problem.of(workload), card)`` for the card of ``environment["card"]`` (``roofline_card``) and
    ``roofline.compare`` with the measured median time and peak give ``predicted_ms``,
    ``measured_over_predicted`` (time), ``predicted_peak_mib``, ``peak_over_predicted`` and ``needs_note`` (either
    ratio off by more than ``roofline.GAP_THRESHOLD``; each such gap is explained in benchmarks/NOTES.md).
    Loss-variant rows get their plain problem's prediction (the model does not price epilogues). Rows on other
    devices are left untouched (the CPU mode has no prediction columns); environment gets ``roofline_card`` and,
    for a card the model does not know, ``roofline_card_note``.
    """
    from . import roofline

    cuda_rows = [row for row in rows if row.get("device") == "cuda"]
    if not cuda_rows:
        return []
    key, note = roofline_card(environment.get("card"))
    card = roofline.CARDS[key]
    environment["roofline_card"] = card.name
    if note:
        environment["roofline_card_note"] = note
    gaps = []
    for row in cuda_rows:
        row.update({column: None for column in ROOFLINE_COLUMNS})
        row["roofline_card"] = card.name
        if (row.get("status") != "ok" or row.get("mode") not in ROOFLINE_MODES or not row.get("time_ms")
                or row.get("provider") not in roofline.PROVIDERS or not row.get("shape")):
            continue
        prediction = roofline.predict(row["provider"], roofline.Problem.of(_workload_of(row)), card)
        compared = roofline.compare(prediction, measured_s=row["time_ms"] * 1e-3,
                                    measured_peak_bytes=row.get("peak_memory_bytes"))
        row["predicted_ms"] = prediction.time_s * 1e3
        row["measured_over_predicted"] = compared["time_ratio"]
        row["predicted_peak_mib"] = prediction.peak_bytes / MIB
        row["peak_over_predicted"] = compared["memory_ratio"]
        row["needs_note"] = compared["needs_note"]
        if row["needs_note"]:
            gaps.append(row)
    return gaps


def roofline_gaps(rows: list[dict]) -> list[dict]:
    """Rows whose measurement is more than 20% off its roofline prediction (time or peak memory)."""
    return [row for row in rows if row.get("needs_note")]


def gap_line(row: dict) -> str:
    """One gap, as results.md and the console list it."""
    parts = []
    ratio = row.get("measured_over_predicted")
    if ratio is not None:
        parts.append(f"time {_fmt(row.get('time_ms'))} ms vs {_fmt(row.get('predicted_ms'))} predicted "
                     f"({_fmt(ratio)}x)")
    ratio = row.get("peak_over_predicted")
    if ratio is not None:
        parts.append(f"peak {_fmt(row.get('peak_memory_mib'))} MiB vs {_fmt(row.get('predicted_peak_mib'))} "
                     f"predicted ({_fmt(ratio)}x)")
    return f"{row.get('workload')} {row.get('mode')} {row.get('provider')}: " + "; ".join(parts)


def _find(rows, provider, workload, mode="forward_backward"):
    for row in rows:
        if row.get("provider") == provider and row.get("workload") == workload and row.get("mode") == mode:
            return row
    return None


def evaluate_targets(rows: list[dict], device: str, headline: str | None) -> list[dict]:
    """Each target: name, value, threshold, verdict ("met" / "not met" / "not measured") and how it was read."""
    targets = []

    def add(name, value, threshold, comparison, detail):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            verdict = "not measured"
        elif comparison == "<=":
            verdict = "met" if value <= threshold else "not met"
        elif comparison == "<":
            verdict = "met" if value < threshold else "not met"
        else:
            verdict = "met" if value >= threshold else "not met"
        targets.append({"target": name, "value": value, "threshold": threshold, "comparison": comparison,
                        "verdict": verdict, "detail": detail})

    fused = _find(rows, "fused_wce", headline) if headline else None
    fused_ok = fused is not None and fused.get("status") == "ok"
    accurate = fused_ok and fused.get("accurate", False)
    if device == "cuda":
        ratio = fused.get("time_vs_fastest_exact_peer") if fused_ok and accurate else None
        add("fused_wce fwd+bwd time / fastest exact peer", ratio, GPU_TARGETS["time_vs_fastest_exact_peer"], "<=",
            f"{headline}; fastest exact peer: {fused.get('fastest_exact_peer') if fused_ok else None}; "
            f"fused_wce accurate: {accurate}")
        fraction = fused.get("fraction_of_gemm") if fused_ok and accurate else None
        add("fused_wce fwd+bwd TFLOP/s on counted FLOPs / measured GEMM rate", fraction,
            GPU_TARGETS["fraction_of_gemm_rate"], ">=", f"{headline}; 6*N_valid*H*V FLOPs")
        liger = _find(rows, "liger", headline)
        value = None
        if fused_ok and accurate and liger is not None and liger.get("status") == "ok":
            value = fused["peak_memory_bytes"] / liger["peak_memory_bytes"]
        add("fused_wce fwd+bwd peak memory / Liger's", value, 1.0, "<",
            f"{headline}; Liger row: {liger.get('status') if liger else 'absent'}")
    else:
        chunked = _find(rows, "torch_chunked", headline)
        both = fused_ok and accurate and chunked is not None and chunked.get("status") == "ok"
        add("fused_wce CPU fwd+bwd time / torch chunked F.linear_cross_entropy",
            fused["time_ms"] / chunked["time_ms"] if both else None, CPU_TARGETS["time_vs_torch_chunked"], "<=",
            f"{headline}; fused_wce accurate: {accurate}")
        rss = (f"; peak RSS {fused['peak_rss_bytes'] / MIB:.0f} vs {chunked['peak_rss_bytes'] / MIB:.0f} MiB"
               if both and fused.get("peak_rss_bytes") and chunked.get("peak_rss_bytes") else "")
        add("fused_wce CPU fwd+bwd peak memory / torch chunked F.linear_cross_entropy",
            fused["peak_memory_bytes"] / max(chunked["peak_memory_bytes"], 1) if both else None,
            CPU_TARGETS["memory_vs_torch_chunked"], "<=",
            f"{headline}; torch's CPU allocations at the peak of one call above the inputs{rss}")
    return targets


# --- files ---------------------------------------------------------------------------------------------------
def write_outputs(out_dir: str, environment: dict, rows: list[dict], e2e_rows: list[dict], checks: list[dict],
                  targets: list[dict], skipped: list[dict]) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"csv": os.path.join(out_dir, "results.csv"), "json": os.path.join(out_dir, "results.json"),
             "markdown": os.path.join(out_dir, "results.md"), "e2e_csv": os.path.join(out_dir, "e2e.csv")}
    _write_csv(paths["csv"], rows)
    _write_csv(paths["e2e_csv"], e2e_rows)
    with open(paths["json"], "w") as handle:
        json.dump({"environment": environment, "rows": rows, "e2e": e2e_rows, "checks": checks,
                   "targets": targets, "skipped_providers": skipped}, handle, indent=1, default=str)
    with open(paths["markdown"], "w") as handle:
        handle.write(markdown(environment, rows, e2e_rows, checks, targets, skipped))
    paths["plots"] = plot(out_dir, rows)
    return paths


def _write_csv(path: str, rows: list[dict]) -> None:
    columns = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def _fmt(value, digits=3):
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.1e}"
        return f"{value:.{digits}g}"
    return str(value)


def _note_cell(value) -> str:
    return "-" if value is None else ("**yes**" if value else "no")


def cpu_conditions(environment: dict, rows: list[dict]) -> str:
    """How the CPU numbers were taken, and whether other processes competed for the cores meanwhile."""
    method = environment.get("cpu_memory_method") or "-"
    start, end = environment.get("load_average_start"), environment.get("load_average_end")
    cores = environment.get("cpu_count") or 1
    busy = sorted(row["busy_threads"] for row in rows if row.get("busy_threads") is not None)
    threads = next((row.get("threads") for row in rows if row.get("threads")), None)
    how = ("every row of a problem in one process; free pages returned and the kernel's high-water mark reset "
           "before each measured call" if method.startswith("VmHWM") else "one process per row, its first call")
    line = (f"- CPU: peak MiB = torch's CPU allocations at the peak of one call above those before it (allocation "
            f"events of torch.profiler, deterministic); peak RSS MiB by {method} ({how}: includes what the C "
            f"allocator holds on top, which varies run to run); timed repeats round-robin over the rows of a process; "
            f"load average (1 min) {start[0] if start else '-'} at the start, {end[0] if end else '-'} at "
            f"the end, on {cores} cores")
    if busy:
        line += (f"; busy threads per timed call (CPU time / wall time, torch uses {threads}): median "
                 f"{_fmt(busy[len(busy) // 2])}, lowest {_fmt(busy[0])}")
    loaded = any(load is not None and load[0] > cores for load in (start, end)) or (
        busy and threads and busy[0] < 0.7 * threads)
    if loaded:
        line += (". **Other processes competed for the CPU during this run: wall times are inflated (compare rows "
                 "of one problem, which were timed round-robin, rather than absolute numbers).**")
    return line


def markdown(environment, rows, e2e_rows, checks, targets, skipped) -> str:
    lines = ["# fused_wce benchmark results", ""]
    lines.append(f"- profile: `{environment.get('profile')}`, device: {environment.get('card')} "
                 f"(driver {environment.get('driver')}), date {environment.get('date')}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in environment.get("versions", {}).items()))
    gemm = environment.get("gemm")
    if gemm:
        lines.append(f"- measured GEMM rate: {gemm.get('tflops', float('nan')):.1f} TFLOP/s "
                     f"({gemm.get('dtype')} torch.mm {gemm.get('size')}^3, median of {gemm.get('repeats')})")
    lines.append("- time: median (p20-p80) of the repeats; memory: peak above the inputs (CUDA: max_memory_allocated;"
                 " CPU: torch's allocations, from the profiler's allocation events, and the peak RSS beside it);"
                 " TFLOP/s on counted FLOPs (6 N_valid H V for"
                 " fwd+bwd, 4 with a frozen head, 2 for forward); errors relative to the reference (loss: |d|/|ref|,"
                 " gradients: Frobenius).")
    if environment.get("device") == "cpu":
        lines.append(cpu_conditions(environment, rows))
    lines.append("- variant: the loss variant (benchmarks/workloads.py VARIANTS: label smoothing 0.1, z-loss 1e-4, "
                 "softcap 30, logit scale 0.0625, DFT, all at once) every provider computed, checked against a "
                 "reference of the same variant; *vs plain*: time over the same provider's plain-loss row of the same "
                 "problem. A provider that cannot express a variant is skipped on that row with the reason.")
    lines.append("- workloads ending in `/log_prob`: per-token log-probs and entropies through a GRPO-like objective "
                 "(`-(1/M) sum(a_i log p_i + 1e-3 H_i)`, signed advantages a_i per answer; benchmarks/workloads.py), "
                 "measured with their own providers (fused_wce_log_prob, fused_wce_log_prob_cublas, "
                 "trl_chunked_log_prob, torch_log_softmax); *loss err* is the objective's error.")
    lines.append("- weights: *in kernel* = per-token weights passed to the kernel; *per-token loss* = per-token "
                 "losses multiplied by the weights; *uniform* = the provider has no per-token weights and was fed "
                 "weight 1 on every counted token (compared with a uniform-weight reference).")
    lines.append("")
    lines.append("## Targets")
    lines.append("")
    lines.append("| target | value | threshold | verdict | detail |")
    lines.append("|---|---|---|---|---|")
    for target in targets:
        lines.append(f"| {target['target']} | {_fmt(target['value'])} | {target['comparison']} "
                     f"{_fmt(target['threshold'])} | **{target['verdict']}** | {target['detail']} |")
    lines.append("")
    lines.append("## Loss kernels")
    lines.append("")
    predicted = any(column in row for row in rows for column in ("predicted_ms", "needs_note"))
    with_rss = any(row.get("peak_rss_mib") is not None for row in rows)
    extra_head = " predicted ms | measured/predicted | predicted peak MiB | peak/predicted | needs note |" \
        if predicted else ""
    rss_head = " peak RSS MiB |" if with_rss else ""
    lines.append("| workload | variant | mode | provider | weights | status | time ms (p20-p80) | vs fastest exact peer "
                 "| vs plain | peak MiB |" + rss_head + " TFLOP/s | of GEMM | loss err | dH err | dW err | accurate |"
                 + extra_head)
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_rss else "")
                 + ("---|" * 5 if predicted else ""))
    for row in rows:
        time_cell = "-"
        if row.get("time_ms") is not None:
            time_cell = f"{_fmt(row['time_ms'])} ({_fmt(row.get('time_p20_ms'))}-{_fmt(row.get('time_p80_ms'))})"
        status = row.get("status")
        if status != "ok":
            status = f"{status}: {row.get('reason', '')[:80]}"
        lines.append(
            f"| {row.get('workload')} | {row.get('variant', 'plain')} | {row.get('mode')} | {row.get('provider')} | "
            f"{row.get('weights_used', '-')} | {status} | {time_cell} | {_fmt(row.get('time_vs_fastest_exact_peer'))} | "
            f"{_fmt(row.get('time_vs_plain'))} | "
            f"{_fmt(row.get('peak_memory_mib'))} | " + (f"{_fmt(row.get('peak_rss_mib'))} | " if with_rss else "") +
            f"{_fmt(row.get('tflops'))} | {_fmt(row.get('fraction_of_gemm'))} | "
            f"{_fmt(row.get('loss_rel_err'))} | {_fmt(row.get('grad_hidden_rel_err'))} | "
            f"{_fmt(row.get('grad_weight_rel_err'))} | {_fmt(row.get('accurate'))} |" + (
                f" {_fmt(row.get('predicted_ms'))} | {_fmt(row.get('measured_over_predicted'))} | "
                f"{_fmt(row.get('predicted_peak_mib'))} | {_fmt(row.get('peak_over_predicted'))} | "
                f"{_note_cell(row.get('needs_note'))} |" if predicted else ""))
    if checks:
        lines.append("")
        lines.append("## Checks (not timed)")
        lines.append("")
        lines.append("| check | workload | status | loss err | dH err | dW err | seconds |")
        lines.append("|---|---|---|---|---|---|---|")
        for check in checks:
            lines.append(f"| {check.get('provider')} | {check.get('workload')} | {check.get('status')} "
                         f"{check.get('reason', '')[:80]} | {_fmt(check.get('loss_rel_err'))} | "
                         f"{_fmt(check.get('grad_hidden_rel_err'))} | {_fmt(check.get('grad_weight_rel_err'))} | "
                         f"{_fmt(check.get('interpreter_s'))} |")
    if e2e_rows:
        lines.append("")
        lines.append("## End to end: one SFT training step")
        lines.append("")
        lines.append("| model | params | batch | provider | status | step ms (p20-p80) | peak MiB | peak RSS MiB | loss "
                     "| what |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in e2e_rows:
            time_cell = "-"
            if row.get("time_ms") is not None:
                time_cell = f"{_fmt(row['time_ms'])} ({_fmt(row.get('time_p20_ms'))}-{_fmt(row.get('time_p80_ms'))})"
            peak, rss = row.get("peak_memory_bytes"), row.get("peak_rss_bytes")
            lines.append(f"| {row.get('model_config')} {row.get('dtype')} | {_fmt(float(row.get('n_params', 0)))} | "
                         f"{row.get('batch_size')}x{row.get('seq_len')} | {row.get('provider')} | "
                         f"{row.get('status')} {row.get('reason', '')[:80]} | {time_cell} | "
                         f"{_fmt(peak / MIB if peak is not None else None)} | "
                         f"{_fmt(rss / MIB if rss is not None else None)} | {_fmt(row.get('loss'))} | "
                         f"{row.get('loss_note', '')} |")
    if skipped:
        lines.append("")
        lines.append("## Providers skipped")
        lines.append("")
        for item in skipped:
            lines.append(f"- {item['provider']}: {item['reason']}")
    if predicted:
        gaps = roofline_gaps(rows)
        lines.append("")
        lines.append("## Roofline gaps over 20%")
        lines.append("")
        lines.append(f"Measured forward+backward rows against `benchmarks.roofline` on "
                     f"{environment.get('roofline_card')} values (a lower bound on time; peak memory above the inputs); "
                     "each gap below gets its explanation in benchmarks/NOTES.md.")
        if environment.get("roofline_card_note"):
            lines.append(f"Note: {environment['roofline_card_note']}.")
        lines.append("")
        lines.extend(f"- {gap_line(row)}" for row in gaps)
        if not gaps:
            lines.append("- none: every measured row is within 20% of its prediction")
    lines.append("")
    return "\n".join(lines)


def plot(out_dir: str, rows: list[dict]) -> list[str]:
    """Per (shape, dtype, counted fraction, head mode, mode): time and peak memory against N, one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    groups = {}
    for row in rows:
        if row.get("status") != "ok" or not row.get("shape") or row.get("variant", "plain") != "plain":
            continue  # loss variants are measured at one N each: their numbers are in the table
        key = (row["shape"], row["dtype"], row["counted_fraction"], row["frozen_head"], row["weights"], row["mode"],
               row.get("objective", "loss"))
        groups.setdefault(key, []).append(row)
    paths = []
    for (shape, dtype, fraction, frozen, weights, mode, objective), group in sorted(groups.items(), key=str):
        hidden, vocab = group[0]["hidden"], group[0]["vocab"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for provider in sorted({r["provider"] for r in group}):
            points = sorted((r["tokens"], r["time_ms"], r["peak_memory_mib"]) for r in group
                            if r["provider"] == provider)
            style = dict(marker="o", linewidth=2.5 if provider.startswith("fused_wce") else 1.2)
            axes[0].plot([p[0] for p in points], [p[1] for p in points], label=provider, **style)
            axes[1].plot([p[0] for p in points], [p[2] for p in points], label=provider, **style)
        for axis, label in zip(axes, ("time (ms, median)", "peak memory above inputs (MiB)")):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("tokens N")
            axis.set_ylabel(label)
            axis.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        head = ", frozen head" if frozen else ""
        what = "" if objective == "loss" else f", {objective}"
        fig.suptitle(f"{shape} (H {hidden}, V {vocab}), {dtype}, {round(fraction * 100)}% counted{head}{what}, {mode}")
        fig.tight_layout()
        name = (f"{shape}_{dtype}_{round(fraction * 100)}pct{'_frozen' if frozen else ''}_{weights}_{mode}"
                f"{'' if objective == 'loss' else '_' + objective}.png")
        path = os.path.join(plot_dir, name.replace("/", "-"))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
