#!/usr/bin/env python
"""Benchmark regext.fused_penalty against the per-parameter loop, torch._foreach_norm
and torch.compile, on real models' parameter shapes.

    python benchmarks/bench_penalty.py [--device cpu|cuda] [--sets NAMES] [--quick] [--out DIR]

Variants (each is checked against the loop's value, and in forward+backward against
the loop's gradients, before it is timed; one that fails is not timed):
  loop            regext.reference.penalty_loop, the per-parameter loop (torch.norm per tensor)
  foreach         regext.reference.penalty_foreach (two torch._foreach_norm calls)
  compiled        torch.compile(penalty_loop), inductor; compile time reported apart
  regext          regext.fused_penalty
  regext_inplace  regext.add_penalty_grad_ (forward+backward only)
  foreach_norm2   one torch._foreach_norm(params, 2) pass (forward only): not the
                  penalty, the cost of reading every tensor once with torch's own
                  fused reduction; the yardstick of regext's forward (which yields
                  both norms from its one read). Timed, not checked.

Phases, identical for every variant:
  forward           the call with grad mode on and parameters requiring grad, so the
                    autograd graph is built as in training; it is freed untimed.
  forward+backward  the call and .backward(). Every .grad is reset to None before
                    each call, outside the timed region (zero_grad(set_to_none=True)),
                    so each variant allocates its gradients and AccumulateGrad costs
                    the same. regext_inplace is one call that adds into existing
                    .grad tensors instead (as after the model's own backward).

Each sample times one call; variants run interleaved, round after round, after a
warm-up, and the median is reported. Inputs rotate among copies of a set so that
consecutive uses of one copy are two last-level caches apart. Bytes the op must move:
forward = parameter bytes (read once); forward+backward = 3x (read, read again, write
the gradient); regext_inplace = 4x (it also reads the existing gradient). GB/s is that
over the median time; the ceiling is a large dst.copy_(src) in the same run.
"""

import argparse
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch

import regext
from regext.reference import penalty_float64, penalty_foreach, penalty_loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ run as a script
import bandwidth  # noqa: E402
import param_sets  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402
from report import PHASES  # noqa: E402

L1, L2 = 1e-5, 1e-4
DTYPE = torch.float32
# A variant passes when its value is within this relative distance of the loop's,
# or within 3x the loop's own distance from the float64 truth when that is larger
# (torch's CPU float32 norm drifts by up to ~1e-2 on tens of millions of elements).
VALUE_RTOL = 1e-4
# Max over tensors of ||g - g_loop|| / ||g_loop||.
GRAD_RTOL = 1e-4

@dataclass(frozen=True)
class Budget:
    """How long to time one set and phase: seconds of rounds, within these bounds."""
    seconds: float
    min_rounds: int
    max_rounds: int


CONFIGS = {
    # full run: all sets, ~6 s of interleaved rounds per set and phase
    "full": dict(
        sets=list(param_sets.PARAM_SETS), with_compiled=True, warmup_rounds=1,
        budget=Budget(6.0, 7, 60), max_copies=32,
        sweep_counts=[10, 30, 100, 300, 1000, 3000, 10000], sweep_count_total=1 << 22,
        sweep_sizes=[1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24], sweep_size_count=100,
        sweep_budget=Budget(2.0, 5, 30), ceiling_repeats=15,
        bandwidth_sizes=bandwidth.SIZES, bandwidth_rounds=7),
    # --quick: two sets, no torch.compile (its compile alone takes 30 s to minutes
    # per set on 2 cores), few rounds, a short sweep
    "quick": dict(
        sets=["resnet18", "small500"], with_compiled=False, warmup_rounds=1,
        budget=Budget(0.5, 3, 10), max_copies=4,
        sweep_counts=[10, 100, 1000], sweep_count_total=1 << 18,
        sweep_sizes=[1 << 14, 1 << 17, 1 << 20], sweep_size_count=100,
        sweep_budget=Budget(0.3, 3, 10), ceiling_repeats=5,
        bandwidth_sizes=bandwidth.QUICK_SIZES, bandwidth_rounds=3),
}
CUDA_OVERRIDES = dict(sweep_count_total=1 << 24, sweep_sizes=[1 << 16, 1 << 18, 1 << 20,
                                                              1 << 22, 1 << 24, 1 << 26,
                                                              1 << 28])
