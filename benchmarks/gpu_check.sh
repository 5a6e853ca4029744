#!/usr/bin/env bash
# One command that checks hpseg on a GPU and measures every GPU figure of benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: $OUT, else ./gpu_check
#
# Runs, each step under its own time limit (8 minutes at the very most; less in practice):
#   1. the CUDA-relevant tests (the draw on CUDA equals the CPU's, no host synchronisation in a
#      step, dense and sparse paths train alike, killed/pre-empted runs resume bit-exactly, ...);
#   2. bench_loss.py at paper scale (hpseg dense, dense through torch.compile, sparse; the reference);
#   3. bench_train_step.py at paper scale (hpseg deterministic and not, cached, reference);
#   4. the synthetic preset trained in fp16 and in bf16;
#   5. hpseg demo;
# and writes at most 8 files into OUT_DIR: 1_env_tests.log, 2_loss.log, 2_loss.json,
# 3_train_step.log, 3_train_step.json, 4_synthetic.log, 5_demo.log, summary.txt.
# Run from the repository root, with hpseg installed (pip install -e ".[dev]") or from a
# checkout (the script puts src/ on PYTHONPATH). HPSEG_CHECK_DEVICE=cpu runs the same steps on a
# small CPU problem (to try the script itself; its figures are not GPU figures).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${HPSEG_CHECK_DEVICE:-cuda}
# on CPU (trying the script) without the compiled path: Inductor's C++ build alone takes a minute there
if [ "$DEVICE" = cuda ]; then SCALE=paper; REPEATS=5; LOSS_IMPLS=dense,dense-compiled,sparse,reference
else SCALE=cpu; REPEATS=1; LOSS_IMPLS=dense,sparse,reference; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

# step NAME LIMIT_S LOG CMD...: run CMD with a time limit, append its output to LOG, record rc and time
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  echo "== $name: $* (limit ${limit}s)" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  local verdict=ok
  [ $rc -eq 0 ] || verdict="FAILED (rc=$rc$([ $rc -eq 124 ] && echo ', time limit'))"
  echo "== $name: $verdict in ${took}s" >> "$log"
  printf '%-34s %-28s %5ss\n' "$name" "$verdict" "$took" >> "$SUMMARY"
}

{
  echo "gpu_check on $(hostname) at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
} > "$OUT_DIR/1_env_tests.log" 2>&1
head -3 "$OUT_DIR/1_env_tests.log" >> "$SUMMARY"

if "$PY" -c "import pytest" 2>/dev/null; then
  step "tests (CUDA-relevant)" 120 "$OUT_DIR/1_env_tests.log" \
    "$PY" -m pytest -p no:cacheprovider tests/test_negatives.py tests/test_train.py tests/test_resume.py \
    tests/test_hidden_positives.py tests/test_train_step_parity.py tests/test_train_loop_parity.py
else
  echo "pytest is not installed here: tests skipped (pip install pytest)" | tee -a "$SUMMARY" >> "$OUT_DIR/1_env_tests.log"
fi

step "bench_loss ($SCALE)" 120 "$OUT_DIR/2_loss.log" \
  "$PY" benchmarks/bench_loss.py --scale "$SCALE" --inputs clustered --device "$DEVICE" \
  --impls "$LOSS_IMPLS" --repeats "$REPEATS" --warmup 2 --json "$OUT_DIR/2_loss.json"

step "bench_train_step ($SCALE)" 120 "$OUT_DIR/3_train_step.log" \
  "$PY" benchmarks/bench_train_step.py --scale "$SCALE" --device "$DEVICE" --repeats "$REPEATS" --warmup 1 \
  --json "$OUT_DIR/3_train_step.json"

SYN="data.synthetic_train_images=256 data.synthetic_val_images=32 train.epochs=1 train.progress=false"
for precision in fp16 bf16; do
  step "synthetic preset, $precision" 40 "$OUT_DIR/4_synthetic.log" \
    "$PY" -m hpseg train --preset synthetic $SYN "train.device=$DEVICE" "train.precision=$precision" \
    "train.out_dir=$WORK/synthetic-$precision"
done

step "hpseg demo" 60 "$OUT_DIR/5_demo.log" "$PY" -m hpseg demo --out "$WORK/demo" "train.device=$DEVICE"

# the figures, one line each, from the logs
{
  echo "--- figures"
  grep -E "^  (dense|dense-compiled|sparse|reference) " "$OUT_DIR/2_loss.log" 2>/dev/null
  grep -E "^  (hpseg|hpseg-cached|hpseg-nondet|reference) |speed-up" "$OUT_DIR/3_train_step.log" 2>/dev/null
  grep -E "passed|failed" "$OUT_DIR/1_env_tests.log" 2>/dev/null | tail -1
  grep -iE "mIoU|k-means" "$OUT_DIR/5_demo.log" 2>/dev/null | tail -4
} >> "$SUMMARY"
cat "$SUMMARY"
