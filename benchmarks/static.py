"""Static report: what every kernel's compiled code will do on the hardware, without a GPU.

    python -m benchmarks.static [--targets 80 90 100] [--out bench_out] [--no-candidates] [--only REGEX] [--jobs N]

For every kernel specialisation fused_wce ships (``benchmarks.kernel_specs.shipped_specs``) at its shipped
config, and for a small set of candidate configs per kernel around the defaults, it compiles with Triton for each
target (sm_80 = A100, sm_90 = H100/H200, sm_100 = B200 when the installed Triton supports it) and reads:
registers per thread, spill stores/loads and stack (ptxas' own report of that compile), shared memory and tensor
memory (Triton's metadata), the matmul instruction family in the PTX (wgmma / mma.sync / tcgen05 / none), and from
those the occupancy: resident blocks per SM as limited by registers, shared memory, threads, tensor memory and
the block limit. It writes ``static_report.md`` and ``static_report.csv`` to ``--out`` and exits non-zero when a
shipped config spills, exceeds a card's shared memory or misses the tensor-core instructions it should use.

Compiles run in worker subprocesses (``--worker``) with TRITON_INTERPRET unset: a process that defined the
kernels for the interpreter cannot compile them for a GPU. Candidate configs are not autotuned at run time (the
launchers use the one shipped config per architecture and dtype); they are here to show why the shipped one was
chosen: which neighbours spill, which do not fit in shared memory, which lose occupancy.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass

# --- hardware limits per target ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of a compute capability (CUDA occupancy calculator values)."""

    capability: int
    cards: str
    registers: int = 65536
    register_granularity: int = 256  # registers are allocated per warp in units of 256
    max_registers_per_thread: int = 255
    max_warps: int = 64  # 2048 threads
    max_blocks: int = 32
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 227 * 1024
    shared_reserved_per_block: int = 1024  # the runtime's own shared memory per resident block (sm_80 and later)
    shared_granularity: int = 128
    tensor_memory_columns: int = 0  # sm_100: 512 columns of tensor memory per SM