CEILING_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}


# --------------------------------------------------------------------------- variants


class Variant:
    """One way of computing the penalty.

    forward(ps) returns the penalty with its autograd graph (None: no forward
    phase). step(ps) is the forward+backward phase: afterwards each p.grad holds
    the penalty gradient (added to the existing one when `inplace`).
    """

    def __init__(self, name, forward=None, step=None, inplace=False, reference_pass=False):
        self.name, self.forward, self.inplace = name, forward, inplace
        self.step = step or (lambda ps: _backward(forward(ps)))
        self.compile_info = None
        # A forward-only yardstick that computes something other than the penalty.
        self.reference_pass = reference_pass

    def phases(self):
        if self.reference_pass:
            return ["forward"]
        return [ph for ph in PHASES if ph != "forward" or self.forward is not None]


def _backward(value):
    value.backward()
    return value


def make_variants(device, with_compiled, log):
    """The variants that can run here; logs those that are skipped and why."""
    variants = [Variant("loop", lambda ps: penalty_loop(ps, L1, L2)),
                Variant("foreach", lambda ps: penalty_foreach(ps, L1, L2))]
    if with_compiled:
        variants.append(make_compiled())
    if device.type == "cuda" and not regext.cuda_available():
        log("regext, regext_inplace: skipped, this regext build has no CUDA kernels")
        return variants
    variants.append(Variant("regext", lambda ps: regext.fused_penalty(ps, L1, L2)))
    variants.append(Variant("regext_inplace", step=lambda ps: regext.add_penalty_grad_(
        ps, L1, L2), inplace=True))
    variants.append(Variant("foreach_norm2", forward=lambda ps: torch._foreach_norm(ps, 2),
                            reference_pass=True))
    return variants


def make_compiled():
    """torch.compile(penalty_loop) with inductor; fresh per parameter set. Its first
    call in each phase compiles (the backward graph at the first backward); those
    times go to compile_info, not into the timings."""
    torch._dynamo.reset()
    compiled = torch.compile(penalty_loop)
    variant = Variant("compiled", lambda ps: compiled(ps, L1, L2))
    variant.compile_info = {}
    return variant


def _compile_counters():
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {"fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
            "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"]}


# --------------------------------------------------------------------------- checks


def reference(params):
    """The loop's value and gradients, and the float64 truth."""
    value = penalty_loop(params, L1, L2)
    grads = torch.autograd.grad(value, params)
    with torch.no_grad():
        truth = penalty_float64([p.detach() for p in params], L1, L2).item()
    value = value.item()
    loop_err = abs(value - truth) / abs(truth)
    return {"value": value, "grads": grads, "truth": truth, "loop_err": loop_err,
            "value_tol": max(VALUE_RTOL, 3 * loop_err)}


def _value_check(value, ref):
    value = value.detach().item()
    rel = abs(value - ref["value"]) / abs(ref["value"])
    return {"value": value, "rel_diff_vs_loop": rel,
            "rel_err_vs_float64": abs(value - ref["truth"]) / abs(ref["truth"]),
            "value_tol": ref["value_tol"],
            "value_ok": math.isfinite(value) and rel <= ref["value_tol"]}


