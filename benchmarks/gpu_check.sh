#!/usr/bin/env bash
# One command that checks hpseg on a GPU and measures every GPU figure of benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: $OUT, else ./gpu_check
#
# Runs, each step under its own time limit, and all of them within one deadline of 7 min 45 s
# (a step's limit is cut to what is left of it; a step that finds under 15 s left is skipped):
#   1. the CUDA-relevant tests (the draw on CUDA equals the CPU's, no host synchronisation in a
#      step or a pool pass, the fused path when it is there, killed/pre-empted runs resume
#      bit-exactly, two identical runs and two loss evaluations give identical bits, ...)   130 s
#   2. bench_loss.py at paper scale (hpseg dense, dense through torch.compile, fused; the
#      reference): loss forward + backward time; peak memory of dense, fused, reference     110 s
#   3. bench_train_step.py at paper scale (hpseg deterministic and not, fused, cached; the
#      per-image reference, interleaved in one process): images/s, speed-up; peak memory of
#      hpseg, hpseg-fused and the reference                                                 120 s
#   4. the top-20 kernels (device time) of one profiled training step, hpseg and fused      45 s
#   5. the synthetic preset trained in fp16 and in bf16 (30 s each), hpseg demo (40 s)
# (the limits add up to 8 min 25 s: when every step runs to its limit the deadline shortens
# the demo, the least informative step)
# and writes at most 8 files into OUT_DIR: 1_env_tests.log, 2_loss.log, 2_loss.json,
# 3_train_step.log, 3_train_step.json, 4_profile.log, 5_runs.log, summary.txt.
# The fused path (loss.path=fused) is measured where this checkout and machine have it; elsewhere
# the benchmarks print why it was skipped (HPSegError, no triton) and go on.
# Run from the repository root, with hpseg installed (pip install -e ".[dev]") or from a
# checkout (the script puts src/ on PYTHONPATH). HPSEG_CHECK_DEVICE=cpu runs the same steps on
# small CPU problems (bench_train_step --scale tiny), fewer tests and memory children, one
# synthetic run and the quick demo (to try the script itself; its figures are not GPU figures);
# HPSEG_CHECK_DEADLINE_S=N sets the deadline to N seconds (default 465).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${HPSEG_CHECK_DEVICE:-cuda}
DEADLINE=$((SECONDS + ${HPSEG_CHECK_DEADLINE_S:-465}))  # 7 min 45 s: each step's limit is cut to fit, plus its 10 s kill grace
FUSED_TESTS=$(ls tests/test_*fused*.py 2>/dev/null | tr '\n' ' ')
if [ "$DEVICE" = cuda ]; then
  SCALE=paper; STEP_SCALE=paper; REPEATS=5; WARMUP=2
  LOSS_IMPLS=dense,dense-compiled,fused,reference; LOSS_MEMORY=dense,fused,reference
  STEP_IMPLS=hpseg,hpseg-fused,hpseg-cached,hpseg-nondet,reference; STEP_MEMORY=hpseg,hpseg-fused,reference
  PRECISIONS="fp16 bf16"; DEMO_ARGS=""; DEMO_LIMIT=40
  SYN="data.synthetic_train_images=256 data.synthetic_val_images=32 train.epochs=1 train.progress=false"
  TESTS="tests/test_negatives.py tests/test_train.py tests/test_resume.py tests/test_hidden_positives.py
    tests/test_train_step_parity.py tests/test_train_loop_parity.py tests/test_loss_compile.py
    tests/test_reference_pools.py tests/test_gpu_repeat.py $FUSED_TESTS"
else  # trying the script on CPU: no compiled path (Inductor's C++ build alone takes a minute), smaller
  # problems, fewer memory children, one precision (fp16/bf16 apply to CUDA only), the quick demo
  SCALE=cpu; STEP_SCALE=tiny; REPEATS=1; WARMUP=0
  LOSS_IMPLS=dense,fused,sparse,reference; LOSS_MEMORY=dense
  STEP_IMPLS=hpseg,hpseg-fused,reference; STEP_MEMORY=hpseg
  PRECISIONS="fp32"; DEMO_ARGS="--quick"; DEMO_LIMIT=150  # the quick demo: ~45 s of CPU time
  SYN="data.synthetic_train_images=16 data.synthetic_val_images=4 train.epochs=1 train.progress=false"
  TESTS="tests/test_negatives.py tests/test_train_step_parity.py tests/test_loss_compile.py
    tests/test_reference_pools.py tests/test_gpu_repeat.py"
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

