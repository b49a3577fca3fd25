#!/usr/bin/env bash
# The prepared check for a session that is lent a GPU (H100/H200, torch 2.11+cu130,
# Python 3.12, nvcc 13.0, compute-sanitizer; no network, no pip). Run from the
# repository root; everything goes to $OUT (default ./gpu_check_out), with a short
# summary last. Budget: under 6 minutes on one H200 (each step has its own timeout).
#
#   bash benchmarks/gpu_check.sh
#
# 1. build in place for the visible GPU;
# 2. the CUDA tests (tests/test_cuda.py: every operator against its reference, a
#    >2**31-element tensor, CUDA graphs with tensor coefficients, launch counts) and
#    the CPU-vs-CUDA property tests;
# 3. compute-sanitizer memcheck, racecheck and synccheck on one small script that
#    runs every kernel (not on pytest: racecheck over the 65,537-block 2**31 case
#    would not finish, and a CUDA graph capture cannot run without the caching
#    allocator that memcheck needs switched off to see past-the-end reads);
# 4. the CUDA benchmark (--quick) and its table.
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
: > "$OUT/summary.txt"
status() { printf '%-32s %s\n' "$1" "$2" >> "$OUT/summary.txt"; }
start=$SECONDS

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
status "device" "$(tail -n 1 "$OUT/env.txt")"

export MAX_JOBS=${MAX_JOBS:-16}
if timeout 240 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  status "build" "ok ($((SECONDS - start)) s)"
else
  status "build" "FAILED (build.log)"; cat "$OUT/summary.txt"; exit 1
fi

timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  -k "not beyond_2_pow_31" > "$OUT/tests.log" 2>&1
status "tests/test_cuda.py" "$(tail -n 1 "$OUT/tests.log")"
REGEXT_LARGE_TESTS=1 timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  -k "beyond_2_pow_31" > "$OUT/tests_large.log" 2>&1
status "2**31-element tensor" "$(tail -n 1 "$OUT/tests_large.log")"
REGEXT_HYPOTHESIS_PROFILE=sanitize timeout 90 $PY -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_properties.py tests/test_boundaries.py tests/test_overflow.py \
  > "$OUT/tests_properties.log" 2>&1
status "properties/boundaries (cuda)" "$(tail -n 1 "$OUT/tests_properties.log")"

cat > "$OUT/every_kernel.py" <<'PYEOF'
# Every CUDA kernel once, on sizes around the vector and chunk edges, misaligned
# views, all dtypes, two batches (1001 tensors) and mixed dtypes.
import torch, regext
g = torch.Generator().manual_seed(0)
c = lambda v: torch.scalar_tensor(v, dtype=torch.float64)
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    ps = [torch.randn(int(n) + 1, generator=g).to("cuda", dtype)[1:]
          for n in (0, 1, 7, 8, 9, 32767, 32768, 32769, 70001)]
    ps = [p.requires_grad_() for p in ps]
    for sq in (False, True):
        regext.fused_penalty(ps, 0.1, 0.2, l2_squared=sq).backward()
        regext.add_penalty_grad_(ps, torch.tensor(0.1, device="cuda"), 0.2, l2_squared=sq)
    with torch.no_grad():
        regext.prox_l1_([p.detach() for p in ps], 0.01)
        regext.prox_group_l2_([p.detach() for p in ps], 0.01)
    regext.sparsity(ps)
    # The proximal step in an optimizer's metric (metric_cuda.cu): Adam's second
    # moments, centered RMSprop's (two state tensors), a capturable Adam's device steps.
    for make in (lambda q: torch.optim.AdamW(q, lr=1e-3),
                 lambda q: torch.optim.RMSprop(q, lr=1e-3, centered=True),
                 lambda q: torch.optim.Adam(q, lr=1e-3, capturable=True)):
        opt = make(ps)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        regext.prox_l1_(ps, 1e-4, metric=opt)
        regext.prox_l2_squared_(ps, 1e-4, metric=opt)
        # The group lasso in the metric (group_metric_cuda.cu): rows and columns.
        ws2 = [torch.randn(s, generator=g).to("cuda", dtype) for s in ((40, 300), (300, 40))]
        vs2 = [torch.rand_like(w) for w in ws2]
        cf2 = torch.tensor([[0.5, 0.0, 1.0, 1e-8]] * 2, dtype=torch.float64, device="cuda")
        torch.ops.regext.prox_group_metric_(ws2, vs2, [], [0, 1], cf2, True)
        for p in ps:
            p.grad = None
    # The group lasso: long rows (pieces), short rows, strided columns (positions).
    ws = [torch.randn(s, generator=g).to("cuda", dtype).requires_grad_()
          for s in ((2, 33000), (50, 300), (300, 40), (16, 8, 3, 3))]
    for group in ("row", "column"):
        regext.fused_penalty(ws, 0.1, 0.2, group=group, group_weight="sqrt_size").backward()
        regext.add_penalty_grad_(ws, 0.1, 0.2, group=group)
        with torch.no_grad():
            regext.prox_group_l2_([w.detach() for w in ws], 0.05, group=group)
    regext.sparsity_report(ws)
many = [torch.randn(5, generator=g).cuda().requires_grad_() for _ in range(1001)]
mixed = many[:10] + [torch.randn(9, generator=g).cuda().half().requires_grad_()]
for ps in (many, mixed):
    regext.fused_penalty(ps, 0.1, 0.2).backward()
    regext.fused_penalty(ps[:300], 0.1, 0.2, group="row").backward()  # two group batches
torch.cuda.synchronize()
print("every kernel ran")
PYEOF
for tool in memcheck racecheck synccheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 compute-sanitizer --tool "$tool" \
    --error-exitcode 9 $PY "$OUT/every_kernel.py" > "$OUT/sanitizer_$tool.log" 2>&1
  status "compute-sanitizer $tool" "rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer_$tool.log" | tail -n 1)"
done

timeout 120 $PY benchmarks/bench_penalty.py --device cuda --quick --out "$OUT/bench" \
  > "$OUT/bench.log" 2>&1
status "benchmark (--quick)" "rc=$? (bench.log, bench/results.json)"
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_metric_prox.py -k cuda \
  > "$OUT/tests_metric.log" 2>&1
status "metric prox, L1 and group (cuda)" "$(tail -n 1 "$OUT/tests_metric.log")"
status "total" "$((SECONDS - start)) s"

echo "==== benchmark table (tail) ===="
tail -n 30 "$OUT/bench.log"
echo "==== summary ===="
cat "$OUT/summary.txt"