def check_variant(variant, phase, params, ref, clock):
    """Runs `variant` once in `phase` on `params` and compares with the loop.

    Returns the check's fields, check_passed among them. For `compiled`, this first
    call of the phase compiles: its time is recorded in variant.compile_info.
    """
    if variant.reference_pass:  # not the penalty: run it once (warm-up), check nothing
        with torch.no_grad():
            clock.time_ms(lambda: variant.forward(params))
        return {"check_passed": True, "reference_pass": True}
    info = variant.compile_info
    if info is not None and not info:
        info["_counters"] = _compile_counters()
    for p in params:
        p.grad = torch.zeros_like(p) if variant.inplace else None
    run = variant.forward if phase == "forward" else variant.step
    ms, value = clock.time_ms(lambda: run(params))
    if info is not None:
        info.setdefault(f"first_{phase}_ms", ms)
    out = _value_check(value, ref)
    ok = out.pop("value_ok")
    if phase == "forward+backward":
        rels, missing = [], 0
        for p, g_ref in zip(params, ref["grads"]):
            if p.grad is None:
                missing += 1
                continue
            rels.append(torch.linalg.vector_norm(p.grad - g_ref)
                        / torch.linalg.vector_norm(g_ref).clamp_min(1e-30))
            p.grad = None
        grad_rel = torch.stack(rels).max().item() if rels else float("nan")
        out.update(grad_max_rel_diff=grad_rel, grad_tol=GRAD_RTOL, grads_missing=missing)
        ok = ok and missing == 0 and math.isfinite(grad_rel) and grad_rel <= GRAD_RTOL
    out["check_passed"] = ok
    return out


def compile_summary(info):
    """compile_ms (first forward call + first forward+backward call) and the
    inductor / AOTAutograd cache hits and misses those calls had."""
    before = info.get("_counters", {})
    after = _compile_counters()
    ms = info.get("first_forward_ms", 0.0) + info.get("first_forward+backward_ms", 0.0)
    return {"compile_ms": ms,
            "first_forward_ms": info.get("first_forward_ms"),
            "first_forward+backward_ms": info.get("first_forward+backward_ms"),
            "cache": {k: after[k] - before.get(k, 0) for k in after}}


# --------------------------------------------------------------------------- one set


def bytes_moved(param_bytes, phase, variant):
    if phase == "forward":
        return param_bytes
    return (4 if variant.inplace else 3) * param_bytes


def _task(variant, phase, rotation, grad_store):
    """(prepare, run, finish) for timing.interleaved."""
    def prepare():
        index, ps = rotation.next()
        if variant.inplace:  # existing gradients, allocated once per copy (untimed)
            store = grad_store.setdefault(index, [torch.zeros_like(p) for p in ps])
            for p, g in zip(ps, store):
                p.grad = g
        else:
            for p in ps:
                p.grad = None
        return ps

    def finish(ps):
        for p in ps:
            p.grad = None

    run = variant.forward if phase == "forward" else variant.step
    return prepare, run, finish


