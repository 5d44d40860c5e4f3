#!/usr/bin/env bash
# The one prepared GPU check of fused_wce: run it on a CUDA machine, in the repository root.
#
#   stages (each prints its elapsed time; caps in seconds, all overridable by environment variables):
#     info     nvidia-smi, python / torch / CUDA / triton / peer versions, torch sees the GPU       (~10 s)
#     install  the project (PYTHONPATH; no download), carried wheels in .whl/, and, only if a package
#              registry answers, `pip install -e .[dev]` + liger-kernel cut-cross-entropy with torch and
#              triton pinned to what is installed (never reinstalled)                              (cap 150)
#     tests    every test with a CUDA parametrisation: GPU_CHECK_TESTS_S (210) around `pytest -k cuda tests`
#              (tests/conftest.py adds the cuda-triton, cuda-triton-tiled and cuda-torch paths when torch
#              sees a GPU; the stage checks that it did), all of them (no -x: one run shows every failure),
#              spread over GPU_CHECK_WORKERS (8) processes when pytest-xdist is installed (most of the time
#              is Triton compiling kernels on the CPU)
#     bench    GPU_CHECK_BENCH_S (270) around `python -m benchmarks --quick --budget-s 140`
#              (no new measurement starts after 140 s, so the suite writes its tables in time); its
#              results.md has measured and roofline-predicted time and memory side by side
#   GPU_CHECK_TOTAL_S (540): every cap is cut to the time left before it, so the script ends by ~540 s
#   even when stages run to their caps; expected on an H200 ~10 + ~20 + ~150 + ~270 s. Run it with
#   a command limit of 570 s (benchmarks/README.md, "The prepared GPU run"); a rerun of one stage: GPU_CHECK_STAGES=tests or =bench (and a smaller GPU_CHECK_TOTAL_S).
#
#   Files come back under $OUT (at most 8, no deeper than 2 folders): gpu_check.log (everything printed),
#   results.md, results.csv, results.json, e2e.csv, rows_raw.jsonl, and bench_extra.tar.gz (plots, worker
#   stderr, pytest junit XML, pip freeze).
#
#   GPU_CHECK_DRY_RUN=1   print every stage and command without running the heavy parts (tests do this on CPU)
#   GPU_CHECK_STAGES="tests bench"   run only these stages (a rerun on the still-warm machine)
#   GPU_CHECK_FETCH_WHEELS=1   on THIS machine (not the GPU one): download the pure-Python peers that the
#                              CUDA image lacks into .whl/ (git-ignored), to copy along to the GPU machine
#
# Never touches the card's settings: no reset, clocks, power, persistence, compute or MIG mode.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
STAGES="${GPU_CHECK_STAGES:-info install tests bench}"
INSTALL_S="${GPU_CHECK_INSTALL_S:-150}"
TESTS_S="${GPU_CHECK_TESTS_S:-210}"
BENCH_S="${GPU_CHECK_BENCH_S:-270}"
BENCH_BUDGET_S="${GPU_CHECK_BENCH_BUDGET_S:-140}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-540}"
WORKERS="${GPU_CHECK_WORKERS:-8}"
# Often missing from a bare CUDA image: TRL and what it imports, and two peers. All pure Python.
WHEELS="trl==1.16.0 datasets dill multiprocess liger-kernel cut-cross-entropy"