TARGETS = {
    80: SmLimits(80, "A100", shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
    90: SmLimits(90, "H100/H200"),
    100: SmLimits(100, "B200", tensor_memory_columns=512),
}
# Targets every shipped config must pass (CI); sm_100 is reported when Triton can compile for it.
REQUIRED_TARGETS = (80, 90)
EXPECTED_MMA = {80: "mma.sync", 90: "wgmma", 100: "tcgen05"}


def occupancy(regs: int, num_warps: int, shared_bytes: int, limits: SmLimits, tmem_columns: int = 0) -> dict:
    """Resident blocks per SM and what limits them.

    Registers: each warp gets ``ceil(regs * 32 / 256) * 256`` registers; shared memory: each block takes its
    dynamic shared memory plus the runtime's reserved 1 KiB, rounded up to 128 bytes; a block that needs more
    shared memory than one block may have does not launch (0 blocks, limiter "shared (does not launch)").
    """
    regs_per_warp = math.ceil(max(regs, 1) * 32 / limits.register_granularity) * limits.register_granularity
    by_registers = (limits.registers // regs_per_warp) // num_warps
    per_block_shared = shared_bytes + limits.shared_reserved_per_block
    per_block_shared = math.ceil(per_block_shared / limits.shared_granularity) * limits.shared_granularity
    fits = shared_bytes <= limits.shared_per_block
    by_shared = limits.shared_per_sm // per_block_shared if fits else 0
    by_threads = limits.max_warps // num_warps
    by_tmem = limits.tensor_memory_columns // tmem_columns if tmem_columns and limits.tensor_memory_columns \
        else limits.max_blocks
    limits_by = {"registers": by_registers, "shared": by_shared, "threads": by_threads, "tensor memory": by_tmem,
                 "block limit": limits.max_blocks}
    blocks = min(limits_by.values())
    limiter = min(limits_by, key=lambda k: (limits_by[k], list(limits_by).index(k)))
    if not fits:
        limiter = "shared (does not launch)"
    return {"blocks_by_regs": by_registers, "blocks_by_shared": by_shared, "blocks_by_threads": by_threads,
            "blocks_by_tmem": by_tmem, "blocks_per_sm": blocks, "limiter": limiter,
            "warps_per_sm": blocks * num_warps, "occupancy_pct": round(100.0 * blocks * num_warps / limits.max_warps)}


# --- what to compile -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One compile: ``spec`` (a benchmarks.kernel_specs.CompileSpec) for ``sm_<capability>``.
    ``family``: the kernel and dtype without the loss-variant flags (what a candidate config is compared within);
    ``shipped``: the config is the one the launchers use on that target; ``role``: "shipped" (from shipped_specs) or
    "candidate"."""

    capability: int
    spec: object
    family: str
    shipped: bool
    role: str

    @property
    def key(self) -> tuple:
        return (self.capability, self.spec.name, self.spec.config)


def family_of(name: str) -> str:
    """``vocab_partials[store_logits,no_bias,plain,bf16]`` -> ``vocab_partials[store_logits,bf16]``: the kernel,
    its mode and dtype; bias and loss-variant flags are specialisations of the same family."""
    kernel, _, rest = name.partition("[")
    parts = rest.rstrip("]").split(",") if rest else []
    keep = [p for p in parts if p in ("store_logits", "stats_only", "grad_hidden", "grad_weight", "bf16", "fp16",
                                      "fp32")]
    return f"{kernel}[{','.join(keep)}]" if keep else kernel


def _cfg(block_m, block_n, block_k, num_warps, num_stages, **kw):
    from fused_wce.kernels.configs import KernelConfig

    return KernelConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                        num_stages=num_stages, **kw)


def candidate_configs() -> dict[str, list]:
    """Configs around the shipped ones, per kernel family (block sizes, warps, pipeline stages)."""
    from fused_wce.kernels.configs import KernelConfig

    tile = [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4),
            (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 3), (64, 128, 64, 4, 3),
            (128, 64, 64, 4, 4), (128, 64, 64, 8, 4)]
    fp32_tile = [(64, 128, 16, 8, 3), (64, 128, 32, 8, 3), (128, 128, 16, 8, 3), (64, 64, 32, 4, 3),
                 (32, 128, 32, 4, 3)]
    return {
        "vocab_partials": [_cfg(*c) for c in tile],
        "vocab_partials_fp32": [_cfg(*c) for c in fp32_tile],
        "softmax_grad": [KernelConfig(block_m=m, num_warps=w) for m, w in ((16, 4), (8, 4), (32, 4), (32, 8),
                                                                           (64, 8))],
        "combine": [KernelConfig(block_m=m, block_s=s, num_warps=w) for m, s, w in ((32, 64, 4), (64, 64, 4),
                                                                                     (32, 32, 4), (64, 32, 4),
                                                                                     (16, 64, 2))],
    }


def _same(a, b, fields) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in fields)


_TILE_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages")


def candidate_jobs(capability: int) -> list[Job]:
    """Candidate configs of the families whose config choice matters, on representative specialisations: plain
    (no bias, no variant flags) and the heaviest (bias and every loss-variant flag on: most registers).
    A candidate is marked shipped when it equals the config of the shipped specialisation of the same name on
    this target (configs may differ per loss variant, e.g. a narrower vocabulary tile for the heaviest)."""
    import torch

    from benchmarks import kernel_specs as cs
    from fused_wce.kernels.configs import gpu_configs

    shipped_by_name = {spec.name: spec for spec in cs.shipped_specs(capability)}
    all_flags = getattr(cs, "ALL_FLAGS", None)
    heaviest = {} if all_flags is None else {"flags": all_flags}
    candidates = candidate_configs()
    jobs: list[Job] = []

    def add(spec, fallback_config, fields):
        shipped_spec = shipped_by_name.get(spec.name)
        reference = shipped_spec.config if shipped_spec is not None else fallback_config
        same = _same(spec.config, reference, fields)
        if shipped_spec is not None and "BLOCK_SIZE_N" in spec.constexprs:
            same = same and spec.constexprs["BLOCK_SIZE_N"] == shipped_spec.constexprs.get("BLOCK_SIZE_N")
        jobs.append(Job(capability, spec, family_of(spec.name), same, "candidate"))

    for dtype, suffix in ((torch.bfloat16, ""), (torch.float32, "_fp32")):
        shipped = gpu_configs(capability, dtype)
        tile_configs = candidates["vocab_partials" + suffix]
        for config in tile_configs:
            add(cs.vocab_partials_spec(dtype, store_logits=True, has_bias=False, config=config),
                shipped.vocab_partials, _TILE_FIELDS)
            add(cs.vocab_partials_spec(dtype, store_logits=False, has_bias=False, config=config),
                shipped.vocab_partials, _TILE_FIELDS)
            if dtype == torch.bfloat16:
                add(cs.vocab_partials_spec(dtype, store_logits=True, has_bias=True, config=config, **heaviest),
                    shipped.vocab_partials, _TILE_FIELDS)
    bf16 = gpu_configs(capability, torch.bfloat16)
    probe = cs.softmax_grad_spec(torch.bfloat16, bf16.softmax_grad, bf16.vocab_partials.block_n, **heaviest)
    shipped_softmax = shipped_by_name.get(probe.name, probe)
    for config in candidates["softmax_grad"]:
        add(cs.softmax_grad_spec(torch.bfloat16, config, shipped_softmax.constexprs["BLOCK_SIZE_N"], **heaviest),
            bf16.softmax_grad, ("block_m", "num_warps"))
    for config in candidates["combine"]:
        add(cs.combine_spec(config), bf16.combine, ("block_m", "block_s", "num_warps"))
    return jobs


def shipped_jobs(capability: int) -> list[Job]:
    from benchmarks.kernel_specs import shipped_specs

    return [Job(capability, spec, family_of(spec.name), True, "shipped") for spec in shipped_specs(capability)]


def all_jobs(capabilities, candidates: bool = True, only: str | None = None) -> list[Job]:
    """Every (target, spec, config) to compile, shipped first, without duplicates (a candidate equal to a shipped
    spec is the same compile: it is kept once, as shipped). ``only``: a regex on the spec name."""
    pattern = re.compile(only) if only else None
    jobs, seen = [], set()
    for capability in capabilities:
        for job in shipped_jobs(capability) + (candidate_jobs(capability) if candidates else []):
            if job.key in seen or (pattern and not pattern.search(job.spec.name)):
                continue
            seen.add(job.key)
            jobs.append(job)
    return jobs


# --- compiling (worker side) ----------------------------------------------------------------------------------------
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def mma_family(ptx: str) -> str:
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


def compile_job(job: Job) -> dict:
    """Compile one job and read its resources. Needs TRITON_ALWAYS_COMPILE=1 and TRITON_DUMP_PTXAS_LOG=1 (set by
    the worker) so that ptxas runs for this compile and its report (registers, stack, spills) is printed."""
    from benchmarks.kernel_specs import compile_spec

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = compile_spec(job.spec, job.capability)
    text = log.getvalue()
    spills, regs = _PTXAS_SPILLS.search(text), _PTXAS_REGS.search(text)
    if not spills or not regs:
        raise RuntimeError(f"{job.spec.name} on sm_{job.capability}: no ptxas report in {text[-500:]!r}")
    metadata = kernel.metadata
    return {"regs": int(regs.group(1)), "stack_bytes": int(spills.group(1)),
            "spill_store_bytes": int(spills.group(2)), "spill_load_bytes": int(spills.group(3)),
            "shared_bytes": int(metadata.shared), "tmem_columns": int(getattr(metadata, "tmem_size", 0) or 0),
            "mma": mma_family(kernel.asm["ptx"])}


def job_row(job: Job, compiled: dict | None, error: str | None = None) -> dict:
    """One report row: the job, its config, compiled resources, occupancy and a verdict."""
    config = job.spec.config
    limits = TARGETS[job.capability]
    row = {"target": f"sm_{job.capability}", "cards": limits.cards, "family": job.family, "kernel": job.spec.name,
           "role": job.role, "shipped": job.shipped, "block_m": config.block_m,
           "block_n": job.spec.constexprs.get("BLOCK_SIZE_N", ""), "block_k": job.spec.constexprs.get("BLOCK_SIZE_K", ""),
           "block_s": job.spec.constexprs.get("BLOCK_SIZE_S", ""), "num_warps": config.num_warps,
           "num_stages": config.num_stages if job.spec.constexprs.get("BLOCK_SIZE_K") else "",
           "multiplies": job.spec.multiplies}
    if compiled is None:
        row.update({"verdict": f"compile error: {error}"})
        return row
    row.update(compiled)
    row.update(occupancy(compiled["regs"], config.num_warps, compiled["shared_bytes"], limits,
                         compiled["tmem_columns"]))
    problems = []
    if compiled["spill_store_bytes"] or compiled["spill_load_bytes"] or compiled["stack_bytes"]:
        problems.append(f"spills {compiled['spill_store_bytes']} B")
    if compiled["shared_bytes"] > limits.shared_per_block:
        problems.append(f"shared {compiled['shared_bytes'] // 1024} KiB > {limits.shared_per_block // 1024} KiB")
    if job.spec.multiplies and compiled["mma"] != EXPECTED_MMA[job.capability]:
        problems.append(f"{compiled['mma']} instead of {EXPECTED_MMA[job.capability]}")
    row["verdict"] = "ok" if not problems else "; ".join(problems)
    return row


def _worker(index: int, count: int, capabilities, candidates: bool, only: str | None) -> int:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("benchmarks.static --worker must run without TRITON_INTERPRET")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = all_jobs(capabilities, candidates, only)
    for position, job in enumerate(jobs):
        if position % count != index:
            continue
        try:
            row = job_row(job, compile_job(job))
        except Exception as error:  # a config the compiler rejects is a result, not a crash of the report
            row = job_row(job, None, f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
        row["position"] = position
        sys.__stdout__.write(json.dumps(row) + "\n")
        sys.__stdout__.flush()
    return 0


# --- driving the workers ----------------------------------------------------------------------------------------------
def supported_targets(requested) -> list[int]:
    """The requested targets Triton can compile for here (sm_100 needs a Blackwell-aware ptxas)."""
    import triton

    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    return [c for c in requested if c in TARGETS and (c < 100 or version >= (3, 3))]


def collect(capabilities, candidates: bool = True, only: str | None = None, jobs: int | None = None,
            timeout_s: float = 1800) -> list[dict]:
    """Compile everything in ``jobs`` worker subprocesses (TRITON_INTERPRET unset); rows in job order."""
    count = max(1, jobs or min(8, os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    args = ["--targets", *map(str, capabilities)] + ([] if candidates else ["--no-candidates"]) + \
        (["--only", only] if only else [])
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.static", "--worker", f"{i}/{count}", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
             for i in range(count)]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"static report worker failed ({proc.returncode}):\n{err[-3000:]}")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["position"])


# --- the report ----------------------------------------------------------------------------------------------------------
CSV_COLUMNS = ("target", "cards", "family", "kernel", "role", "shipped", "block_m", "block_n", "block_k", "block_s",
               "num_warps", "num_stages", "regs", "spill_store_bytes", "spill_load_bytes", "stack_bytes",
               "shared_bytes", "tmem_columns", "mma", "multiplies", "blocks_by_regs", "blocks_by_shared",
               "blocks_by_threads", "blocks_by_tmem", "blocks_per_sm", "warps_per_sm", "occupancy_pct", "limiter",
               "verdict")


def shipped_failures(rows: list[dict], required=REQUIRED_TARGETS) -> list[str]:
    """Shipped configs on required targets that spill, do not fit, miss their tensor-core instructions or fail to
    compile (what CI must never let land)."""
    return [f"{r['kernel']} on {r['target']}: {r['verdict']}" for r in rows
            if r["shipped"] and int(r["target"][3:]) in required and r["verdict"] != "ok"]


def _md_table(rows: list[dict], columns) -> list[str]:
    out = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(str(get(row)) for _, get in columns) + " |")
    return out


def _tile(row) -> str:
    parts = [str(row[k]) for k in ("block_m", "block_n", "block_k") if row.get(k) not in ("", None)]
    if row.get("block_s") not in ("", None):
        parts.append(f"s{row['block_s']}")
    stages = f" s{row['num_stages']}" if row.get("num_stages") not in ("", None) else ""
    return "x".join(parts) + f" w{row['num_warps']}{stages}"


def summarize_shipped(rows: list[dict]) -> list[dict]:
    """One line per (target, family) over the shipped specialisations: the worst case of each resource."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["role"] == "shipped":
            groups.setdefault((row["target"], row["family"]), []).append(row)
    summary = []
    for (target, family), members in groups.items():
        ok = [m for m in members if "regs" in m]
        if not ok:
            summary.append({"target": target, "family": family, "specs": len(members), "config": _tile(members[0]),
                            "regs": "-", "spills": "-", "shared": "-", "mma": "-", "blocks": "-", "limiter": "-",
                            "verdict": members[0]["verdict"]})
            continue
        regs = sorted({m["regs"] for m in ok})
        worst = min(ok, key=lambda m: (m["blocks_per_sm"], -m["regs"]))
        summary.append({
            "target": target, "family": family, "specs": len(members), "config": _tile(members[0]),
            "regs": f"{regs[0]}" if len(regs) == 1 else f"{regs[0]}-{regs[-1]}",
            "spills": max(m["spill_store_bytes"] + m["spill_load_bytes"] + m["stack_bytes"] for m in ok),
            "shared": f"{max(m['shared_bytes'] for m in ok) // 1024} KiB",
            "mma": "/".join(sorted({m["mma"] for m in ok})),
            "blocks": f"{worst['blocks_per_sm']} ({worst['occupancy_pct']}%)", "limiter": worst["limiter"],
            "verdict": "ok" if all(m["verdict"] == "ok" for m in members) else
            "; ".join(sorted({m["verdict"] for m in members if m["verdict"] != "ok"})),
        })
    return summary


def render_markdown(rows: list[dict], targets, triton_version: str) -> str:
    lines = [
        "# Static report: compiled resources and occupancy of every kernel",
        "",
        f"Generated by `python -m benchmarks.static` on {datetime.date.today().isoformat()} with Triton "
        f"{triton_version}, no GPU: targets {', '.join(f'sm_{t} ({TARGETS[t].cards})' for t in targets)}. "
        "Registers, stack and spills are ptxas' report of the compile; shared and tensor memory are Triton's "
        "metadata; the matmul family is read from the PTX. Blocks per SM = min over registers (per warp, "
        "granularity 256), shared memory (+1 KiB reserved per block), threads (64 warps), tensor memory (sm_100, "
        "512 columns) and 32 blocks. Method and reading: docs/design.md, \"Static report and roofline\".",
        "",
    ]
    failures = shipped_failures(rows, [t for t in REQUIRED_TARGETS if t in targets])
    lines += ["**Shipped configs: " + ("all compile with 0 spills, fit shared memory, and use the expected "
                                       "tensor-core instructions on " + ", ".join(f"sm_{t}" for t in targets
                                                                                 if t in REQUIRED_TARGETS)
                                       if not failures else f"{len(failures)} FAILURES") + ".**", ""]
    lines += [f"- {f}" for f in failures]
    lines += ["## Shipped configs (worst case over each family's specialisations)", ""]
    summary = summarize_shipped(rows)
    lines += _md_table(summary, [(t, (lambda k: lambda r: r[k])(k)) for t, k in (
        ("target", "target"), ("kernel family", "family"), ("specs", "specs"), ("config", "config"),
        ("regs", "regs"), ("spill+stack B", "spills"), ("shared", "shared"), ("mma", "mma"),
        ("blocks/SM (occ.)", "blocks"), ("limited by", "limiter"), ("verdict", "verdict"))])
    candidates = [r for r in rows if r["role"] == "candidate" or r["shipped"]]
    families = sorted({r["family"] for r in rows if r["role"] == "candidate"})
    if families:
        lines += ["", "## Candidate configs around the shipped ones", "",
                  "Per family, the plain specialisation (no bias, no loss-variant flags) and for bf16 "
                  "`vocab_partials`/`softmax_grad` also the heaviest one (bias and every variant flag). "
                  "**shipped** marks the config the launchers use on that target. Rejected candidates are the "
                  "reason the shipped config is what it is: they spill, do not fit, or lose occupancy.", ""]
        columns = [("target", lambda r: r["target"]), ("kernel", lambda r: r["kernel"]),
                   ("config", _tile), ("shipped", lambda r: "**shipped**" if r["shipped"] else ""),
                   ("regs", lambda r: r.get("regs", "-")),
                   ("spill st/ld B", lambda r: f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
                    if "regs" in r else "-"),
                   ("stack B", lambda r: r.get("stack_bytes", "-")),
                   ("shared KiB", lambda r: r["shared_bytes"] // 1024 if "regs" in r else "-"),
                   ("mma", lambda r: r.get("mma", "-")),
                   ("blocks/SM", lambda r: f"{r['blocks_per_sm']} ({r['occupancy_pct']}%)" if "regs" in r else "-"),
                   ("limited by", lambda r: r.get("limiter", "-")), ("verdict", lambda r: r["verdict"])]
        for family in families:
            members = [r for r in candidates if r["family"] == family and
                       (r["role"] == "candidate" or any(c["role"] == "candidate" and c["kernel"] == r["kernel"]
                                                        for c in candidates))]
            lines += ["", f"### {family}", ""]
            lines += _md_table(sorted(members, key=lambda r: (int(r["target"][3:]), r["kernel"], not r["shipped"])),
                               columns)
    lines += ["", "## Every shipped specialisation", "", "<details><summary>"
              f"{sum(r['role'] == 'shipped' for r in rows)} rows (also in static_report.csv)</summary>", ""]
    lines += _md_table([r for r in rows if r["role"] == "shipped"], [
        ("target", lambda r: r["target"]), ("kernel", lambda r: r["kernel"]), ("config", _tile),
        ("regs", lambda r: r.get("regs", "-")), ("spill+stack B", lambda r: r["spill_store_bytes"] +
                                                  r["spill_load_bytes"] + r["stack_bytes"] if "regs" in r else "-"),
        ("shared KiB", lambda r: r["shared_bytes"] // 1024 if "regs" in r else "-"),
        ("mma", lambda r: r.get("mma", "-")),
        ("blocks/SM", lambda r: r.get("blocks_per_sm", "-")), ("verdict", lambda r: r["verdict"])])
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def write_report(rows: list[dict], out_dir: str, targets, triton_version: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "static_report.csv")
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_path = os.path.join(out_dir, "static_report.md")
    with open(md_path, "w") as file:
        file.write(render_markdown(rows, targets, triton_version))
    return md_path, csv_path


def make_parser(prog: str = "python -m benchmarks.static") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", type=int, default=[80, 90, 100],
                        help="compute capabilities (default: 80 90 100; 100 only where Triton supports it)")
    parser.add_argument("--out", default="bench_out", help="writes static_report.md and static_report.csv here")
    parser.add_argument("--no-candidates", action="store_true", help="shipped configs only")
    parser.add_argument("--only", default=None, help="regex on the specialisation name (e.g. 'bf16')")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPUs, <= 8)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks.static") -> int:
    args = make_parser(prog).parse_args(argv)
    candidates = not args.no_candidates
    if args.worker:
        index, count = (int(x) for x in args.worker.split("/"))
        return _worker(index, count, args.targets, candidates, args.only)
    import triton

    targets = supported_targets(args.targets)
    skipped = sorted(set(args.targets) - set(targets))
    if skipped:
        print(f"[static] skipping targets this Triton cannot compile for: {skipped}")
    rows = collect(targets, candidates, args.only, args.jobs)
    md_path, csv_path = write_report(rows, args.out, targets, triton.__version__)
    summary = summarize_shipped(rows)
    print("\n".join(_md_table(summary, [(k, (lambda k: lambda r: r[k])(k)) for k in (
        "target", "family", "specs", "config", "regs", "spills", "shared", "mma", "blocks", "limiter",
        "verdict")])))
    print(f"\n[static] {len(rows)} compiles; wrote {md_path} and {csv_path}")
    failures = shipped_failures(rows, [t for t in REQUIRED_TARGETS if t in targets])
    for failure in failures:
        print(f"[static] SHIPPED CONFIG FAILS: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
