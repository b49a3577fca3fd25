#!/usr/bin/env python
"""Benchmark regext.fused_penalty against the per-parameter loop, torch._foreach_norm
and torch.compile, on real models' parameter shapes.

    python benchmarks/bench_penalty.py [--device cpu|cuda] [--sets NAMES] [--quick] [--out DIR]

Variants (each is checked against the loop's value, and in forward+backward against
the loop's gradients, before it is timed; one that fails is not timed):
  loop            regext.reference.penalty_loop, the seed's loop (torch.norm per tensor)
  foreach         regext.reference.penalty_foreach (two torch._foreach_norm calls)
  compiled        torch.compile(penalty_loop), inductor; compile time reported apart
  regext          regext.fused_penalty
  regext_inplace  regext.add_penalty_grad_ (forward+backward only), when it exists
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
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
try:
    import regext
except ImportError:  # an in-place build of a clone that was not pip-installed
    sys.path.insert(1, ROOT)
    import regext
from regext.reference import penalty_float64, penalty_foreach, penalty_loop  # noqa: E402

import param_sets  # noqa: E402
import timing  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # optional: plain progress lines instead
    tqdm = None

L1, L2 = 1e-5, 1e-4
DTYPE = torch.float32
PHASES = ("forward", "forward+backward")
VARIANTS = ("loop", "foreach", "compiled", "regext", "regext_inplace")
# A variant passes when its value is within this relative distance of the loop's,
# or within 3x the loop's own distance from the float64 truth when that is larger
# (torch's CPU float32 norm drifts by up to ~1e-2 on tens of millions of elements).
VALUE_RTOL = 1e-4
# Max over tensors of ||g - g_loop|| / ||g_loop||.
GRAD_RTOL = 1e-4

CONFIGS = {
    # full run: all sets, ~6 s of interleaved rounds per set and phase
    "full": dict(
        sets=list(param_sets.PARAM_SETS), with_compiled=True, warmup_rounds=1,
        budget_s=6.0, min_rounds=7, max_rounds=60, max_copies=32,
        sweep_counts=[10, 30, 100, 300, 1000, 3000, 10000], sweep_count_total=1 << 22,
        sweep_sizes=[1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24], sweep_size_count=100,
        sweep_budget_s=2.0, sweep_min_rounds=5, sweep_max_rounds=30,
        ceiling_repeats=15),
    # --quick: two sets, no torch.compile (its compile alone takes 30 s to minutes
    # per set on 2 cores), few rounds, a short sweep
    "quick": dict(
        sets=["resnet18", "small500"], with_compiled=False, warmup_rounds=1,
        budget_s=0.5, min_rounds=3, max_rounds=10, max_copies=4,
        sweep_counts=[10, 100, 1000], sweep_count_total=1 << 18,
        sweep_sizes=[1 << 14, 1 << 17, 1 << 20], sweep_size_count=100,
        sweep_budget_s=0.3, sweep_min_rounds=3, sweep_max_rounds=10,
        ceiling_repeats=5),
}
CUDA_OVERRIDES = dict(sweep_count_total=1 << 24, sweep_sizes=[1 << 16, 1 << 18, 1 << 20,
                                                              1 << 22, 1 << 24, 1 << 26,
                                                              1 << 28])
CEILING_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}


# --------------------------------------------------------------------------- output


class Progress:
    """A tqdm bar on stderr, or plain numbered lines when tqdm is missing."""

    def __init__(self, total):
        self.total, self.done = total, 0
        self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"
                        ) if tqdm else None

    def start(self, desc):
        if self.bar is not None:
            self.bar.set_description_str(desc)
        else:
            print(f"[{self.done + 1}/{self.total}] {desc} ...", file=sys.stderr, flush=True)

    def advance(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def format_table(rows, columns, markdown=False):
    """Rows of dicts as an aligned text table (or a Markdown table)."""
    header = [title for title, _, _ in columns]
    body = []
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h)
              for i, h in enumerate(header)]
    left = 3  # set, phase, variant are left-aligned, numbers right-aligned
    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in body])


RESULT_COLUMNS = [
    ("set", "set", "{}"), ("phase", "phase", "{}"), ("variant", "variant", "{}"),
    ("median ms", "median_ms", "{:.3f}"), ("min ms", "min_ms", "{:.3f}"),
    ("vs loop", "speedup_vs_loop", "{:.2f}x"), ("vs foreach", "speedup_vs_foreach", "{:.2f}x"),
    ("vs compiled", "speedup_vs_compiled", "{:.2f}x"),
    ("GB/s", "gbps", "{:.1f}"), ("% ceiling", "pct_of_ceiling", "{:.1f}"),
]
SWEEP_COLUMNS = [
    ("sweep", "sweep", "{}"), ("phase", "phase", "{}"), ("variant", "variant", "{}"),
    ("tensors", "n_tensors", "{}"), ("elements", "numel", "{}"),
    ("median ms", "median_ms", "{:.3f}"), ("min ms", "min_ms", "{:.3f}"),
    ("vs loop", "speedup_vs_loop", "{:.2f}x"), ("GB/s", "gbps", "{:.1f}"),
]


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
    if hasattr(regext, "add_penalty_grad_"):
        variants.append(Variant("regext_inplace", step=lambda ps: regext.add_penalty_grad_(
            ps, L1, L2), inplace=True))
    else:
        log("regext_inplace: skipped, this regext has no add_penalty_grad_ yet")
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


def run_set(name, shapes, variants, device, cfg, clock, cache_bytes, progress,
            budget_s, min_rounds, max_rounds):
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
            rounds = timing.rounds_for(per_round, budget_s, min_rounds, max_rounds)
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


# --------------------------------------------------------------------------- plots


def _colors():
    import matplotlib
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return {v: cycle[i % len(cycle)] for i, v in enumerate(VARIANTS)}  # same color everywhere


def plot_speedups(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors()
    sets = list(dict.fromkeys(r["set"] for r in rows))
    variants = [v for v in VARIANTS if v != "loop" and any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(1, len(PHASES), figsize=(6.5 * len(PHASES), 4.8), sharey=True)
    width = 0.8 / max(1, len(variants))
    values = []
    for ax, phase in zip(axes, PHASES):
        for i, variant in enumerate(variants):
            xs, ys = [], []
            for j, s in enumerate(sets):
                row = next((r for r in rows if r["set"] == s and r["phase"] == phase
                            and r["variant"] == variant), None)
                if row and row.get("speedup_vs_loop"):
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(row["speedup_vs_loop"])
            ax.bar(xs, ys, width, color=colors[variant])
            values += ys
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.1f}" if y < 10 else f"{y:.0f}", (x, y), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(sets)))
        ax.set_xticklabels(sets, rotation=15)
        ax.set_title(f"{phase} (loop = 1)")
        ax.grid(axis="y", which="both", alpha=0.3)
    if values:
        axes[0].set_ylim(min(0.8, min(values) / 1.5), max(values) * 1.8)
    axes[0].set_ylabel("speed-up over the loop (x, log scale)")
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color=colors[v], label=v) for v in variants], loc="upper center",
               ncol=len(variants), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows, path, env):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors()
    fig, axes = plt.subplots(2, len(PHASES), figsize=(6.5 * len(PHASES), 8.5))
    for r, (sweep, xkey, xlabel) in enumerate([("count", "n_tensors", "number of tensors"),
                                               ("size", "numel", "total elements")]):
        sub = [row for row in rows if row["sweep"] == sweep]
        fixed = (f"fixed total {sub[0]['numel']:,} elements" if sweep == "count"
                 else f"fixed count {sub[0]['n_tensors']} tensors") if sub else ""
        for c, phase in enumerate(PHASES):
            ax = axes[r][c]
            for variant in VARIANTS:
                pts = sorted((row[xkey], row["median_ms"]) for row in sub
                             if row["variant"] == variant and row["phase"] == phase)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=variant, color=colors[variant])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("median ms (log)")
            ax.set_title(f"{phase}: time vs {xlabel}, {fixed}", fontsize=10)
            ax.grid(which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def environment(device, cfg_name):
    # Thread-count variables are part of the command that reproduces a CPU run.
    thread_env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                  if k in os.environ}
    command = ([f"{k}={v}" for k, v in thread_env.items()]
               + ["python", os.path.relpath(os.path.abspath(__file__), ROOT)] + sys.argv[1:])
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "device": device.type,
           "threads": torch.get_num_threads(), "thread_env": thread_env,
           "cpu_count": os.cpu_count(), "cpu_model": timing.cpu_model_name(),
           "regext": regext.__version__, "regext_cuda_kernels": regext.cuda_available(),
           "regext_inplace": hasattr(regext, "add_penalty_grad_"),
           "cuda": torch.version.cuda, "dtype": str(DTYPE).replace("torch.", ""),
           "l1": L1, "l2": L2, "l2_squared": False, "config": cfg_name,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(command), "loadavg_start": timing.load_average()}
    try:
        env["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device),
                   sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["device_name"] = env["cpu_model"]
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    env["phases"] = {
        "forward": "call with grad mode on, params requiring grad (graph built, freed untimed)",
        "forward+backward": "call + .backward(), every .grad set to None before (untimed); "
                            "regext_inplace: one add_penalty_grad_ call into existing .grad"}
    env["bytes_model"] = ("forward: param bytes; forward+backward: 3x param bytes; "
                          "regext_inplace: 4x (also reads the existing grad)")
    return env


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
    args = parser.parse_args(argv)
    if args.sets is not None:
        names = [s.strip() for s in args.sets.split(",") if s.strip()]
        unknown = [s for s in names if s not in param_sets.PARAM_SETS]
        if unknown or not names:
            parser.error(f"unknown set(s) {unknown}; choose from "
                         f"{','.join(param_sets.PARAM_SETS)}")
        args.sets = names
    return args


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
    set_names = args.sets or cfg["sets"]
    os.makedirs(args.out, exist_ok=True)
    clock = timing.Clock(device)
    env = environment(device, cfg_name)
    cache_bytes = timing.last_level_cache_bytes(device)
    env["last_level_cache_bytes"] = cache_bytes

    sweep_points = ([("count", n, cfg["sweep_count_total"]) for n in cfg["sweep_counts"]]
                    + [("size", cfg["sweep_size_count"], t) for t in cfg["sweep_sizes"]])
    progress = Progress(total=2 + 3 * (len(set_names) + len(sweep_points)))
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
    rows, failures, compile_ms = [], [], {}
    for name in set_names:
        variants = make_variants(device, cfg["with_compiled"], log)
        shapes = param_sets.PARAM_SETS[name][0]()
        set_rows, set_failures = run_set(name, shapes, variants, device, cfg, clock,
                                         cache_bytes, progress, cfg["budget_s"],
                                         cfg["min_rounds"], cfg["max_rounds"])
        rows += set_rows
        failures += set_failures
        for v in variants:
            if v.compile_info:
                compile_ms[name] = round(compile_summary(v.compile_info)["compile_ms"], 1)
        torch._dynamo.reset()

    scaling = []
    for sweep, count, total in sweep_points:
        label = f"{sweep}:{count}x{total // count}"
        variants = make_variants(device, False, log)
        sweep_rows, sweep_failures = run_set(
            label, param_sets.split_shapes(total, count), variants, device, cfg, clock,
            cache_bytes, progress, cfg["sweep_budget_s"], cfg["sweep_min_rounds"],
            cfg["sweep_max_rounds"])
        for row in sweep_rows:
            row["sweep"] = sweep
        scaling += sweep_rows
        failures += sweep_failures

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
    payload = {"env": env, "results": rows, "scaling": scaling, "failures": failures}
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)

    pngs = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no PNG charts (pip install matplotlib)",
              file=sys.stderr)
    else:
        if rows:
            plot_speedups(rows, os.path.join(args.out, "speedup.png"))
            pngs.append("speedup.png")
        if scaling:
            plot_scaling(scaling, os.path.join(args.out, "scaling.png"), env)
            pngs.append("scaling.png")
    write_markdown(os.path.join(args.out, "results.md"), env, rows, scaling, failures, pngs)

    print(f"\n{env['device_name']} | {env['threads']} threads | torch {env['torch']} | "
          f"ceiling {ceiling['gbps']:.1f} GB/s (copy of {ceiling['buffer_bytes'] >> 20} MB) | "
          f"load {env['loadavg_start']} -> {env['loadavg_end']}")
    print(format_table(rows, RESULT_COLUMNS))
    if scaling:
        print("\nScaling (fixed total size: count sweep; fixed count: size sweep)")
        print(format_table(scaling, SWEEP_COLUMNS))
    if compile_ms:
        print("\ntorch.compile time (first forward + first backward): "
              + ", ".join(f"{k} {v / 1e3:.1f} s" for k, v in compile_ms.items()))
    for fail in failures:
        print(f"FAILED {fail['set']}/{fail['variant']}/{fail['phase']} ({fail['kind']}): "
              f"{fail.get('error', 'value/gradient check')}")
    print(f"\nwrote {json_path}, results.md{''.join(', ' + p for p in pngs)} in "
          f"{args.out} ({env['wall_s']:.0f} s)")
    return 1 if any(f["kind"] == "check" for f in failures) else 0


def forward_vs_one_pass(rows):
    """{set: regext forward median / foreach_norm2 median}, where both were timed."""
    forward = {(r["set"], r["variant"]): r["median_ms"] for r in rows if r["phase"] == "forward"}
    return {s: forward[(s, "regext")] / forward[(s, "foreach_norm2")]
            for (s, v) in forward if v == "foreach_norm2" and (s, "regext") in forward}


def write_markdown(path, env, rows, scaling, failures, pngs):
    lines = [f"# regext benchmark: {env['device']}", "",
             f"- machine: {env['device_name']}, {env['threads']} torch threads, "
             f"{env.get('affinity_cpus', env['cpu_count'])} CPUs usable",
             f"- torch {env['torch']}, python {env['python']}"
             + (f", CUDA {env['cuda']}" if env['device'] == 'cuda' else ""),
             f"- command: `{env['command']}`",
             f"- date: {env['date']}, commit {env.get('git_commit')}",
             f"- load average at start / end: {env['loadavg_start']} / {env['loadavg_end']}",
             f"- bandwidth ceiling: {env['ceiling_gbps']:.1f} GB/s (median dst.copy_(src), "
             "read + write bytes)",
             f"- float32, l1={env['l1']}, l2={env['l2']}; {env['bytes_model']}", ""]
    lines += [f"![{p}]({p})" for p in pngs] + [""]
    lines += [format_table(rows, RESULT_COLUMNS, markdown=True), ""]
    if env.get("compile_ms"):
        lines += ["torch.compile time (first forward + first backward, excluded above): "
                  + ", ".join(f"{k} {v / 1e3:.1f} s" for k, v in env["compile_ms"].items()),
                  ""]
    ratios = forward_vs_one_pass(rows)
    if ratios:
        lines += ["regext forward / one `torch._foreach_norm(params, 2)` pass (medians): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), ""]
    if scaling:
        lines += ["## Scaling", "", format_table(scaling, SWEEP_COLUMNS, markdown=True), ""]
    for fail in failures:
        lines.append(f"- FAILED {fail['set']}/{fail['variant']}/{fail['phase']} "
                     f"({fail['kind']}): {fail.get('error', 'value/gradient check')}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
