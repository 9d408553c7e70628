#!/usr/bin/env bash
# The GPU check of ragtune, on one NVIDIA GPU machine with the repository and PyPI, nothing else:
#   bash bench/gpu_check.sh
# 1. machine: nvidia-smi -> what to install (bench/gpu_check.py plan: torch for the driver, the faiss
#    GPU wheel for the compute capability);
# 2. install: a venv with torch (a CUDA wheel), ragtune[dev,deepspeed,<faiss extra>] (editable: `-e .`)
#    and the bundled MiniLM (bench/gpu_check.py install); checked (bench/gpu_check.py verify: torch
#    sees the GPU and has code for it, exactly one faiss wheel, deepspeed imports; no MiniLM: a warning);
# 3. the GPU tests (pytest -m gpu tests/gpu): a bf16 step, the index on the GPU, faiss-gpu or its
#    fallback, DeepSpeed ZeRO-2 and ZeRO-3 in one process; a machine without CUDA is an error there,
#    never a skip (RAGTUNE_REQUIRE_GPU=1);
# 4. every strategy for a few steps with a ~100M-parameter generator in bf16 (bench/gpu_check.py
#    bench): s/step, tokens/s, MFU, peak GPU memory, the retriever each run used; a markdown table
#    and gpu_check.json.
# Green or red: exit 0 only if every stage passed. What to send back is small, all under
# $GPU_CHECK_OUT (default results/gpu_check): gpu_check.log, gpu_tests.xml (junit), bench/gpu_check.md
# and .json (bench/logs/: the logs of failed runs). The run directories (final.pt: ~0.5 GB each) go
# under $GPU_CHECK_SCRATCH (default results/gpu_check_runs) and are removed once read, unless
# GPU_CHECK_KEEP_RUNS=1. No model or data set is downloaded: the models are ragtune's own, built from
# config, and the data is the synthetic benchmark.
#
# Time: the whole check, install included, within GPU_CHECK_TOTAL_S (default 480) seconds of its start
# (bench/gpu_check.py budget): the install gets what is left minus the later stages' minimum, the tests
# what is left minus 240 s kept for the bench (GPU_CHECK_BENCH_BUDGET + 30 if set), at most
# GPU_CHECK_TEST_TIMEOUT if set; the bench gets what is left minus 30 s (at most GPU_CHECK_BENCH_BUDGET
# if set) and is stopped 5 s before the total at the latest. A stage past its limit is stopped and red;
# one with too little time left is red without starting, saying so. Each stage prints the time left.
#
# Offline (a machine without a registry but with a CUDA torch, e.g. an HPC node or an NGC-like
# container): GPU_CHECK_WHEELHOUSE=DIR installs from the wheels in DIR alone (pip --no-index
# --find-links DIR, no pip upgrade) into a venv made with --system-site-packages, so the machine's own
# packages are used; TORCH defaults to `system` there. Make DIR where the registry is reachable with
#   bash bench/gpu_wheelhouse.sh DIR --python-version 3.12 [--skip "torch transformers==4.57.1 ..."]
# and copy it over. TORCH=system (with or without a wheelhouse) installs no torch: the venv uses the
# system python's (PYTHON, default python3), pinned, so nothing can replace it; verify still requires
# it to see the GPU. faiss-gpu (135 MB) needs the CUDA 12 runtime wheels (nvidia-cuda-runtime-cu12,
# -cublas-cu12, -curand-cu12: ~450 MB more): on a CUDA-13-only machine, where they would be a second CUDA
# runtime beside torch's, FAISS_EXTRA=faiss (faiss-cpu; the GPU search then runs in torch) is the choice.
# No MiniLM wheel in DIR: a warning, and the bench's retriever.model=auto uses the tiny encoder (its
# table says so).
#
# Settings (environment): TORCH (a pip spec or `system`, default from the plan), FAISS_EXTRA (gpu |
# gpu-cuvs | faiss), GPU_CHECK_VENV (default ~/.cache/ragtune/gpu-check-venv, -system with
# --system-site-packages), GPU_CHECK_SKIP_INSTALL=1 with GPU_CHECK_PYTHON=/path/to/python (an
# environment prepared already), GPU_CHECK_BENCH_ARGS (extra arguments of `gpu_check.py bench`, e.g.
# "--steps 16"), GPU_CHECK_TOTAL_S, GPU_CHECK_TEST_TIMEOUT, GPU_CHECK_BENCH_BUDGET (seconds, above),
# GPU_CHECK_OUT, GPU_CHECK_SCRATCH, GPU_CHECK_KEEP_RUNS, GPU_CHECK_WHEELHOUSE.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${GPU_CHECK_OUT:-$ROOT/results/gpu_check}"
SCRATCH="${GPU_CHECK_SCRATCH:-$ROOT/results/gpu_check_runs}"
TOTAL="${GPU_CHECK_TOTAL_S:-480}"
WHEELHOUSE="${GPU_CHECK_WHEELHOUSE:-}"
SYSTEM_PYTHON="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset RAGTUNE_GPU_TEST_DEVICE  # a CPU dry run of tests/gpu (tests/conftest.py) must not stand in for the check
mkdir -p "$OUT" || exit 1
exec > >(tee "$OUT/gpu_check.log") 2>&1
T0=$SECONDS

