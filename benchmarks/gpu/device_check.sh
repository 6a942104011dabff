#!/usr/bin/env bash
# Issue 10's GPU check on a lent H100 / H200, sized for a lease (<= 8 minutes on a fresh machine):
#   1. the GPU tests (pytest -n 6: compiling dominates), log to $OUT_DIR/gpu_tests.log;
#   2. the benchmark cases in priority order (benchmarks/gpu/device_check.py), each appended to
#      $OUT_DIR/device_check.jsonl as it finishes, so a timeout keeps the finished rows;
#   3. a table and the targets, last (the device tool returns the end of the output).
#
# Before the call, on the development machine (optional: the PyPI comparison providers):
#   bash benchmarks/gpu/fetch_wheels.sh                      # -> .whl/ (git-ignored)
# Through the device tool, from the repository root:
#   run(command="EGMA_COMMIT=<git rev-parse HEAD here> OUT_DIR=$OUT bash benchmarks/gpu/device_check.sh",
#       carry=[".whl"], timeout_s=540)
# Then commit $OUT's device_check.jsonl as benchmarks/results/device_check_<gpu>_<date>.jsonl.
#
# Knobs: OUT_DIR (default benchmarks/results/device_check), TOTAL_BUDGET_S (default 450: the whole
# script ends by then, the summary included), TEST_TIMEOUT_S (at most this for the GPU tests,
# default 220), EGMA_CHECK_CUDA=1 (also build the CUDA extension in the background and run its GPU
# tests and benchmark rows).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT_DIR:-benchmarks/results/device_check}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export EGMA_COMMIT=${EGMA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
start=$(date +%s)
deadline=$(( start + ${TOTAL_BUDGET_S:-450} ))
left() { echo $(( deadline - $(date +%s) )); }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/egma_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/egma_site"
fi
tests=(tests/test_triton_gpu.py)
if [ "${EGMA_CHECK_CUDA:-0}" = 1 ]; then
  (EGMA_FAST_BUILD_CUDA=on TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=6 python3 setup.py build_ext --inplace \
    > "$OUT_DIR/build_cuda.log" 2>&1) &
  build=$!
fi

echo "== GPU tests ($(python3 -c 'import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)'))"
test_s=${TEST_TIMEOUT_S:-220}
(( test_s > $(left) - 150 )) && test_s=$(( $(left) - 150 ))   # keep at least 150 s for the benchmarks
timeout "$test_s" python3 -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-6}" "${tests[@]}" \
  > "$OUT_DIR/gpu_tests.log" 2>&1
echo "gpu tests rc=$? ($(( $(date +%s) - start )) s): $(tail -n 1 "$OUT_DIR/gpu_tests.log")"
if [ -n "${build:-}" ]; then
  wait "$build" && timeout $(( $(left) > 240 ? 90 : 30 )) python3 -m pytest -q -p no:cacheprovider tests/test_cpp_gpu.py \
    > "$OUT_DIR/cuda_tests.log" 2>&1
  echo "cuda extension tests: $(tail -n 1 "$OUT_DIR/cuda_tests.log")"
fi

echo "== benchmark cases"
# device_check.py starts no case after its budget and caps the fresh-process case by it; the 30 s
# left over are for a case already running and the summary.
timeout $(( $(left) > 20 ? $(left) - 5 : 15 )) python3 benchmarks/gpu/device_check.py \
  --out "$OUT_DIR/device_check.jsonl" --budget-s $(( $(left) > 60 ? $(left) - 30 : 30 ))
[ $? -ne 0 ] && python3 benchmarks/gpu/device_check.py --summarize "$OUT_DIR/device_check.jsonl"
echo "total $(( $(date +%s) - start )) s"
