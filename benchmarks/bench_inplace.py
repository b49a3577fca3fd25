"""add_penalty_grad_ against the alternatives, side by side in one process.

GPT-2-small-shaped parameters (124M in 148 tensors) that already hold
gradients, as right after loss.backward(). Variants, timed interleaved
(every repeat runs each variant once, in a rotating order) and reported as
medians:

  regext_inplace      regext.add_penalty_grad_(params, l1, l2)        (the in-place path)
  compiled_loop       fwd+bwd of torch.compile(penalty_loop): loss.backward() adds into .grad
  foreach_add         torch._foreach_add_(grads, params): reads param and grad, writes grad,
                      the memory floor of any "add something of p into p.grad" pass
  regext_autograd     fused_penalty(params, l1, l2).backward()        (context)
  eager_loop          fwd+bwd of the eager penalty_loop               (context; --with-eager)

The goal (issue #5): regext_inplace >= 3x faster than compiled_loop and within
1.5x of foreach_add.

    python benchmarks/bench_inplace.py [--device cpu|cuda] [--repeats 15] [--scale 1.0]
        [--l2-squared] [--threads N] [--out DIR]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

import regext
from regext.reference import penalty_loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import param_sets  # noqa: E402  (benchmarks/: the GPT-2 small shapes)
import timing  # noqa: E402


def scaled(shapes, scale):
    if scale == 1.0:
        return shapes
    return [tuple(max(1, int(round(s[0] * scale))) if i == 0 else s[i] for i in range(len(s)))
            for s in shapes]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="scale the first dimension of every shape (quick runs)")
    parser.add_argument("--l1", type=float, default=1e-5)
    parser.add_argument("--l2", type=float, default=1e-4)
    parser.add_argument("--l2-squared", action="store_true")
    parser.add_argument("--with-eager", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="write results.json here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    shapes = scaled(param_sets.gpt2_small(), args.scale)
    params = [(0.02 * torch.randn(s, generator=gen)).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = (1e-3 * torch.randn(p.shape, generator=gen)).to(device)
    grads = [p.grad for p in params]
    numel = sum(p.numel() for p in params)
    l1, l2, sq = args.l1, args.l2, args.l2_squared
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{timing.cpu_model_name()}, {torch.get_num_threads()} threads, load average {load:.1f}; "
          f"torch {torch.__version__}")
    print(f"{len(params)} tensors, {numel / 1e6:.1f}M elements ({numel * 4 / 2**20:.0f} MiB "
          f"per fp32 copy) on {device}; l1={l1} l2={l2} l2_squared={sq}", flush=True)

    compiled = torch.compile(penalty_loop)

    def foreach_add():
        with torch.no_grad():  # as an optimizer step would: no autograd graph
            torch._foreach_add_(grads, params)

    variants = {
        "regext_inplace": lambda: regext.add_penalty_grad_(params, l1, l2, l2_squared=sq),
        "compiled_loop": lambda: compiled(params, l1, l2, l2_squared=sq).backward(),
        "foreach_add": foreach_add,
        "regext_autograd": lambda: regext.fused_penalty(params, l1, l2, l2_squared=sq)
        .backward(),
    }
    if args.with_eager:
        variants["eager_loop"] = lambda: penalty_loop(params, l1, l2, l2_squared=sq).backward()

    # Same gradients (checked once, before timing; the compiled loop is the reference).
    base = [g.clone() for g in grads]
    checks = {}
    for name in ("regext_inplace", "compiled_loop"):
        for p, b in zip(params, base):
            p.grad.copy_(b)
        start = time.perf_counter()
        variants[name]()
        sync()
        if name == "compiled_loop":
            print(f"torch.compile(penalty_loop) first call (compile): "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        checks[name] = [p.grad.clone() for p in params]
        grads = [p.grad for p in params]
    max_diff = max((a - b).abs().max().item()
                   for a, b in zip(checks["regext_inplace"], checks["compiled_loop"]))
    del checks
    for p, b in zip(params, base):
        p.grad.copy_(b)
    del base
    grads = [p.grad for p in params]
    print(f"max |grad difference| regext_inplace vs compiled_loop: {max_diff:.3e}", flush=True)

    names = list(variants)
    times = {n: [] for n in names}
    for rep in range(args.warmup + args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            sync()
            start = time.perf_counter()
            variants[name]()
            sync()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)

    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    print(f"\n{'variant':<18} {'median ms':>10} {'min ms':>9} {'max ms':>9}   vs regext_inplace")
    for n in names:
        t = times[n]
        print(f"{n:<18} {med[n]:>10.1f} {min(t) * 1e3:>9.1f} {max(t) * 1e3:>9.1f}   "
              f"{med[n] / med['regext_inplace']:.2f}x")
    speedup = med["compiled_loop"] / med["regext_inplace"]
    vs_floor = med["regext_inplace"] / med["foreach_add"]
    best = {n: min(t) * 1e3 for n, t in times.items()}
    print(f"\nregext_inplace is {speedup:.2f}x faster than compiled_loop (goal >= 3x): "
          f"{'met' if speedup >= 3 else 'NOT met'}")
    print(f"regext_inplace / foreach_add = {vs_floor:.2f} (goal <= 1.5): "
          f"{'met' if vs_floor <= 1.5 else 'NOT met'}")
    print(f"(from the fastest repeats instead of medians: "
          f"{best['compiled_loop'] / best['regext_inplace']:.2f}x and "
          f"{best['regext_inplace'] / best['foreach_add']:.2f})")

    result = {
        "device": str(device),
        "cpu": timing.cpu_model_name(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "tensors": len(params), "elements": numel,
        "l1": l1, "l2": l2, "l2_squared": sq,
        "repeats": args.repeats,
        "median_ms": med,
        "all_ms": {n: [x * 1e3 for x in t] for n, t in times.items()},
        "min_ms": best,
        "speedup_vs_compiled_loop": speedup,
        "ratio_to_foreach_add": vs_floor,
        "max_grad_diff_vs_compiled_loop": max_diff,
    }
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
