"""Proof that the emulated CUDA tests bite: plants one bug at a time in a copy of
csrc/cuda, rebuilds, reruns the harness and reports what caught it.

    python tests/cuda_emu/mutate.py [WORKDIR] [--only NAME ...]

Run it in the venv .ci/cuda_emu uses; it takes ~1-2 minutes per mutant on 2
cores (one unit recompiled, tests stop at the first failure). Exit status 1 if
any mutant survives. Not part of CI: the harness itself runs there.
"""

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# name: (file in csrc/cuda, text, replacement, sanitizer, what it plants)
MUTANTS = {
    "tail_off_by_one": (
        "tensor_batch.cuh", "batch.numel[j] - begin)", "batch.numel[j] - begin + 1)",
        "address", "a chunk's length one too long: the last chunk of a tensor reads one past it"),
    "block_sum_sync": (
        "block_reduce.cuh", "  if (lane == 0) warp_results[warp] = v;\n  __syncthreads();",
        "  if (lane == 0) warp_results[warp] = v;", "address",
        "block_sum without the barrier between writing and reading the warp results"),
    "combine_sync": (
        "penalty_cuda.cu", "    __syncthreads();  // makes this block's stats writes visible",
        "    // (barrier removed)", "thread",
        "combine_kernel without the barrier before the total reads the stats it wrote"),
    "alignment_check": (
        "penalty_cuda.cu", "  if (aligned16(x)) {\n    const int num_vecs",
        "  if (true) {\n    const int num_vecs", "address",
        "partial_sums_kernel uses 16-byte loads without checking the alignment"),
    "chunk_owner": (
        "tensor_batch.cuh", "if (b.chunk_prefix[mid] <= chunk) lo = mid;",
        "if (b.chunk_prefix[mid] < chunk) lo = mid;", "address",
        "the wrong owner for a chunk that starts a tensor"),
    "stats_row": (
        "penalty_cuda.cu",
        "stats[static_cast<int64_t>(batch.row[j]) * kStatsColumns + 1], l1, l2, l2_squared);",
        "stats[static_cast<int64_t>(j) * kStatsColumns + 1], l1, l2, l2_squared);", "address",
        "grad_kernel reads the stats row of its position in the batch, not its own row"),
    "accumulate_ignored": (
        "penalty_cuda.cu", "r.accumulate ? grad_kernel<T, true> : grad_kernel<T, false>",
        "grad_kernel<T, false>", "address",
        "the backend ignores the accumulate flag (writes instead of adding)"),
    "float_run_unchecked": (
        "penalty_cuda.cu", "if (run.trusted(4 * V)) {", "if (true) {", "address",
        "float32 runs used without the overflow/underflow/NaN check"),
    "exact_ignored": (
        "penalty_cuda.cu",
        "total_is_double ? partial_sums_kernel<T, true> : partial_sums_kernel<T, false>",
        "partial_sums_kernel<T, false>", "address",
        "float32 runs also where the result is float64 (float16 beside float64 tensors)"),
    "combine_row": (
        "penalty_cuda.cu",
        "stats[static_cast<int64_t>(batch.row[j]) * kStatsColumns + 0] = sums.a;",
        "stats[static_cast<int64_t>(j) * kStatsColumns + 0] = sums.a;", "address",
        "combine_kernel writes Σ|x| to the row of the position in its batch"),
    "group_position_rows": (
        "group_cuda.cu", "      for (int64_t o = s.first; o < s.end; ++o) {\n        const T* run",
        "      for (int64_t o = s.first; o + 1 < s.end; ++o) {\n        const T* run", "address",
        "group_partial_kernel skips the last period of each position block"),
    "group_run_slot": (
        "group_cuda.cu", "      if (lane == 0) out[run] = sums;",
        "      if (lane == 0) out[run - s.first] = sums;", "address",
        "a short run's sums land in the slot of its place in the item, not its own"),
    "group_combine_row": (
        "group_cuda.cu", "  const int64_t row = l.first_row + g;", "  const int64_t row = index;",
        "address", "group_combine_kernel writes a group to its row within the batch"),
    "group_piece_group": (
        "group_cuda.cu", "    const auto op = per_group(l, (s.begin / l.inner) % l.groups);",
        "    const auto op = per_group(l, (s.begin / l.inner));", "address",
        "a piece of a long run repeated over outer > 1 takes the coefficient of the wrong group"),
    "group_grad_weight": (
        "group_cuda.cu", "g_total, stats[(l.first_row + g) * kStatsColumns + 1], c1, c2 * l.weight,",
        "g_total, stats[(l.first_row + g) * kStatsColumns + 1], c1, c2,", "address",
        "the gradient ignores the group weight sqrt(group size)"),
    "metric_state_offset": (
        "metric_cuda.cu",
        "const T* __restrict__ v = static_cast<const T*>(batch.moments[span.tensor]) + span.begin;",
        "const T* __restrict__ v = static_cast<const T*>(batch.moments[span.tensor]);", "address",
        "the metric step reads every chunk's second moments from the tensor's first chunk"),
    "metric_row": (
        "metric_cuda.cu", "b.row[j] = static_cast<int32_t>(t);", "b.row[j] = j;", "address",
        "the metric step reads the coefficient row of the tensor's place in its batch"),
    "metric_float_range": (
        "metric_cuda.cu", "const bool use_float = kMayUseFloat && metric_fits_float(c);",
        "const bool use_float = kMayUseFloat;", "address",
        "the metric step's float32 path also for coefficients outside float32's safe range"),
    "metric_uncentered": (
        "metric_cuda.cu", "metric_denominator<kCentered>(", "metric_denominator<false>(",
        "address", "the metric step ignores centered RMSprop's means (sqrt(v), not sqrt(v - m^2))"),
    "group_metric_broadcast": (
        "group_metric_cuda.cu", "    __syncthreads();\n    const int state = shared_state;",
        "    const int state = shared_state;", "address",
        "the group metric step reads tau before thread 0 has broadcast it"),
    "group_metric_row": (
        "group_metric_cuda.cu", "l.weight,\n                                      static_cast<int32_t>(t)};",
        "l.weight,\n                                      static_cast<int32_t>(j)};", "address",
        "the group metric step reads the coefficient row of the tensor's place in its batch"),
    "group_metric_zero_test": (
        "group_metric_cuda.cu", "total.sum_sq_dx = squares.b;", "total.sum_sq_dx = squares.a;",
        "address",
        "the group metric step zeroes a group by ||x|| instead of ||d o x||"),
}

