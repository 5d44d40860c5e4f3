"""Plans a profile into worker tasks, runs them one process at a time, and writes the results."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import shutil
import sys
import time

from . import measure, report
from .providers import PEER_DISTRIBUTIONS, PROVIDERS_BY_NAME, version_of
from .worker import ROW_PREFIX
from .workloads import CPU_DEFAULT, CPU_QUICK, CPU_SMOKE, GPU_FULL, GPU_QUICK, INTERPRETER_CHECK, MODES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Peers first and fused_wce last in each GPU worker: a kernel fault poisons the CUDA context, and the peers'
# rows of that workload are then already recorded.
# The log-prob workloads' providers (each runs only on the workloads of its objective: Provider.objective).
LOG_PROB_PROVIDERS = ["torch_log_softmax", "trl_chunked_log_prob", "fused_wce_log_prob"]
GPU_PROVIDERS = ["torch_eager", "torch_compile", "torch_chunked", "trl_chunked", "liger", "liger_fp32acc", "cce",
                 "cce_exact", "fused_wce[torch]", "fused_wce_lean", "fused_wce_tiled", *LOG_PROB_PROVIDERS,
                 "fused_wce_log_prob_cublas", "fused_wce"]
CPU_PROVIDERS = ["torch_eager", "torch_chunked", "trl_chunked", *LOG_PROB_PROVIDERS, "fused_wce"]
# The timed CPU profile keeps to the comparison (TRL's CPU fallback is in the smoke run and with
# --providers), so that it stays CI-sized on 2 cores; the log-prob row compares with TRL's log-prob function.
CPU_TIMED_PROVIDERS = ["torch_eager", "torch_chunked", *LOG_PROB_PROVIDERS, "fused_wce"]
# The CPU loss-variant rows: fused_wce against the eager loss written with the variant (the comparison).
CPU_VARIANT_PROVIDERS = ["torch_eager", "fused_wce"]

PROFILES = {
    # One H200 in under 8 minutes including start-up, compilation and warm-up: the loss tasks stop starting new
    # measurements after `budget_s` (skipped rows say so), the headline workload and the end-to-end row first.
    "gpu-quick": dict(
        device="cuda", workloads=GPU_QUICK, compile_only_headline=True, warmup=2, reps=5, rotations=2, budget_s=400,
        providers=[p for p in GPU_PROVIDERS if p not in ("fused_wce[torch]", "liger_fp32acc")],
        gemm=dict(dtype="bfloat16", size=8192, warmup=10, reps=30),
        e2e=dict(config="gpu", dtype="bfloat16", batch_size=4, seq_len=2048, counted_fraction=0.5, warmup=2, reps=3),
    ),
    "gpu-full": dict(
        device="cuda", workloads=GPU_FULL, compile_only_headline=False, warmup=3, reps=10, rotations=3, budget_s=None,
        providers=GPU_PROVIDERS, gemm=dict(dtype="bfloat16", size=8192, warmup=10, reps=50),
        e2e=dict(config="gpu", dtype="bfloat16", batch_size=8, seq_len=2048, counted_fraction=0.5, warmup=2, reps=5),
    ),
    # CPU (no GPU): every problem's rows share one process (exact per-row peak RSS, see
    # benchmarks.measure.rss_peak_above), the timed repeats round-robin over them. Full: under 4 minutes on 2
    # idle cores; quick: under 3 (measured in benchmarks/NOTES.md).
    "cpu": dict(
        device="cpu", workloads=CPU_DEFAULT, warmup=0, reps=3, rotations=2, budget_s=None,
        providers=CPU_TIMED_PROVIDERS, variant_providers=CPU_VARIANT_PROVIDERS,
        interpreter=INTERPRETER_CHECK, gemm=dict(dtype="float32", size=1024, warmup=2, reps=5),
        e2e=dict(config="cpu", dtype="float32", batch_size=2, seq_len=1024, counted_fraction=0.5, warmup=1, reps=2),
    ),
    "cpu-quick": dict(
        device="cpu", workloads=CPU_QUICK, warmup=0, reps=3, rotations=2, budget_s=None,
        providers=CPU_TIMED_PROVIDERS, variant_providers=CPU_VARIANT_PROVIDERS,
        interpreter=INTERPRETER_CHECK, gemm=dict(dtype="float32", size=1024, warmup=2, reps=5),
        e2e=dict(config="cpu", dtype="float32", batch_size=2, seq_len=1024, counted_fraction=0.5, warmup=1, reps=2),
    ),
    # The test suite's run: tiny shapes, one repeat (the numbers are only sane, not meaningful). No worker is killed
    # for its wall time (worker_timeouts): on a busy shared machine the suite's own limit is the one that counts.
    "cpu-smoke": dict(
        device="cpu", workloads=CPU_SMOKE, warmup=0, reps=1, rotations=1, budget_s=None, providers=CPU_PROVIDERS,
        worker_timeouts=False,
        interpreter=None, gemm=dict(dtype="float32", size=256, warmup=1, reps=2),
        e2e=dict(config="smoke", dtype="float32", batch_size=1, seq_len=128, counted_fraction=0.5, warmup=1, reps=1),
    ),
}


def choose_profile(device: str, quick: bool, smoke: bool) -> str:
    if device == "cuda":
        if smoke:
            raise ValueError("--smoke is the CPU test-suite profile; on a GPU use --quick")
        return "gpu-quick" if quick else "gpu-full"
    if smoke:
        return "cpu-smoke"
    return "cpu-quick" if quick else "cpu"


def environment(profile: str, device: str) -> dict:
    import torch

    env = {"profile": profile, "device": device, "date": datetime.date.today().isoformat(),
           "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_name(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "versions": {name: version_of(name) for name in PEER_DISTRIBUTIONS}}
    env["triton"] = env["versions"].get("triton")
    if device == "cuda":
        env["card"] = torch.cuda.get_device_name(0)
        env["driver"] = _nvidia_driver()
        props = torch.cuda.get_device_properties(0)
        env["card_memory_gib"] = round(props.total_memory / (1 << 30), 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    else:
        env["card"] = f"CPU: {env['cpu']} ({os.cpu_count()} cores), no GPU"
        env["driver"] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable processes; above the core count, jobs wait for a CPU)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


class Runner:
    """Runs worker processes and collects their rows (with a tqdm progress bar over expected rows).

    A task goes to its worker on stdin; the worker writes no file. Each worker's stderr (warnings, tracebacks) is
    kept in ``<out>/worker_logs/NNN-kind.log`` when not empty.
    """

    def __init__(self, out_dir: str, total_rows: int, verbose: bool = False):
        from tqdm import tqdm


        self.log_dir = os.path.join(out_dir, "worker_logs")
        if os.path.isdir(self.log_dir):  # the logs of an earlier run in the same directory
            shutil.rmtree(self.log_dir)
        os.makedirs(self.log_dir)
        self.rows_path = os.path.join(out_dir, "rows_raw.jsonl")
        open(self.rows_path, "w").close()
        self.bar = tqdm(total=total_rows, desc="benchmarks", unit="row", dynamic_ncols=True)
        self.verbose = verbose
        self.count = 0

    def run(self, task: dict, timeout_s: float | None, expected: int) -> tuple[list[dict], str | None]:
        """Rows of one worker, and an error description if it exited badly (crash, timeout)."""
        self.count += 1
        log_path = os.path.join(self.log_dir, f"{self.count:03d}-{task['kind']}.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.pop("TRITON_INTERPRET", None)  # only the interpreter task sets it, inside its own process
        rows, error = [], None
        start = time.time()
        with open(log_path, "w") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", "-"], cwd=REPO_ROOT, env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
            process.stdin.write(json.dumps(task))
            process.stdin.close()
            try:
                for line in process.stdout:
                    if line.startswith(ROW_PREFIX):
                        row = json.loads(line[len(ROW_PREFIX):])
                        rows.append(row)
                        # Raw rows as they arrive: an interrupted run (an outer timeout) still leaves them.
                        with open(self.rows_path, "a") as raw:
                            raw.write(json.dumps(row, default=str) + "\n")
                        self.bar.update(1)
                        self.bar.set_postfix_str(f"{row.get('provider', row.get('kind'))} {row.get('mode', '')}"[:40])
                    elif self.verbose:
                        self.bar.write(line.rstrip())
                    if timeout_s is not None and time.time() - start > timeout_s:
                        process.kill()
                        error = f"killed after {timeout_s:.0f} s"
                        break
                process.wait(timeout=None if timeout_s is None else max(1.0, timeout_s - (time.time() - start)))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                error = f"killed after {timeout_s:.0f} s"
            finally:
                process.stdout.close()
        if error is None and process.returncode != 0:
            with open(log_path) as handle:
                tail = handle.read()[-1500:]
            error = f"worker exited with {process.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        if os.path.getsize(log_path) == 0:
            os.remove(log_path)
        missing = expected - len(rows)
        if missing > 0:
            self.bar.update(missing)
        return rows, error

    def close(self):
        self.bar.close()
        if not os.listdir(self.log_dir):
            os.rmdir(self.log_dir)


def _problem_of(workload):
    """The workload without its loss variant and headline flag: workloads with the same problem draw the same
    inputs."""
    import dataclasses

    return dataclasses.replace(workload, variant="plain", headline=False)


def _same_inputs(a, b) -> bool:
    """Whether two workloads draw the same inputs (they differ at most in loss variant and headline flag)."""
    return _problem_of(a) == _problem_of(b)


@contextlib.contextmanager
def library_caches_in_scratch():
    """Point torch's compile cache at a scratch directory for the duration, then remove it.

    Importing ``torch._dynamo`` (transformers and TRL do) creates ``$TMPDIR/torchinductor_$USER`` and
    ``torch.compile`` fills it; the run and its workers (which inherit the environment) write there instead, and
    the directory goes when the run ends, however it ends. A ``TORCHINDUCTOR_CACHE_DIR`` set by the user is kept.
    """
    import tempfile

    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    scratch = tempfile.mkdtemp(prefix="fused_wce_bench_")
    if previous is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(scratch, "inductor")
    try:
        yield scratch
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        shutil.rmtree(scratch, ignore_errors=True)


def run_profile(profile_name: str, out_dir: str, providers: list[str] | None = None, e2e: bool = True,
                verbose: bool = False, budget_s: float | None = None) -> dict:
    """Run a whole profile; returns the output paths and the targets. ``budget_s`` replaces the profile's time
    guard (seconds after which no new measurement starts; the skipped rows say so). Leaves no file outside
    ``out_dir`` (see :func:`library_caches_in_scratch`)."""
    with library_caches_in_scratch():
        return _run_profile(profile_name, out_dir, providers, e2e, verbose, budget_s)


def _run_profile(profile_name: str, out_dir: str, providers: list[str] | None, e2e: bool, verbose: bool,
                 budget_s: float | None) -> dict:
    profile = dict(PROFILES[profile_name])
    if budget_s is not None:
        if budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        profile["budget_s"] = budget_s
    device = profile["device"]
    started = time.time()
    deadline = started + profile["budget_s"] if profile.get("budget_s") else None
    env = environment(profile_name, device)
    # --providers replaces the profile's list (any provider that runs on the device, e.g. trl_chunked on CPU).
    selected = list(providers) if providers else list(profile["providers"])
    if "fused_wce" in selected:  # last: a kernel fault in a shared worker then loses no peer's row
        selected = [p for p in selected if p != "fused_wce"] + ["fused_wce"]

    skipped, runnable = [], []
    for name in selected:
        reason = PROVIDERS_BY_NAME[name].unavailable_reason(device)
        if reason:
            skipped.append({"provider": name, "reason": reason})
            print(f"[benchmarks] skipping {name}: {reason}", flush=True)
        else:
            runnable.append(name)

    workloads = profile["workloads"]
    headline = next((w for w in workloads if w.headline), workloads[0])
    rows, e2e_rows, checks, failures = [], [], [], []
    skipped_rows = {}  # workload name -> its rows for providers that cannot express its loss variant

    def providers_for(workload):
        """The providers measured on ``workload`` (those of its objective); those that cannot express its loss
        variant get a skipped row."""
        names = [n for n in runnable if PROVIDERS_BY_NAME[n].objective == workload.objective]
        if workload.variant != "plain" and not providers and profile.get("variant_providers"):
            names = [n for n in runnable if n in profile["variant_providers"]]
        measured = []
        for name in names:
            provider = PROVIDERS_BY_NAME[name]
            reason = provider.variant_support(workload.loss_keywords)
            if reason is None:
                measured.append(name)
                continue
            print(f"[benchmarks] skipping {name} on {workload.name}: {reason}", flush=True)
            skipped_rows.setdefault(workload.name, []).extend({"workload_params": workload.params(), "provider": name, "mode": mode, "device": device,
                         "status": "skipped", "reason": reason, "weights_support": provider.weights_support,
                         "exact": provider.exact} for mode in workload.modes)
        return measured

    plan = [(workload, providers_for(workload)) for workload in workloads]
    total = 1 + sum(len(names) * len(workload.modes) for workload, names in plan) + (3 if e2e else 0)
    if device == "cpu":
        total += 1 if profile.get("interpreter") else 0
    os.makedirs(out_dir, exist_ok=True)
    runner = Runner(out_dir, total, verbose)
    # CPU: where the peak RSS can be reset (Linux), the rows of one problem share a process; else one process
    # per row keeps the sampled peak truthful (it must be the first big step of its process).
    exact_rss = device == "cpu" and measure.rss_high_water_supported()
    env["cpu_memory_method"] = None if device != "cpu" else (
        measure.RSS_METHOD_HIGH_WATER if exact_rss else measure.RSS_METHOD_SAMPLED)
    env["load_average_start"] = _load_average()

    def task_base(**extra):
        return {"device": device, "seed": 0, "deadline": deadline, **extra}

    def timeout_for(default):
        if not profile.get("worker_timeouts", True):
            return None
        if deadline is None:
            return default
        return max(60.0, deadline - time.time() + 120.0)

    # 1. The GEMM rate.
    gemm_rows, error = runner.run(task_base(kind="gemm", **profile["gemm"]), timeout_for(300), 1)
    gemm = next((r for r in gemm_rows if r.get("kind") == "gemm"), None)
    env["gemm"] = gemm
    if error:
        failures.append(f"gemm: {error}")

    def run_e2e():
        if not e2e:
            return
        from .e2e import E2E_PROVIDERS

        groups = [list(E2E_PROVIDERS)] if device == "cuda" or exact_rss else [[p] for p in E2E_PROVIDERS]
        for names in groups:
            task = task_base(kind="e2e", providers=names, **profile["e2e"])
            got, error = runner.run(task, timeout_for(600), len(names))
            e2e_rows.extend(got)
            if error:
                failures.append(f"e2e: {error}")
                done = {r["provider"] for r in got}
                e2e_rows.extend({"kind": "e2e", "provider": p, "status": "error", "reason": error}
                                for p in names if p not in done)

    def record_loss_rows(got, error, batch, names, modes=MODES):
        rows.extend(got)
        for workload in batch:
            rows.extend(skipped_rows.pop(workload.name, []))
        if error:
            failures.append(f"{', '.join(w.name for w in batch)}: {error}")
            done = {(r["workload_params"]["workload"], r["provider"], r["mode"]) for r in got}
            for workload in batch:
                for name in names[workload.name]:
                    for mode in [m for m in workload.modes if m in modes]:
                        if (workload.name, name, mode) in done:
                            continue
                        rows.append({"workload_params": workload.params(), "provider": name, "mode": mode,
                                     "device": device, "status": "crashed", "reason": error,
                                     "weights_support": PROVIDERS_BY_NAME[name].weights_support,
                                     "exact": PROVIDERS_BY_NAME[name].exact})

    if device == "cuda":
        # 2. Per workload, one worker (headline first), the end-to-end row right after the headline. The loss
        # variants of one problem share a worker (and its inputs): no CUDA start-up per variant row.
        batches = []
        for workload, planned in plan:
            names = [n for n in planned
                     if not (n == "torch_compile" and profile.get("compile_only_headline") and not workload.headline)]
            runner.bar.update((len(planned) - len(names)) * len(workload.modes))
            if not names:
                continue
            previous = batches[-1] if batches else None
            if (previous and workload.variant != "plain" and previous[0][-1].variant != "plain"
                    and _same_inputs(previous[0][-1], workload)):
                previous[0].append(workload)
                previous[1][workload.name] = names
            else:
                batches.append(([workload], {workload.name: names}))
        for index, (batch, names) in enumerate(batches):
            task = task_base(kind="loss", workloads=[w.to_dict() for w in batch],
                             workload_providers=[names[w.name] for w in batch],
                             providers=sorted({n for w in batch for n in names[w.name]}), modes=list(MODES),
                             warmup=profile["warmup"], reps=profile["reps"], rotations=profile["rotations"])
            expected = sum(len(names[w.name]) * len(w.modes) for w in batch)
            got, error = runner.run(task, timeout_for(3600), expected)
            record_loss_rows(got, error, batch, names)
            if index == 0:
                run_e2e()
    else:
        # 2. CPU: one worker per problem, its loss variants included (they share its inputs, and their "vs plain"
        # ratio is then timed round-robin with the plain row); the worker computes the float64 references.
        batches = {}  # the problem (plain, not headline) -> (its workloads, their providers), first seen first
        for workload, names in plan:
            rows.extend(skipped_rows.pop(workload.name, []))
            if not names:
                continue
            batch = batches.setdefault(_problem_of(workload), ([], {}))
            batch[0].append(workload)
            batch[1][workload.name] = names
        for batch, names in batches.values():
            if exact_rss:  # every row of the problem in one process
                tasks = [(batch, names)]
            else:  # one process per (workload, provider, mode)
                tasks = [([w], {w.name: [n]}, mode) for w in batch for n in names[w.name] for mode in w.modes]
            for item in tasks:
                sub_batch, sub_names = item[0], item[1]
                modes = [item[2]] if len(item) == 3 else list(MODES)
                task = task_base(kind="loss", workloads=[w.to_dict() for w in sub_batch],
                                 workload_providers=[sub_names[w.name] for w in sub_batch],
                                 providers=sorted({n for w in sub_batch for n in sub_names[w.name]}), modes=modes,
                                 warmup=profile["warmup"], reps=profile["reps"], rotations=profile["rotations"])
                expected = sum(len(sub_names[w.name]) * len([m for m in w.modes if m in modes]) for w in sub_batch)
                got, error = runner.run(task, timeout_for(900), expected)
                record_loss_rows(got, error, sub_batch, sub_names, modes)
        if profile.get("interpreter") is not None:
            got, error = runner.run(task_base(kind="interpreter", workload=profile["interpreter"].to_dict()),
                                    timeout_for(600), 1)
            checks.extend(got)
            if error:
                checks.append({"provider": "fused_wce[triton-interpreter]", "status": "crashed", "reason": error})
        run_e2e()
    runner.close()
    for leftover in skipped_rows.values():  # workloads on which no provider ran
        rows.extend(leftover)

    gemm_tflops = gemm.get("tflops") if gemm else None
    flat = [report.flatten(row, env, gemm_tflops) for row in rows]
    report.add_relative_columns(flat)
    gaps = report.add_roofline_columns(flat, env) if device == "cuda" else []
    for check in checks:
        check.update({k: v for k, v in (check.get("workload_params") or {}).items() if k == "workload"})
    checks = [{k: v for k, v in c.items() if k not in ("workload_params", "traceback")} for c in checks]
    targets = report.evaluate_targets(flat, device, headline.name)
    env["load_average_end"] = _load_average()
    env["wall_s"] = round(time.time() - started, 1)
    env["failures"] = failures
    paths = report.write_outputs(out_dir, env, flat, e2e_rows, checks, targets, skipped)
    return {"paths": paths, "targets": targets, "rows": flat, "e2e": e2e_rows, "checks": checks,
            "environment": env, "skipped": skipped, "failures": failures, "roofline_gaps": gaps}