if [ "${GPU_CHECK_FETCH_WHEELS:-0}" = 1 ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    for spec in $WHEELS; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$spec" || echo "[gpu_check] could not download $spec"
    done
    ls -la .whl && du -sh .whl
    exit 0
fi

OUT="${OUT:-$REPO/gpu_check_out}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
SCRIPT_START=$(date +%s)

say() { echo "[gpu_check $(( $(date +%s) - SCRIPT_START ))s] $*"; }
wants() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# run CAP CMD...: the command under `timeout CAP`, or only printed in a dry run; returns its status.
# Every cap is cut to the time left before GPU_CHECK_TOTAL_S (minus 20 s to copy the files back).
left() { echo $(( TOTAL_S - ($(date +%s) - SCRIPT_START) - 20 )); }
run() {
    local cap="$1"; shift
    local remaining; remaining=$(left)
    [ "$remaining" -lt "$cap" ] && cap=$remaining
    if [ "$cap" -le 0 ]; then say "!! skipped, no time left before ${TOTAL_S}s: $*"; return 124; fi
    say "+ (cap ${cap}s) $*"
    [ "$DRY" = 1 ] && return 0
    timeout --kill-after=10 "$cap" "$@"
    local status=$?
    [ $status -eq 124 ] && say "!! timed out after ${cap}s: $*"
    return $status
}
STAGE_NAME="" STAGE_START=0
begin() { STAGE_NAME="$1"; STAGE_START=$(date +%s); echo; say "== stage $1 (cap $2 s) =="; }
end() { say "== stage $STAGE_NAME: ${1:-done}, elapsed $(( $(date +%s) - STAGE_START )) s =="; SUMMARY+=("$STAGE_NAME: ${1:-done} ($(( $(date +%s) - STAGE_START )) s)"); }
SUMMARY=()
say "repo $REPO, out $OUT, stages: $STAGES, dry run: $DRY"

# --- info -------------------------------------------------------------------------------------------------
if wants info; then
    begin info 60
    run 20 nvidia-smi
    run 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    run 30 "$PY" - <<'EOF'
import importlib, importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for dist in ("torch", "triton", "numpy", "transformers", "trl", "accelerate", "datasets", "liger-kernel",
             "cut-cross-entropy", "pytest", "hypothesis", "matplotlib", "psutil", "tqdm", "fused-wce"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist} MISSING")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"  {torch.cuda.get_device_name(0)}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}")
EOF
    end
fi

