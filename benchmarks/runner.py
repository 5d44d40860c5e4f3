"""Plans a profile into worker tasks, runs them one process at a time, and writes the results."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from . import report
from .providers import PEER_DISTRIBUTIONS, PROVIDERS_BY_NAME, version_of
from .worker import ROW_PREFIX
from .workloads import CPU_DEFAULT, CPU_SMOKE, GPU_FULL, GPU_QUICK, INTERPRETER_CHECK, MODES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Peers first and fused_wce last in each GPU worker: a kernel fault poisons the CUDA context, and the peers'
# rows of that workload are then already recorded.
GPU_PROVIDERS = ["torch_eager", "torch_compile", "torch_chunked", "trl_chunked", "liger", "liger_fp32acc", "cce",
                 "cce_exact", "fused_wce[torch]", "fused_wce"]
CPU_PROVIDERS = ["torch_eager", "torch_chunked", "trl_chunked", "fused_wce"]
# The timed CPU profile keeps to the comparison (TRL's CPU fallback is in the smoke run and with
# --providers), so that it stays CI-sized on 2 cores.
CPU_TIMED_PROVIDERS = ["torch_eager", "torch_chunked", "fused_wce"]
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
    # CPU: CI-sized (under 5 minutes on 2 cores); one process per (workload, provider, mode) so RSS is honest.
    "cpu": dict(
        device="cpu", workloads=CPU_DEFAULT, warmup=0, reps=3, rotations=2, budget_s=None,
        providers=CPU_TIMED_PROVIDERS, variant_providers=CPU_VARIANT_PROVIDERS,
        interpreter=INTERPRETER_CHECK, gemm=dict(dtype="float32", size=1024, warmup=2, reps=5),
        e2e=dict(config="cpu", dtype="float32", batch_size=2, seq_len=1024, counted_fraction=0.5, warmup=1, reps=2,
                 measure_rss=True),
    ),
    # The test suite's run: one process per workload (RSS is then not per provider; the numbers are only sane).
    "cpu-smoke": dict(
        device="cpu", workloads=CPU_SMOKE, warmup=0, reps=1, rotations=1, budget_s=None, providers=CPU_PROVIDERS,
        process_per_workload=True,
        interpreter=None, gemm=dict(dtype="float32", size=256, warmup=1, reps=2),
        e2e=dict(config="smoke", dtype="float32", batch_size=1, seq_len=128, counted_fraction=0.5, warmup=1, reps=1,
                 measure_rss=False),
    ),
}


def choose_profile(device: str, quick: bool, smoke: bool) -> str:
    if device == "cuda":
        if smoke:
            raise ValueError("--smoke is the CPU test-suite profile; on a GPU use --quick")
        return "gpu-quick" if quick else "gpu-full"
    return "cpu-smoke" if smoke else "cpu"


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


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


class Runner:
    """Runs worker processes and collects their rows (with a tqdm progress bar over expected rows)."""

    def __init__(self, work_dir: str, total_rows: int, verbose: bool = False):
        from tqdm import tqdm

        self.work_dir = work_dir
        self.rows_path = os.path.join(os.path.dirname(work_dir), "rows_raw.jsonl")
        open(self.rows_path, "w").close()
        self.bar = tqdm(total=total_rows, desc="benchmarks", unit="row", dynamic_ncols=True)
        self.verbose = verbose
        self.count = 0

    def run(self, task: dict, timeout_s: float | None, expected: int) -> tuple[list[dict], str | None]:
        """Rows of one worker, and an error description if it exited badly (crash, timeout)."""
        self.count += 1
        path = os.path.join(self.work_dir, f"task-{self.count:03d}-{task['kind']}.json")
        with open(path, "w") as handle:
            json.dump(task, handle)
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.pop("TRITON_INTERPRET", None)  # only the interpreter task sets it, inside its own process
        stderr_path = path + ".stderr"
        rows, error = [], None
        start = time.time()
        with open(stderr_path, "w") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", path], cwd=REPO_ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=stderr, text=True)
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
        if error is None and process.returncode != 0:
            with open(stderr_path) as handle:
                tail = handle.read()[-1500:]
            error = f"worker exited with {process.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        missing = expected - len(rows)
        if missing > 0:
            self.bar.update(missing)
        return rows, error

    def close(self):
        self.bar.close()


def _same_inputs(a, b) -> bool:
    """Whether two workloads draw the same inputs (they differ at most in loss variant and headline flag)."""
    import dataclasses

    return dataclasses.replace(a, variant="plain", headline=False) == dataclasses.replace(b, variant="plain",
                                                                                          headline=False)


def run_profile(profile_name: str, out_dir: str, providers: list[str] | None = None, e2e: bool = True,
                verbose: bool = False, budget_s: float | None = None) -> dict:
    """Run a whole profile; returns the output paths and the targets. ``budget_s`` replaces the profile's time
    guard (seconds after which no new measurement starts; the skipped rows say so)."""
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
        """The providers measured on ``workload``; those that cannot express its loss variant get a skipped row."""
        names = runnable
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
        total += sum(1 for _, names in plan if names)  # reference tasks
        total += 1 if profile.get("interpreter") else 0
    os.makedirs(out_dir, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix="work-", dir=out_dir)
    runner = Runner(work_dir, total, verbose)

    def task_base(**extra):
        return {"device": device, "seed": 0, "deadline": deadline, **extra}

    def timeout_for(default):
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

        task = task_base(kind="e2e", providers=list(E2E_PROVIDERS), **profile["e2e"])
        got, error = runner.run(task, timeout_for(600), len(E2E_PROVIDERS))
        e2e_rows.extend(got)
        if error:
            failures.append(f"e2e: {error}")
            done = {r["provider"] for r in got}
            e2e_rows.extend({"kind": "e2e", "provider": p, "status": "error", "reason": error}
                            for p in E2E_PROVIDERS if p not in done)

    def record_loss_rows(got, error, batch, names):
        rows.extend(got)
        for workload in batch:
            rows.extend(skipped_rows.pop(workload.name, []))
        if error:
            failures.append(f"{', '.join(w.name for w in batch)}: {error}")
            done = {(r["workload_params"]["workload"], r["provider"], r["mode"]) for r in got}
            for workload in batch:
                for name in names[workload.name]:
                    for mode in workload.modes:
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
        # 2. CPU: the float64 reference of each workload, then one process per (workload, provider, mode).
        for index, (workload, names) in enumerate(plan):
            rows.extend(skipped_rows.pop(workload.name, []))
            if not names:
                continue
            kinds = {"uniform" if PROVIDERS_BY_NAME[n].weights_support == "uniform" else "weighted" for n in names}
            paths = {kind: os.path.join(work_dir, f"reference-{index}-{kind}.pt") for kind in sorted(kinds)}
            got, error = runner.run(task_base(kind="reference", workload=workload.to_dict(), reference_paths=paths),
                                    timeout_for(600), 1)
            if error:
                failures.append(f"reference {workload.name}: {error}")
            if profile.get("process_per_workload"):
                task = task_base(kind="loss", workloads=[workload.to_dict()], providers=names,
                                 modes=list(workload.modes), warmup=profile["warmup"], reps=profile["reps"],
                                 rotations=profile["rotations"], reference_paths=paths)
                got, error = runner.run(task, timeout_for(900), len(names) * len(workload.modes))
                record_loss_rows(got, error, [workload], {workload.name: names})
                continue
            for name in names:
                for mode in workload.modes:
                    task = task_base(kind="loss", workloads=[workload.to_dict()], providers=[name], modes=[mode],
                                     warmup=profile["warmup"], reps=profile["reps"], rotations=profile["rotations"],
                                     reference_paths=paths)
                    got, error = runner.run(task, timeout_for(900), 1)
                    rows.extend(got)
                    if error:
                        failures.append(f"{workload.name} {name} {mode}: {error}")
                        if not got:
                            rows.append({"workload_params": workload.params(), "provider": name, "mode": mode,
                                         "device": device, "status": "crashed", "reason": error,
                                         "weights_support": PROVIDERS_BY_NAME[name].weights_support,
                                         "exact": PROVIDERS_BY_NAME[name].exact})
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
    env["wall_s"] = round(time.time() - started, 1)
    env["failures"] = failures
    paths = report.write_outputs(out_dir, env, flat, e2e_rows, checks, targets, skipped)
    return {"paths": paths, "targets": targets, "rows": flat, "e2e": e2e_rows, "checks": checks,
            "environment": env, "skipped": skipped, "failures": failures, "roofline_gaps": gaps}