# A test file run first for a mutant, in its own pytest run (pytest collects a file
# given beside its folder in folder order); the whole harness runs after it if it
# passes, as for every mutant. A mutant of one kernel is then reported in minutes.
FIRST = {name: "test_emulated_metric.py" for name in MUTANTS if name.startswith("metric_")}
FIRST.update({name: "test_emulated_group_metric.py" for name in MUTANTS
              if name.startswith("group_metric_")})

PRELOAD = {
    "address": lambda: [_gcc_file("libasan.so"), _gcc_file("libstdc++.so")],
    "thread": lambda: [_gcc_file("libtsan.so")],
}
SANITIZER_ENV = {
    "address": {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=0",
                "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"},
    "thread": {"TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0"},
}
# Under ThreadSanitizer only the quick subset of .ci/cuda_emu runs.
TSAN_SELECTION = ["-k", "test_forward_sums_and_total and normal-False or few"]


def _gcc_file(name):
    return subprocess.run(["gcc", f"-print-file-name={name}"], check=True, capture_output=True,
                          text=True).stdout.strip()


def run_mutant(name, work):
    file, old, new, mode, _ = MUTANTS[name]
    src = work / f"{name}-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT / "csrc" / "cuda", src)
    text = (src / file).read_text()
    assert text.count(old) == 1, f"{name}: the text to replace occurs {text.count(old)} times"
    (src / file).write_text(text.replace(old, new))
    # Builds on a copy of the clean build, so only the mutated units are compiled.
    lib_dir = work / f"{name}-{mode}"
    if not lib_dir.exists():
        shutil.copytree(work / f"clean-{mode}", lib_dir)
    build = subprocess.run([sys.executable, str(HERE / "build.py"), str(lib_dir), "--sanitize",
                            mode, "--source-dir", str(src)], capture_output=True, text=True)
    if build.returncode != 0:
        return "build failed (does not compile)", build.stderr[-300:]
    junit = work / f"{name}.xml"
    env = dict(os.environ, LD_PRELOAD=" ".join(PRELOAD[mode]()),
               REGEXT_CUEMU_LIB=str(lib_dir / "regext_cuemu.so"), **SANITIZER_ENV[mode])
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "--capture=sys", "-p", "no:cacheprovider",
           "-p", "no:logging", f"--junitxml={junit}"]
    if mode == "thread":
        cmd += TSAN_SELECTION
    for target in ([HERE / FIRST[name]] if name in FIRST else []) + [HERE]:
        test = subprocess.run(cmd + [str(target)], cwd=work, env=env, capture_output=True,
                              text=True)
        if test.returncode != 0:
            break
    log = test.stdout + test.stderr
    if test.returncode == 0:
        return None, ""
    report = re.search(r"(SUMMARY: \w+Sanitizer: [^\n]+|runtime error: [^\n]+)", log)
    failed = ""
    try:
        for case in ET.parse(junit).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                message = (case.find("failure") if case.find("failure") is not None
                           else case.find("error")).get("message", "")
                failed = f"{case.get('name')}: {message.splitlines()[0][:160] if message else ''}"
                break
    except (OSError, ET.ParseError):
        pass
    caught = report.group(1) if report else ""
    if failed:
        caught = f"{caught} {failed}".strip()
    return caught or f"exit status {test.returncode}", log[-400:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", type=pathlib.Path,
                        default=pathlib.Path(tempfile.mkdtemp(prefix="regext-mutants.")))
    parser.add_argument("--only", nargs="*", choices=sorted(MUTANTS))
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = args.only or list(MUTANTS)
    for mode in sorted({MUTANTS[n][3] for n in names}):
        subprocess.run([sys.executable, str(HERE / "build.py"), str(work / f"clean-{mode}"),
                        "--sanitize", mode], check=True, stdout=subprocess.DEVNULL)
    survivors = 0
    for name in names:
        caught, tail = run_mutant(name, work)
        what = MUTANTS[name][4]
        if caught is None:
            survivors += 1
            print(f"SURVIVED {name}: {what}", flush=True)
        else:
            print(f"caught   {name} ({MUTANTS[name][3]}): {what}\n         by {caught}", flush=True)
    print(f"{len(names) - survivors} of {len(names)} mutants caught")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