def run_set(name, shapes, variants, device, cfg, clock, cache_bytes, progress, budget):
    """Checks then times every variant in both phases on one parameter set.

    Returns (rows, failures); rows lack the ceiling-dependent fields.
    """
    params = param_sets.make_params(shapes, device, DTYPE)
    numel = param_sets.numel(shapes)
    param_bytes = numel * params[0].element_size()
    failures, checks = [], {}

    progress.start(f"{name}: checking against the loop")
    ref = reference(params)
    for variant in variants:
        for phase in variant.phases():
            try:
                result = check_variant(variant, phase, params, ref, clock)
            except Exception as exc:  # record it and go on with the other variants
                kind = "compile" if variant.name == "compiled" else "error"
                failures.append({"set": name, "variant": variant.name, "phase": phase,
                                 "kind": kind, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=4)})
                progress.write(f"{name}/{variant.name}/{phase}: {kind} failure: "
                               f"{type(exc).__name__}: {str(exc)[:300]}")
                for p in params:
                    p.grad = None
                if variant.name == "compiled":
                    break  # its other phase would fail (or recompile) the same way
                continue
            if result["check_passed"]:
                checks[(variant.name, phase)] = result
            else:
                failures.append({"set": name, "variant": variant.name, "phase": phase,
                                 "kind": "check", **result})
                progress.write(f"{name}/{variant.name}/{phase}: check FAILED, not timed: "
                               f"{result}")
    del ref
    progress.advance()

    n_copies = timing.rotation_copies(param_bytes, cache_bytes, cfg["max_copies"])
    rotation = timing.Rotation(list(enumerate(
        [params] + [param_sets.clone_params(params) for _ in range(n_copies - 1)])))
    grad_store = {}
    rows = []
    for phase in PHASES:
        progress.start(f"{name}: {phase}")
        timed = [v for v in variants if (v.name, phase) in checks]
        tasks = {v.name: _task(v, phase, rotation, grad_store) for v in timed}
        if tasks:
            warm = timing.interleaved(tasks, cfg["warmup_rounds"], clock)
            per_round = sum(min(s) for s in warm.values())
            rounds = timing.rounds_for(per_round, budget.seconds, budget.min_rounds,
                                       budget.max_rounds)
            samples = timing.interleaved(tasks, rounds, clock)
        for v in timed:
            stats = timing.summarize(samples[v.name])
            nbytes = bytes_moved(param_bytes, phase, v)
            row = {"set": name, "variant": v.name, "phase": phase, "device": device.type,
                   **stats, "n_tensors": len(shapes), "numel": numel, "bytes": nbytes,
                   "gbps": nbytes / (stats["median_ms"] * 1e-3) / 1e9,
                   "rotation_copies": n_copies, **checks[(v.name, phase)]}
            if v.compile_info:
                row["compile_info"] = compile_summary(v.compile_info)
                row["compile_ms"] = row["compile_info"]["compile_ms"]
            rows.append(row)
        _add_speedups(rows, name, phase)
        progress.advance()
    for p in params:
        p.grad = None
    return rows, failures


def _add_speedups(rows, set_name, phase):
    here = {r["variant"]: r for r in rows if r["set"] == set_name and r["phase"] == phase}
    for row in here.values():
        for base in ("loop", "foreach", "compiled"):
            other = here.get(base)
            row[f"speedup_vs_{base}"] = (other["median_ms"] / row["median_ms"]
                                         if other else None)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sets", default=None,
                        help="comma-separated parameter sets (default: all; --quick: "
                             f"resnet18,small500); choices: {','.join(param_sets.PARAM_SETS)}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sets and rounds, no torch.compile: under a minute")
    parser.add_argument("--out", default="bench_out", help="output folder (default bench_out)")
    parser.add_argument("--bandwidth-only", action="store_true",
                        help="only the per-thread bandwidth table (CPU; compare "
                             "REGEXT_CPU_CAPABILITY variants quickly)")
    args = parser.parse_args(argv)
    if args.sets is not None:
        names = [s.strip() for s in args.sets.split(",") if s.strip()]
        unknown = [s for s in names if s not in param_sets.PARAM_SETS]
        if unknown or not names:
            parser.error(f"unknown set(s) {unknown}; choose from "
                         f"{','.join(param_sets.PARAM_SETS)}")
        args.sets = names
    return args


def run_sets(set_names, device, cfg, clock, cache_bytes, progress, log):
    """Every named parameter set: (rows, failures, compile ms per set)."""
    rows, failures, compile_ms = [], [], {}
    for name in set_names:
        variants = make_variants(device, cfg["with_compiled"], log)
        shapes = param_sets.PARAM_SETS[name][0]()
        set_rows, set_failures = run_set(name, shapes, variants, device, cfg, clock,
                                         cache_bytes, progress, cfg["budget"])
        rows += set_rows
        failures += set_failures
        for v in variants:
            if v.compile_info:
                compile_ms[name] = round(compile_summary(v.compile_info)["compile_ms"], 1)
        torch._dynamo.reset()
    return rows, failures, compile_ms


def sweep_points(cfg):
    return ([("count", n, cfg["sweep_count_total"]) for n in cfg["sweep_counts"]]
            + [("size", cfg["sweep_size_count"], t) for t in cfg["sweep_sizes"]])