# step NAME LIMIT_S LOG CMD...: run CMD with a time limit (cut to the deadline), append its
# output to LOG, record the verdict and the time in the summary
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local left=$((DEADLINE - SECONDS - 10))
  if [ "$left" -lt 15 ]; then
    echo "== $name: SKIPPED (the 7 min 45 s deadline is reached)" >> "$log"
    printf '%-34s %-28s %5ss\n' "$name" "SKIPPED (deadline)" 0 >> "$SUMMARY"
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
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
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton not installed"
} > "$OUT_DIR/1_env_tests.log" 2>&1
head -4 "$OUT_DIR/1_env_tests.log" >> "$SUMMARY"

if "$PY" -c "import pytest" 2>/dev/null; then
  # -rfEsp: one line per test with its outcome (the summary quotes the bitwise-repeat ones)
  # shellcheck disable=SC2086
  step "tests (CUDA-relevant)" 130 "$OUT_DIR/1_env_tests.log" \
    "$PY" -m pytest -q -rfEsp -p no:cacheprovider $TESTS
else
  echo "pytest is not installed here: tests skipped (pip install pytest)" | tee -a "$SUMMARY" >> "$OUT_DIR/1_env_tests.log"
fi

step "bench_loss ($SCALE)" 110 "$OUT_DIR/2_loss.log" \
  "$PY" benchmarks/bench_loss.py --scale "$SCALE" --inputs clustered --device "$DEVICE" \
  --impls "$LOSS_IMPLS" --memory-impls "$LOSS_MEMORY" --repeats "$REPEATS" --warmup "$WARMUP" \
  --json "$OUT_DIR/2_loss.json"

step "bench_train_step ($STEP_SCALE)" 120 "$OUT_DIR/3_train_step.log" \
  "$PY" benchmarks/bench_train_step.py --scale "$STEP_SCALE" --device "$DEVICE" --impls "$STEP_IMPLS" \
  --memory-impls "$STEP_MEMORY" --repeats "$REPEATS" --warmup 1 --json "$OUT_DIR/3_train_step.json"

step "profile: top-20 kernels ($STEP_SCALE)" 45 "$OUT_DIR/4_profile.log" \
  "$PY" benchmarks/bench_train_step.py --scale "$STEP_SCALE" --device "$DEVICE" --repeats 0 --warmup "$WARMUP" \
  --profile hpseg,hpseg-fused --json "$WORK/profile.json"

for precision in $PRECISIONS; do
  # shellcheck disable=SC2086
  step "synthetic preset, $precision" 30 "$OUT_DIR/5_runs.log" \
    "$PY" -m hpseg train --preset synthetic $SYN "train.device=$DEVICE" "train.precision=$precision" \
    "train.out_dir=$WORK/synthetic-$precision"
done

# shellcheck disable=SC2086
step "hpseg demo" "$DEMO_LIMIT" "$OUT_DIR/5_runs.log" "$PY" -m hpseg demo $DEMO_ARGS --out "$WORK/demo" "train.device=$DEVICE"

# the figures, one line each, from the logs
{
  echo "--- figures"
  grep -E "^  (dense|dense-compiled|fused|sparse|reference) " "$OUT_DIR/2_loss.log" 2>/dev/null
  grep -E "^  (hpseg|hpseg-cached|hpseg-nondet|hpseg-fused|reference) |speed-up" "$OUT_DIR/3_train_step.log" 2>/dev/null
  grep -E "^  profile |^ +[1-5]\. " "$OUT_DIR/4_profile.log" 2>/dev/null
  grep -E "^(PASSED|FAILED|SKIPPED|ERROR).*test_gpu_repeat" "$OUT_DIR/1_env_tests.log" 2>/dev/null
  grep -E "passed|failed" "$OUT_DIR/1_env_tests.log" 2>/dev/null | tail -1
  grep -iE "mIoU|k-means" "$OUT_DIR/5_runs.log" 2>/dev/null | tail -4
  echo "total ${SECONDS}s"
} >> "$SUMMARY"
cat "$SUMMARY"
