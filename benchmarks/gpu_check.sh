#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (torch 2.11+cu130, Python 3.12,
# nvcc 13.0, compute-sanitizer; no network). Runs in the repository root:
#   build in place -> CUDA tests -> compute-sanitizer memcheck + racecheck on a
#   small case -> robustness tests on CUDA -> compute-sanitizer memcheck +
#   racecheck on the CUDA tests -> CUDA benchmark -> short table last. Full
#   logs go to $OUT.
# Usage (device tool): bash benchmarks/gpu_check.sh      (~8-12 minutes)
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status() { printf '%-28s %s\n' "$1" "$2" >> "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
status "device" "$(tail -n 1 "$OUT/env.txt")"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-8}
if $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then status "build" "ok"; else status "build" "FAILED (build.log)"; cat "$OUT/summary.txt"; exit 1; fi

timeout 240 $PY -m pytest -q -p no:logging tests/test_cuda.py tests/test_fused_penalty_models.py \
  tests/test_edge_cases.py tests/test_gradcheck.py tests/test_opcheck.py tests/test_compile.py \
  > "$OUT/tests.log" 2>&1
status "tests (cuda+cpu)" "$(tail -n 1 "$OUT/tests.log")"

cat > "$OUT/sanitize_case.py" <<'PYEOF'
import torch, regext
g = torch.Generator().manual_seed(0)
ps = [torch.randn(int(n), generator=g).cuda().requires_grad_() for n in [0, 1, 7, 33, 40000, 70001]]
ps.append(torch.randn(50, 30, generator=g).cuda().t().requires_grad_())
ps.append(torch.randn(1000, generator=g).cuda().half().requires_grad_())
for sq in (False, True):
    regext.fused_penalty(ps, 0.1, 0.2, l2_squared=sq).backward()
torch.cuda.synchronize()
print("sanitize case ok")
PYEOF
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 9 $PY "$OUT/sanitize_case.py" \
    > "$OUT/sanitizer_$tool.log" 2>&1
  status "compute-sanitizer $tool" "rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer_$tool.log" | tail -n 1)"
done

# Robustness tests on the GPU (issue #6): property tests against float64, range
# (overflow/underflow), every size around the chunk boundaries, memory, threads.
timeout 240 $PY -m pytest -q -p no:logging -k cuda tests/test_properties.py \
  tests/test_overflow.py tests/test_boundaries.py tests/test_memory.py tests/test_threads.py \
  > "$OUT/tests_robust.log" 2>&1
status "tests (robustness, cuda)" "$(tail -n 1 "$OUT/tests_robust.log")"

# compute-sanitizer on the CUDA tests themselves. Without the caching allocator
# every tensor is its own cudaMalloc, so a read past a tensor's end is past an
# allocation's end, which memcheck reports (inside a cached block it cannot).
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 REGEXT_HYPOTHESIS_PROFILE=sanitize timeout 180 \
    compute-sanitizer --tool "$tool" --error-exitcode 9 $PY -m pytest -q -p no:logging -x \
    -k cuda tests/test_boundaries.py tests/test_cuda.py tests/test_properties.py \
    > "$OUT/sanitizer_tests_$tool.log" 2>&1
  status "compute-sanitizer $tool tests" "rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer_tests_$tool.log" | tail -n 1)"
done

timeout 150 $PY benchmarks/bench_penalty.py --device cuda --out "$OUT/bench" > "$OUT/bench.log" 2>&1
status "benchmark" "rc=$? (bench.log, bench/results.json)"

echo "==== benchmark table (tail) ===="
tail -n 40 "$OUT/bench.log"
echo "==== summary ===="
cat "$OUT/summary.txt"