stage() { echo; echo "== [$((SECONDS - T0)) s, $((TOTAL - SECONDS + T0)) s left of GPU_CHECK_TOTAL_S=$TOTAL] $*"; }
die() { echo "gpu_check: RED: $*"; echo "gpu_check: RED after $((SECONDS - T0)) s (log: $OUT/gpu_check.log)"; exit 1; }
# budget STAGE: sets STAGE_LEFT, STAGE_LIMIT (and STAGE_TIMEOUT for the bench); 1 (said why) if too little is left
budget() {
  local b
  b="$("$SYSTEM_PYTHON" bench/gpu_check.py budget "$1" --total "$TOTAL" --elapsed "$((SECONDS - T0))" \
    --test-timeout "${GPU_CHECK_TEST_TIMEOUT:-}" --bench-budget "${GPU_CHECK_BENCH_BUDGET:-}")" || return 1
  eval "$b"
}
[[ "$TOTAL" =~ ^[0-9]+$ ]] || die "GPU_CHECK_TOTAL_S=$TOTAL: a whole number of seconds"

stage "1/4 machine"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check needs an NVIDIA GPU and its driver"
nvidia-smi || die "nvidia-smi failed: no usable GPU driver"
PLAN="$("$SYSTEM_PYTHON" bench/gpu_check.py plan)" || die "could not plan the install (above)"
eval "$PLAN"
[ -n "$WHEELHOUSE" ] && TORCH="${TORCH:-system}"  # a wheelhouse holds no torch unless made so
TORCH="${TORCH:-$PLAN_TORCH}"
FAISS_EXTRA="${FAISS_EXTRA:-$PLAN_FAISS_EXTRA}"
case "$FAISS_EXTRA" in
  gpu) FAISS_DIST=faiss-gpu ;;
  gpu-cuvs) FAISS_DIST=faiss-gpu-cuvs ;;
  faiss) FAISS_DIST=faiss-cpu ;;
  *) die "FAISS_EXTRA=$FAISS_EXTRA: one of gpu, gpu-cuvs, faiss" ;;
esac
SITE=""
{ [ "$TORCH" = system ] || [ -n "$WHEELHOUSE" ]; } && SITE="-system"  # made --system-site-packages
VENV="${GPU_CHECK_VENV:-$HOME/.cache/ragtune/gpu-check-venv$SITE}"
# faiss-gpu is expected usable only for the wheel the plan chose for this GPU
EXPECT_FAISS_GPU="$PLAN_EXPECT_FAISS_GPU"
[ "$FAISS_EXTRA" = "$PLAN_FAISS_EXTRA" ] || EXPECT_FAISS_GPU=0
echo "GPU: $GPU_NAME, compute capability $GPU_CC, driver $GPU_DRIVER, $GPU_MEMORY_MIB MiB"
if [ "$TORCH" = system ]; then
  echo "torch: TORCH=system, $SYSTEM_PYTHON's own (the plan would install $PLAN_TORCH: $PLAN_TORCH_WHY)"
else
  echo "torch: $TORCH ($PLAN_TORCH_WHY)"
fi
echo "faiss: $FAISS_DIST, extra [$FAISS_EXTRA] ($PLAN_FAISS_WHY); faiss-gpu expected usable: $EXPECT_FAISS_GPU"
echo "bf16 dense peak: $PLAN_PEAK"