# --- install ----------------------------------------------------------------------------------------------
# Always: the project from the working tree (the tests and the benchmark workers import it from here).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if wants install; then
    begin install "$INSTALL_S"
    if ls .whl/*.whl >/dev/null 2>&1; then
        say "carried wheels: $(ls .whl | tr '\n' ' ')"
        run 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:$WORK/site"
    fi
    # Only where a GPU is seen (or GPU_CHECK_INSTALL=1): a run on a developer's machine must not change its venv.
    gpu_seen=0
    [ "$DRY" != 1 ] && timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && gpu_seen=1
    if [ "$DRY" = 1 ] || { [ "$gpu_seen" = 0 ] && [ "${GPU_CHECK_INSTALL:-0}" != 1 ]; }; then
        say "no pip install (dry run, or no GPU seen and GPU_CHECK_INSTALL unset): the project runs from PYTHONPATH"
        say "+ (on a GPU machine with a registry) $PY -m pip install -c constraints(torch, triton) -e .[dev]; pip install liger-kernel cut-cross-entropy"
    elif timeout 8 "$PY" -c "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/pip/', timeout=5)" >/dev/null 2>&1; then
        # Pin torch and triton to what is installed: the CUDA build must stay.
        "$PY" - > "$WORK/constraints.txt" <<'EOF'
import importlib.metadata as md
for dist in ("torch", "triton"):
    try:
        print(f"{dist}=={md.version(dist)}")
    except md.PackageNotFoundError:
        pass
EOF
        say "a registry answers; constraints: $(tr '\n' ' ' < "$WORK/constraints.txt")"
        run $(( INSTALL_S * 2 / 3 )) "$PY" -m pip install -q -c "$WORK/constraints.txt" -e ".[dev]" || say "pip install -e .[dev] failed (carrying on with PYTHONPATH)"
        run $(( INSTALL_S / 3 )) "$PY" -m pip install -q -c "$WORK/constraints.txt" liger-kernel cut-cross-entropy || say "optional peers not installed (their rows are skipped with the reason)"
    else
        say "no package registry: the project runs from PYTHONPATH; missing peers are skipped"
    fi
    run 30 "$PY" -c "
import importlib
for m in ('fused_wce', 'benchmarks', 'triton', 'transformers', 'trl', 'liger_kernel', 'cut_cross_entropy', 'pytest'):
    try:
        mod = importlib.import_module(m); print('  import', m, 'ok', getattr(mod, '__version__', ''))
    except Exception as e:
        print('  import', m, 'FAILED:', type(e).__name__, str(e)[:120])
"
    end
fi

# --- tests ------------------------------------------------------------------------------------------------
TESTS_STATUS="not run"
if wants tests; then
    begin tests "$TESTS_S"
    # The CUDA paths must be collected: conftest adds cuda-triton / cuda-torch when torch sees a GPU.
    PARALLEL=()
    if [ "$DRY" != 1 ]; then
        CUDA_IDS=$(timeout 60 "$PY" -m pytest -q --collect-only -p no:cacheprovider -k cuda tests 2>/dev/null | grep -c 'cuda' || true)
        say "collected tests on a CUDA path: $CUDA_IDS"
        [ "${CUDA_IDS:-0}" -gt 0 ] || say "!! no CUDA path collected: torch sees no GPU here"
        "$PY" -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 1 ] && PARALLEL=(-n "$WORKERS")
    fi
    run "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" --durations=15 --junitxml="$WORK/junit.xml" -k cuda tests
    status=$?
    case $status in 0) TESTS_STATUS="passed" ; [ "$DRY" = 1 ] && TESTS_STATUS="dry run" ;; 124|137) TESTS_STATUS="timed out after ${TESTS_S}s" ;; *) TESTS_STATUS="FAILED (exit $status)" ;; esac
    end "$TESTS_STATUS"
fi

# --- bench ------------------------------------------------------------------------------------------------
BENCH_STATUS="not run"
if wants bench; then
    begin bench "$BENCH_S"
    rm -rf "$WORK/bench_out"
    # The suite's own guard must leave ~130 s for the measurements in flight, end to end row and tables.
    cap=$BENCH_S; [ "$(left)" -lt "$cap" ] && cap=$(left)
    budget=$BENCH_BUDGET_S; [ $(( cap - 130 )) -lt "$budget" ] && budget=$(( cap - 130 ))
    [ "$budget" -lt 30 ] && budget=30
    run "$cap" "$PY" -m benchmarks --quick --budget-s "$budget" --out "$WORK/bench_out"
    status=$?
    case $status in 0) BENCH_STATUS="done" ; [ "$DRY" = 1 ] && BENCH_STATUS="dry run" ;; 124|137) BENCH_STATUS="timed out after ${BENCH_S}s (rows so far: rows_raw.jsonl)" ;; *) BENCH_STATUS="FAILED (exit $status)" ;; esac
    end "$BENCH_STATUS"
fi

# --- files back -------------------------------------------------------------------------------------------
echo
say "== copying results into $OUT =="
for name in results.md results.csv results.json e2e.csv rows_raw.jsonl; do
    [ -f "$WORK/bench_out/$name" ] && cp "$WORK/bench_out/$name" "$OUT/"
done
if [ "$DRY" != 1 ]; then
    "$PY" -m pip freeze > "$WORK/pip_freeze.txt" 2>/dev/null
    (cd "$WORK" && tar czf "$OUT/bench_extra.tar.gz" --ignore-failed-read bench_out/plots bench_out/worker_logs junit.xml pip_freeze.txt 2>/dev/null)
fi
ls -la "$OUT"
echo
say "== summary =="
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "  total: $(( $(date +%s) - SCRIPT_START )) s"
[ -f "$WORK/bench_out/results.md" ] && sed -n '/^## Targets/,/^## Loss kernels/p' "$WORK/bench_out/results.md" | head -n 12
[ -f "$WORK/bench_out/results.md" ] && sed -n '/^## Roofline gaps/,$p' "$WORK/bench_out/results.md" | head -n 30
case "$TESTS_STATUS $BENCH_STATUS" in *FAILED*|*"timed out"*) exit 1 ;; esac
exit 0
