"""scripts/gpu_check.sh, the prepared GPU run, checked without a GPU through its dry run (GPU_CHECK_DRY_RUN=1).

The dry run goes through every stage and prints each command it would run (``+ (cap Ns) COMMAND``) without
running it. These tests hold it to its contract: it exits 0 and writes gpu_check.log; its test stage names a
pytest command that, where torch sees a GPU, runs the CUDA parametrisations; its benchmark stage names a
``python -m benchmarks --quick`` command the suite's own parser accepts, with a budget that ends measuring
before the stage's cap; every cap fits in the script's total; it never changes the card's settings.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
COMMAND = re.compile(r"\+ \(cap (\d+)s\) (.*)$")
STAGE = re.compile(r"== stage (\w+) \(cap")
# pytest --collect-only with torch.cuda.is_available() made true, printing each collected test's id: what a GPU
# machine would run.
COLLECT_AS_ON_A_GPU = """
import sys, torch, pytest
torch.cuda.is_available = lambda: True
class Record:
    def pytest_collection_finish(self, session):
        print("\\n".join("COLLECTED " + item.nodeid for item in session.items))
sys.exit(pytest.main(sys.argv[1:] + ["--collect-only"], plugins=[Record()]))
"""


def dry_run(tmp_path: Path, **env_extra: str) -> tuple[str, Path]:
    """Runs the dry run; returns its stdout and its output folder."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(GPU_CHECK_DRY_RUN="1", OUT=str(out), GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable,
               **env_extra)
    completed = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout, out


def commands(stdout: str) -> list[tuple[int, list[str]]]:
    """(cap in seconds, argv) of every command the run would start, in order."""
    found = []
    for line in stdout.splitlines():
        match = COMMAND.search(line)
        if match:
            found.append((int(match.group(1)), shlex.split(match.group(2))))
    return found


def module_command(stdout: str, module: str) -> tuple[int, list[str]]:
    """(cap, arguments after ``-m module``) of the one ``python -m module`` command of the run."""
    matches = [(cap, argv[argv.index(module) + 1:]) for cap, argv in commands(stdout)
               if "-m" in argv and argv[argv.index("-m") + 1] == module]
    assert len(matches) == 1, f"expected one `-m {module}` command, got {matches}"
    return matches[0]


@pytest.fixture(scope="module")
def full_dry_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    stdout, out = dry_run(tmp_path, GPU_CHECK_TOTAL_S="540")
    return stdout, out, tmp_path


def test_script_parses():
    completed = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_dry_run_goes_through_every_stage_and_writes_its_log(full_dry_run):
    stdout, out, _ = full_dry_run
    stages = STAGE.findall(stdout)
    assert "tests" in stages and "bench" in stages and stages.index("tests") < stages.index("bench"), stages
    assert len(stages) == len(set(stages)), stages  # each stage once
    # everything printed is in gpu_check.log, and a dry run, which measures nothing, writes no results
    names = {path.name for path in out.iterdir()}
    assert "gpu_check.log" in names and not {name for name in names if name.startswith("results")}, names
    log = (out / "gpu_check.log").read_text()
    assert all(line in log for line in stdout.splitlines() if line.strip())


def test_every_cap_fits_in_the_total(full_dry_run):
    caps = [cap for cap, _ in commands(full_dry_run[0])]
    assert caps and all(0 < cap <= 540 for cap in caps), caps


def test_never_changes_the_card_settings(full_dry_run):
    """nvidia-smi only queries: no reset, persistence, power, clocks, compute or MIG mode."""
    smi = [argv for _, argv in commands(full_dry_run[0]) if Path(argv[0]).name == "nvidia-smi"]
    assert smi
    setting = re.compile(r"^(-r|--gpu-reset|-pm|--persistence-mode|-pl|--power-limit|-ac|--applications-clocks|"
                         r"-lgc|--lock-gpu-clocks|-lmc|--lock-memory-clocks|-c|--compute-mode|-mig|--multi-instance-gpu|"
                         r"-e|--ecc-config|-rac|-rgc|-rmc)(=.*)?$")
    for argv in smi:
        assert not any(setting.match(arg) for arg in argv[1:]), argv


def test_test_stage_runs_both_gpu_paths_where_a_gpu_is_seen(full_dry_run):
    """The test stage's pytest command, collected as on a GPU machine (torch sees a GPU, no interpreter): it
    selects tests on both CUDA paths, among them the loss and determinism tests, and nothing outside tests/."""
    _, _, tmp_path = full_dry_run
    _, arguments = module_command(full_dry_run[0], "pytest")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-c", COLLECT_AS_ON_A_GPU, *arguments], cwd=ROOT, env=env,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    collected = [line.removeprefix("COLLECTED ") for line in completed.stdout.splitlines()
                 if line.startswith("COLLECTED ")]
    assert collected and all(line.startswith("tests/") for line in collected)
    for path_id in ("cuda-triton", "cuda-torch"):
        for module in ("tests/test_linear_cross_entropy.py", "tests/test_determinism.py"):
            assert any(line.startswith(module) and f"[{path_id}" in line for line in collected), (module, path_id)


def test_bench_stage_runs_the_quick_profile_within_its_cap(full_dry_run):
    cap, arguments = module_command(full_dry_run[0], "benchmarks")
    args = cli.make_parser().parse_args(arguments)  # the suite's own parser accepts the command
    assert args.quick and args.out and args.device in ("auto", "cuda")
    # the suite stops starting measurements before the stage's cap, so its tables are written in time
    assert args.budget_s is not None and 0 < args.budget_s < cap


def test_one_stage_rerun_within_a_smaller_total(tmp_path):
    stdout, out = dry_run(tmp_path, GPU_CHECK_STAGES="bench", GPU_CHECK_TOTAL_S="200")
    assert STAGE.findall(stdout) == ["bench"]
    cap, arguments = module_command(stdout, "benchmarks")
    assert all(cap <= 200 for cap, _ in commands(stdout))
    args = cli.make_parser().parse_args(arguments)
    assert args.quick and 0 < args.budget_s < cap
    assert (out / "gpu_check.log").is_file()