stage "2/4 install"
budget install || die "too little time left to install (above)"
INSTALL_END=$((SECONDS + STAGE_LIMIT))
echo "install and verify: at most $STAGE_LIMIT s"
if [ "${GPU_CHECK_SKIP_INSTALL:-}" = "1" ]; then
  PY="${GPU_CHECK_PYTHON:-$VENV/bin/python}"
  echo "GPU_CHECK_SKIP_INSTALL=1: using $PY as it is"
else
  [ -n "$WHEELHOUSE" ] && echo "offline: wheels from $WHEELHOUSE only (pip --no-index); $VENV sees the system packages"
  "$SYSTEM_PYTHON" bench/gpu_check.py install --venv "$VENV" --torch "$TORCH" --faiss-extra "$FAISS_EXTRA" \
    --wheelhouse "$WHEELHOUSE" --timeout "$STAGE_LIMIT" || die "the install failed (above)"
  PY="$VENV/bin/python"
fi
LEFT=$((INSTALL_END - SECONDS))
[ "$LEFT" -gt 0 ] || die "the install used all of its $STAGE_LIMIT s: no time left to verify it"
timeout -k 5 "$LEFT" "$PY" bench/gpu_check.py verify --faiss-dist "$FAISS_DIST"
RC=$?
[ "$RC" -eq 124 ] || [ "$RC" -eq 137 ] && die "verify stopped: the install stage's $STAGE_LIMIT s were spent"
[ "$RC" -eq 0 ] || die "the installed environment is not usable (above)"

stage "3/4 GPU tests (pytest -m gpu tests/gpu)"
if budget tests; then
  echo "GPU tests: at most $STAGE_LIMIT s"
  RAGTUNE_REQUIRE_GPU=1 RAGTUNE_EXPECT_FAISS_GPU="$EXPECT_FAISS_GPU" timeout -k 10 "$STAGE_LIMIT" \
    "$PY" -m pytest -v -m gpu tests/gpu -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
  TESTS_RC=$?
  { [ "$TESTS_RC" -eq 124 ] || [ "$TESTS_RC" -eq 137 ]; } && echo "gpu_check: RED: GPU tests stopped at $STAGE_LIMIT s"
else
  TESTS_RC=1
  echo "gpu_check: RED: GPU tests not run: too little time left (above)"
fi
echo "GPU tests: exit $TESTS_RC"

stage "4/4 strategies (bench/gpu_check.py bench)"
if budget bench; then
  KEEP=""
  [ "${GPU_CHECK_KEEP_RUNS:-}" = "1" ] && KEEP=1
  echo "strategy bench: --budget-s $STAGE_LIMIT (runs not started within it are red), stopped at $STAGE_TIMEOUT s"
  # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of arguments
  timeout -k 5 "$STAGE_TIMEOUT" "$PY" bench/gpu_check.py bench --device cuda --out "$OUT/bench" \
    --scratch "$SCRATCH" ${KEEP:+--keep-runs} --budget-s "$STAGE_LIMIT" ${GPU_CHECK_BENCH_ARGS:-}
  BENCH_RC=$?
  if [ -z "$KEEP" ]; then  # the bench removes them itself unless it was stopped from outside
    rm -rf "$SCRATCH/runs" "$SCRATCH/cache" "$SCRATCH/x"
    rmdir "$SCRATCH" 2>/dev/null
  fi
else
  BENCH_RC=1
  echo "gpu_check: RED: strategy bench not run: too little time left (above)"
fi
echo "strategy bench: exit $BENCH_RC"

stage "summary"
echo "GPU tests: exit $TESTS_RC ($OUT/gpu_tests.xml); strategies: exit $BENCH_RC ($OUT/bench/gpu_check.md, .json)"
echo "to send back: $OUT ($(du -sh "$OUT" | cut -f1))"
if [ "$TESTS_RC" -ne 0 ] || [ "$BENCH_RC" -ne 0 ]; then
  echo "gpu_check: RED after $((SECONDS - T0)) s of $TOTAL (log: $OUT/gpu_check.log)"
  exit 1
fi
echo "gpu_check: GREEN in $((SECONDS - T0)) s of $TOTAL (log: $OUT/gpu_check.log)"
