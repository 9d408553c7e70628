"""bench/gpu_check.py on CPU: the install plan from nvidia-smi's answer, the peak table, the numbers
it derives from a run directory, and the bench itself in its `--device cpu` smoke mode (tiny world,
tiny models, 2 steps of three strategies), whose table and JSON must agree with the run
directories' own result.json, and whose exit code is red when a run fails."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)

TINY = [
    "--device", "cpu", "--steps", "2", "--people", "12", "--train-questions", "24", "--eval-questions", "4",
    "--batch-size", "4", "--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64",
    "--vocab", "400", "--retriever", "tiny", "--threads", "1",
]  # fmt: skip


# ---- the peak table and the install plan ---------------------------------------------------------
@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA A10G", None),  # no vendor datasheet: never a guess
        ("NVIDIA GH200 480GB", None),
        ("Tesla V100-SXM2-16GB", None),
        ("cpu: AMD EPYC x 2 cores", None),
    ],
)
def test_dense_bf16_peaks_by_device_name(name, peak):
    got, source = gc.peak_bf16_flops(name)
    assert got == peak, (name, source)
    assert ("datasheet" in source) if peak else ("--peak-flops" in source)


@pytest.mark.parametrize(
    "csv, torch_spec, extra, expect",
    [
        ("NVIDIA H200, 9.0, 580.159.03, 143771", "torch", "gpu", True),
        ("NVIDIA H100 80GB HBM3, 9.0, 570.124.06, 81559", "torch==2.10.0", "gpu", True),  # CUDA 12 driver
        ("Tesla T4, 7.5, 535.104.05, 15360", "torch==2.10.0", "gpu", True),
        ("Tesla P100-PCIE-16GB, 6.0, 550.54.15, 16384", "torch==2.10.0", "faiss", False),  # no faiss GPU wheel
        ("NVIDIA B200, 10.0, 580.82.07, 183359", "torch", "gpu", False),  # only through PTX: the probe decides
        ("NVIDIA A100-SXM4-40GB, [N/A], 580.65.06, 40960", "torch", "gpu", False),
    ],
)
def test_install_plan_from_nvidia_smi(csv, torch_spec, extra, expect):
    plan = gc.install_plan(gc.parse_gpus(csv + "\n")[0])
    assert (plan["torch"], plan["faiss_extra"], plan["expect_faiss_gpu"]) == (torch_spec, extra, expect)
    assert plan["faiss_dist"] == {"gpu": "faiss-gpu", "faiss": "faiss-cpu"}[extra]


def test_plan_refuses_an_old_driver_and_unreadable_output():
    with pytest.raises(ValueError, match="older than R525"):
        gc.install_plan(gc.parse_gpus("Tesla K80, 3.7, 470.82.01, 11441")[0])
    for bad in ("", "NVIDIA H200, 9.0, 580.1", "NVIDIA H200, 9.0, N/A, 1"):
        with pytest.raises(ValueError):
            gc.parse_gpus(bad)
    assert len(gc.parse_gpus("NVIDIA H200, 9.0, 580.1.2, 1\nNVIDIA H200, 9.0, 580.1.2, 1\n")) == 2


def test_a_torch_build_runs_on_a_gpu_with_machine_code_of_its_major_version_or_older_ptx():
    archs = ["sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]
    assert gc.has_code_for(archs, (9, 0)) and gc.has_code_for(archs, (8, 9))  # 8.6 code runs on 8.9
    assert gc.has_code_for(archs, (12, 0))  # through the compute_90 PTX
    assert not gc.has_code_for(["sm_80", "sm_86", "sm_90"], (12, 0))  # no PTX: nothing runs on 12.0
    assert not gc.has_code_for(["sm_80", "sm_90"], (7, 5))  # machine code never runs on an older GPU


def test_plan_command_needs_only_the_standard_library(tmp_path):
    """`plan` runs under the system python3 before any venv: `-S` (no site-packages) must do."""
    smi = tmp_path / "smi.csv"
    smi.write_text("NVIDIA H200, 9.0, 580.159.03, 143771\n")
    cmd = [sys.executable, "-S", str(SCRIPT), "plan", "--nvidia-smi-csv", str(smi)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = dict(line.split("=", 1) for line in res.stdout.splitlines())
    assert got["PLAN_TORCH"] == "torch" and got["PLAN_FAISS_EXTRA"] == "gpu" and got["PLAN_EXPECT_FAISS_GPU"] == "1"
    assert got["GPU_NAME"] == "'NVIDIA H200'"  # shell-quoted for `eval`
    smi.write_text("Tesla K80, 3.7, 470.82.01, 11441\n")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "R525" in res.stderr and not res.stdout


# ---- numbers from a run directory ---------------------------------------------------------------
def test_median_step_time_skips_phase_switches_and_gaps():
    rows = [
        {"step": 1, "phase": "a", "time": 10.0},  # warm-up step: no gap before it
        {"step": 2, "phase": "a", "time": 10.5},
        {"step": 3, "phase": "a", "time": 11.0},
        {"step": 4, "phase": "b", "time": 19.0},  # phase switch (checkpoint, new optimizer): skipped
        {"step": 5, "phase": "b", "time": 19.7},
        {"step": 7, "phase": "b", "time": 30.0},  # not consecutive: skipped
    ]
    assert gc.median_step_seconds(rows) == pytest.approx(0.5)
    assert gc.median_step_seconds(rows[:1]) is None


def test_summary_mfu_is_step_flops_over_train_seconds_times_peak():
    flops = {"train": 6e12, "score": 1e12, "generate": 1e12, "index": 5e12, "eval": 9e12}
    cost = {
        "flops": {**flops, "total_train": 13e12},
        "tokens": {"train": 900, "score": 50, "generate": 50, "index": 7000, "eval": 10},
        "wall_seconds": {"train": 4.0, "index": 1.0, "total": 5.0},
        "peak_memory_bytes": {"cpu": 10, "gpu": 2**30},
        "device": "NVIDIA H200",
    }
    rows = [{"step": i, "phase": "p", "time": 0.5 * i} for i in range(1, 5)]
    s = gc.summarize({"steps": 4, "cost": cost}, rows, 1e15, "cuda")
    assert s["step_flops"] == 8e12  # train + score + generate; the corpus embedding (index) is not a step
    assert s["mfu"] == pytest.approx(8e12 / (4.0 * 1e15))
    assert s["mfu_steady"] == pytest.approx(8e12 / (4 * 0.5 * 1e15))
    assert s["tokens_per_s"] == pytest.approx(1000 / 4.0) and s["s_per_step"] == pytest.approx(1.0)
    assert s["peak_memory_bytes"] == 2**30
    assert gc.summarize({"steps": 4, "cost": cost}, rows, None, "cuda")["mfu"] is None


# ---- the bench, smoke mode --------------------------------------------------------------------------
def _bench(tmp_path, *args):
    cmd = [sys.executable, str(SCRIPT), "bench", *TINY, "--out", str(tmp_path / "out"), *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    return res, report


def test_bench_smoke_on_cpu_reports_what_the_run_directories_say(tmp_path):
    peak = 1e12
    res, report = _bench(tmp_path, "--strategies", "none", "joint", "two_phase", "--peak-flops", str(peak))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert report["ok"] and not report["problems"] and report["device"]["kind"] == "cpu"
    assert report["device"]["name"].startswith("cpu") and report["device"]["peak_bf16_flops"] == peak
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["none", "joint", "two_phase"] and all(r["ok"] for r in runs.values())
    for name, r in runs.items():
        result = json.loads((tmp_path / "out" / "runs" / name / "result.json").read_text())
        cost = result["cost"]
        flops = cost["flops"]["train"] + cost["flops"]["score"] + cost["flops"]["generate"]
        train_s = cost["wall_seconds"].get("train", 0.0)
        assert r["steps"] == result["steps"] == (0 if name == "none" else 2)
        assert r["step_flops"] == flops and r["train_seconds"] == train_s
        assert r["peak_memory_bytes"] == cost["peak_memory_bytes"]["cpu"] > 0
        assert r["dev_em"] == result["dev"]["em"]
        if name == "none":  # trains nothing: no step time, no MFU
            assert r["mfu"] is None and r["s_per_step"] is None and flops == 0
        else:
            assert flops > 0 and train_s > 0
            assert r["mfu"] == pytest.approx(flops / (train_s * peak), rel=1e-12)
            assert r["s_per_step"] == pytest.approx(train_s / 2)
            assert r["tokens_per_s"] == pytest.approx(
                sum(cost["tokens"][a] for a in ("train", "score", "generate")) / train_s
            )
            assert not (tmp_path / "out" / "runs" / name / "checkpoints").exists()  # removed: not needed
        assert f"| {name} | yes | {r['steps']} |" in res.stdout  # the markdown table
    assert runs["joint"]["median_s_per_step"] is not None and runs["two_phase"]["median_s_per_step"] is None
    final = torch.load(tmp_path / "out" / "runs" / "joint" / "final.pt", map_location="cpu", weights_only=False)
    n = sum(v.numel() for k, v in final["weights"].items() if k.startswith("generator."))
    assert report["generator"]["parameters"] == n and report["generator"]["checked_against_final_pt"]
    assert f"{n:,} parameters" in res.stdout
    assert (tmp_path / "out" / "gpu_check.md").read_text().splitlines()[0].startswith("| run | ok |")


def test_bench_is_red_when_a_run_fails_and_mfu_is_na_without_a_peak(tmp_path):
    res, report = _bench(tmp_path, "--strategies", "no_such_strategy")
    assert res.returncode == 1
    assert not report["ok"] and report["device"]["peak_bf16_flops"] is None
    (run,) = report["runs"]
    assert not run["ok"] and run["rc"] == 2  # ragtune's exit code for a bad configuration
    assert any("exit code 2" in p for p in run["problems"]) and "unknown strategy" in " ".join(run["problems"])
    assert "| no_such_strategy | **NO** |" in res.stdout and "MFU n/a" in res.stdout
    assert "RED" in res.stdout + res.stderr


def test_bench_is_red_past_its_budget_a_run_is_stopped_the_rest_not_started(tmp_path):
    # a ragtune process cannot even import torch in half a second: killed at the budget's end
    res, report = _bench(tmp_path, "--strategies", "joint", "none", "--budget-s", "0.5")
    assert res.returncode == 1 and not report["ok"]
    (run,) = report["runs"]
    assert run["name"] == "joint" and run["rc"] is None and "killed after 0 s" in run["problems"][0]
    assert "none: not run, --budget-s 0 s spent" in report["problems"]