def run_sweeps(device, cfg, clock, cache_bytes, progress, log):
    """Time against the number of tensors and against the total size: (rows, failures)."""
    rows, failures = [], []
    for sweep, count, total in sweep_points(cfg):
        label = f"{sweep}:{count}x{total // count}"
        variants = make_variants(device, False, log)
        sweep_rows, sweep_failures = run_set(
            label, param_sets.split_shapes(total, count), variants, device, cfg, clock,
            cache_bytes, progress, cfg["sweep_budget"])
        for row in sweep_rows:
            row["sweep"] = sweep
        rows += sweep_rows
        failures += sweep_failures
    return rows, failures


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_penalty: --device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)
    cfg_name = "quick" if args.quick else "full"
    cfg = dict(CONFIGS[cfg_name])
    if device.type == "cuda":
        cfg.update(CUDA_OVERRIDES)
    set_names = [] if args.bandwidth_only else args.sets or cfg["sets"]
    if args.bandwidth_only:
        cfg.update(sweep_counts=[], sweep_sizes=[])
    os.makedirs(args.out, exist_ok=True)
    clock = timing.Clock(device)
    env = report.environment(
        device, cfg_name, __file__, dtype=str(DTYPE).replace("torch.", ""), l1=L1, l2=L2,
        l2_squared=False,
        phases={"forward": "call with grad mode on, params requiring grad (graph built, "
                           "freed untimed)",
                "forward+backward": "call + .backward(), every .grad set to None before "
                                    "(untimed); regext_inplace: one add_penalty_grad_ call "
                                    "into existing .grad"},
        bytes_model="forward: param bytes; forward+backward: 3x param bytes; "
                    "regext_inplace: 4x (also reads the existing grad)")
    cache_bytes = timing.last_level_cache_bytes(device)
    env["last_level_cache_bytes"] = cache_bytes
    progress = report.Progress(total=3 + 3 * (len(set_names) + len(sweep_points(cfg))))
    messages = []

    def log(msg):  # each message once
        if msg not in messages:
            messages.append(msg)
            progress.write(msg)

    progress.start("bandwidth ceiling (large copy)")
    ceiling_start = timing.measure_ceiling(device, CEILING_BYTES[device.type],
                                           cfg["ceiling_repeats"], clock)
    progress.advance()
    if not cfg["with_compiled"]:
        log("compiled: skipped in --quick (torch.compile takes 30 s to minutes per set "
            "on a 2-core CPU); run without --quick to include it")
    rows, failures, compile_ms = run_sets(set_names, device, cfg, clock, cache_bytes, progress,
                                          log)
    scaling, sweep_failures = run_sweeps(device, cfg, clock, cache_bytes, progress, log)
    failures += sweep_failures
    bandwidth_rows = []
    if device.type == "cpu":
        progress.start("per-thread bandwidth")
        bandwidth_rows = bandwidth.measure(cfg["bandwidth_sizes"], cfg["bandwidth_rounds"], clock)
    progress.advance()
    progress.start("bandwidth ceiling again")
    ceiling_end = timing.measure_ceiling(device, CEILING_BYTES[device.type],
                                         cfg["ceiling_repeats"], clock)
    progress.advance()
    progress.close()

    # The ceiling is the better of the two measurements (the machine may be shared).
    ceiling = max(ceiling_start, ceiling_end, key=lambda c: c["gbps"])
    for row in rows + scaling:
        row["pct_of_ceiling"] = 100.0 * row["gbps"] / ceiling["gbps"]
    env.update(ceiling_gbps=ceiling["gbps"], ceiling={"start": ceiling_start,
                                                      "end": ceiling_end},
               compile_ms=compile_ms, loadavg_end=timing.load_average(),
               wall_s=round(time.perf_counter() - started, 1), messages=messages,
               sweep_compiled="not swept: torch.compile recompiles for every shape")
    payload = {"env": env, "results": rows, "scaling": scaling, "bandwidth": bandwidth_rows,
               "failures": failures}
    report.write_json(args.out, payload)
    report.write_all(args.out, payload)
    return 1 if any(f["kind"] == "check" for f in failures) else 0


if __name__ == "__main__":
    sys.exit(main())
