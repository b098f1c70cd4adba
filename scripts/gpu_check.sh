#!/usr/bin/env bash
# gpu_check.sh OUTDIR: build, test, sanitize and benchmark tx_kernels on a GPU machine in one call.
#
#   scripts/gpu_check.sh "$OUT"        (from the repository root, e.g. through the device tool)
#
# Steps (each logged; a failing step does not stop the later ones, except that nothing runs
# without a successful build; the exit status is non-zero if any step failed):
#   env        nvidia-smi, nvcc, torch versions                    -> summary.txt
#   build      TORCH_CUDA_ARCH_LIST=9.0 pip install -e . (CUDA forced) -> build.log
#   tests      the whole pytest suite                              -> tests.log, junit.xml
#   memcheck   compute-sanitizer memcheck over every CUDA op       -> sanitizer.log
#   bench      python -m benchmarks.run --device cuda --out ...     -> bench.log, bench.csv,
#                                                                     bench_raw.tar.gz
#   racecheck  compute-sanitizer racecheck over the ops with shared memory -> sanitizer.log
# At most 8 files land in OUTDIR, none in subfolders (the device tool returns at most 8 files,
# 2 folders deep). The whole run keeps under ~9 minutes: every step has a time cap, taken from
# what is left of TX_GPU_CHECK_BUDGET seconds (default 530).
set -u -o pipefail

OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET="${TX_GPU_CHECK_BUDGET:-530}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
declare -a ROWS=()
FAILED=0

log() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - SECONDS)); }
# cap SECONDS_WANTED: the step's limit, never past the overall budget (minimum 10 s).
cap() { local l; l=$(left); local c=$1; ((c > l)) && c=$l; ((c < 10)) && c=10; echo "$c"; }

# step NAME CAP_SECONDS CMD...: runs CMD under `timeout`, records status and time.
step() {
  local name=$1 limit; limit=$(cap "$2"); shift 2
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s) ===" | tee -a "$SUMMARY"
  # The steps are shell functions: run them in a child bash (exported below) under `timeout`.
  timeout --signal=TERM --kill-after=10 "$limit" bash -c '"$@"' _ "$@"
  rc=$?
  local status=ok
  if ((rc == 124 || rc == 137)); then status="TIMEOUT"; elif ((rc != 0)); then status="FAIL(rc=$rc)"; fi
  [[ $status != ok ]] && FAILED=1
  ROWS+=("$(printf '%-10s %-14s %5ss' "$name" "$status" $((SECONDS - t0)))")
  echo "=== $name: $status in $((SECONDS - t0))s ===" | tee -a "$SUMMARY"
  return $rc
}
# A skipped step is reported as SKIPPED, never as ok; it fails the run only through its cause
# (a failed build is already a failure).
skip() { ROWS+=("$(printf '%-10s %-14s %5s' "$1" "SKIPPED" "-")"); log "=== $1: skipped ($2) ==="; }

export OUT PY SUMMARY PYTHONUNBUFFERED

# ------------------------------------------------------------------------------------------------
log "tx_kernels gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
{ nvidia-smi || echo "nvidia-smi failed"; } 2>&1 | tee -a "$SUMMARY"
{ nvcc --version | tail -2 || echo "nvcc not found"; } 2>&1 | tee -a "$SUMMARY"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'sms', torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else None)" 2>&1 | tee -a "$SUMMARY"

# ------------------------------------------------------------------------------------------------
build() {
  TX_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1
  local rc=$?
  # ptxas register / spill lines of our kernels, for the record.
  grep -E "spill|Registers are spilled" "$OUT/build.log" | grep -v " 0 bytes spill stores" | head -20 | tee -a "$SUMMARY"
  tail -5 "$OUT/build.log"
  return $rc
}
export -f log build
if step build 300 build; then BUILT=1; else BUILT=0; fi
if ((BUILT)); then
  "$PY" -c "import tx_kernels, torch; print('has_cuda_kernels', tx_kernels.ops.has_cuda_kernels())" 2>&1 | tee -a "$SUMMARY"
fi

# ------------------------------------------------------------------------------------------------
run_tests() {
  local xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  local timeout_opt=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout 150)
  "$PY" -m pytest tests -q -ra -p no:cacheprovider "${xdist[@]}" "${timeout_opt[@]}" \
    --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/tests.log" | tail -40
}
export -f run_tests
if ((BUILT)); then step tests 240 run_tests; else skip tests "build failed"; fi
if [[ -f "$OUT/tests.log" ]]; then grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -25 >>"$SUMMARY"; fi

# ------------------------------------------------------------------------------------------------
sanitize() {  # TOOL OPS
  echo "--- compute-sanitizer --tool $1 (ops: $2) ---" >>"$OUT/sanitizer.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --error-exitcode 99 \
    "$PY" scripts/cuda_sanitizer_smoke.py --ops "$2" >>"$OUT/sanitizer.log" 2>&1
  local rc=$?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|FAILED|ok$" "$OUT/sanitizer.log" | tail -12
  return $rc
}
export -f sanitize
if ((BUILT)) && command -v compute-sanitizer >/dev/null; then
  step memcheck 90 sanitize memcheck layer_norm,bias_act,attention
elif ((BUILT)); then
  skip memcheck "compute-sanitizer not found"
else
  skip memcheck "build failed"
fi

# ------------------------------------------------------------------------------------------------
bench() {
  local raw="$OUT/bench_raw"
  mkdir -p "$raw"
  "$PY" -m benchmarks.run --device cuda --out "$raw" >"$OUT/bench.log" 2>&1
  local rc=$?
  tail -30 "$OUT/bench.log"
  # One CSV of every row produced (one header), then the raw folder as one archive.
  local first=1
  while IFS= read -r -d '' f; do
    if ((first)); then cat "$f"; first=0; else tail -n +2 "$f"; fi
  done < <(find "$raw" -name '*.csv' -print0 | sort -z) >"$OUT/bench.csv"
  [[ -s "$OUT/bench.csv" ]] || rm -f "$OUT/bench.csv"
  tar -czf "$OUT/bench_raw.tar.gz" -C "$OUT" bench_raw && rm -rf "$raw"
  return $rc
}
export -f bench
if ((BUILT)) && [[ -f benchmarks/run.py || -f benchmarks/run/__init__.py ]]; then
  step bench 240 bench
elif ((BUILT)); then
  skip bench "benchmarks/run.py not in this checkout"
else
  skip bench "build failed"
fi

# racecheck last: the slowest tool, and the benchmark rows matter more than its time budget.
if ((BUILT)) && command -v compute-sanitizer >/dev/null; then
  step racecheck 75 sanitize racecheck attention,layer_norm,bias_act
else
  skip racecheck "no build or no compute-sanitizer"
fi

# ------------------------------------------------------------------------------------------------
{
  echo
  echo "summary ($SECONDS s total)"
  printf '%-10s %-14s %6s\n' step status time
  for r in "${ROWS[@]}"; do echo "$r"; done
  if [[ -f "$OUT/bench.csv" ]]; then
    echo
    echo "benchmark rows (op, provider, mode, dtype, shape, median_ms, throughput, unit):"
    cut -d, -f1-6,9,10 "$OUT/bench.csv" | column -t -s, 2>/dev/null | head -60
  fi
} | tee -a "$SUMMARY"
ls -la "$OUT" >>"$SUMMARY"
exit $FAILED
