"""add_penalty_grad_ against the alternatives, side by side in one process.

GPT-2-small-shaped parameters (124M in 148 tensors) that already hold
gradients, as right after loss.backward(). Variants, timed interleaved (every
round runs each variant once, in a rotating order; timing.interleaved) and
reported as medians:

  regext_inplace      regext.add_penalty_grad_(params, l1, l2)        (the in-place path)
  compiled_loop       fwd+bwd of torch.compile(penalty_loop): loss.backward() adds into .grad
  foreach_add         torch._foreach_add_(grads, params): reads param and grad, writes grad,
                      the memory floor of any "add something of p into p.grad" pass
  regext_autograd     fused_penalty(params, l1, l2).backward()        (context)
  eager_loop          fwd+bwd of the eager penalty_loop               (context; --with-eager)

Goals: regext_inplace >= 3x faster than compiled_loop and within 1.5x of foreach_add.

    python benchmarks/bench_inplace.py [--device cpu|cuda] [--repeats 15] [--scale 1.0]
        [--l2-squared] [--threads N] [--out DIR]
"""

import argparse
import os
import sys

import torch

import regext
from regext.reference import penalty_loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ run as a script
import param_sets  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402


def scaled(shapes, scale):
    if scale == 1.0:
        return shapes
    return [tuple(max(1, int(round(s[0] * scale))) if i == 0 else s[i] for i in range(len(s)))
            for s in shapes]


def parse_args(argv):
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
    return parser.parse_args(argv)


def variants(params, l1, l2, sq, with_eager):
    grads = [p.grad for p in params]
    compiled = torch.compile(penalty_loop)

    def foreach_add():
        with torch.no_grad():  # as an optimizer step would: no autograd graph
            torch._foreach_add_(grads, params)

    out = {
        "regext_inplace": lambda: regext.add_penalty_grad_(params, l1, l2, l2_squared=sq),
        "compiled_loop": lambda: compiled(params, l1, l2, l2_squared=sq).backward(),
        "foreach_add": foreach_add,
        "regext_autograd": lambda: regext.fused_penalty(params, l1, l2, l2_squared=sq)
        .backward(),
    }
    if with_eager:
        out["eager_loop"] = lambda: penalty_loop(params, l1, l2, l2_squared=sq).backward()
    return out


def max_grad_difference(params, calls, clock):
    """The largest |difference| between regext_inplace's and compiled_loop's gradients,
    each from the same starting gradients (checked once, before timing; the first
    compiled call compiles, and its time is reported)."""
    base = [p.grad.clone() for p in params]
    results = {}
    for name in ("regext_inplace", "compiled_loop"):
        for p, b in zip(params, base):
            p.grad.copy_(b)
        ms, _ = clock.time_ms(calls[name])
        if name == "compiled_loop":
            print(f"torch.compile(penalty_loop) first call (compile): {ms / 1e3:.1f} s",
                  flush=True)
        results[name] = [p.grad.clone() for p in params]
    for p, b in zip(params, base):
        p.grad.copy_(b)
    return max((a - b).abs().max().item()
               for a, b in zip(results["regext_inplace"], results["compiled_loop"]))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = timing.Clock(device)
    params = param_sets.make_params(scaled(param_sets.gpt2_small(), args.scale), device)
    for p, g in zip(params, param_sets.make_params([p.shape for p in params], device, seed=1)):
        p.grad = 0.05 * g.detach()
    numel = sum(p.numel() for p in params)
    l1, l2, sq = args.l1, args.l2, args.l2_squared
    env = report.environment(device, "bench_inplace", __file__, l1=l1, l2=l2, l2_squared=sq,
                             tensors=len(params), elements=numel)
    print(f"{env['device_name']}, {env['threads']} threads, CPU kernels {env['cpu_capability']}, "
          f"load average {env['loadavg_start']}; torch {env['torch']}")
    print(f"{len(params)} tensors, {numel / 1e6:.1f}M elements ({numel * 4 / 2**20:.0f} MiB "
          f"per fp32 copy) on {device}; l1={l1} l2={l2} l2_squared={sq}", flush=True)

    calls = variants(params, l1, l2, sq, args.with_eager)
    max_diff = max_grad_difference(params, calls, clock)
    print(f"max |grad difference| regext_inplace vs compiled_loop: {max_diff:.3e}", flush=True)

    tasks = {name: (lambda: None, (lambda _, f=f: f()), lambda _: None)
             for name, f in calls.items()}
    timing.interleaved(tasks, args.warmup, clock)
    samples = timing.interleaved(tasks, args.repeats, clock)
    stats = {name: timing.summarize(s) for name, s in samples.items()}
    med = {name: s["median_ms"] for name, s in stats.items()}

    print(f"\n{'variant':<18} {'median ms':>10} {'min ms':>9} {'max ms':>9}   vs regext_inplace")
    for name, s in samples.items():
        print(f"{name:<18} {med[name]:>10.1f} {min(s):>9.1f} {max(s):>9.1f}   "
              f"{med[name] / med['regext_inplace']:.2f}x")
    speedup = med["compiled_loop"] / med["regext_inplace"]
    vs_floor = med["regext_inplace"] / med["foreach_add"]
    print(f"\nregext_inplace is {speedup:.2f}x faster than compiled_loop (goal >= 3x): "
          f"{'met' if speedup >= 3 else 'NOT met'}")
    print(f"regext_inplace / foreach_add = {vs_floor:.2f} (goal <= 1.5): "
          f"{'met' if vs_floor <= 1.5 else 'NOT met'}")

    result = {"env": env, "repeats": args.repeats, "median_ms": med,
              "min_ms": {n: s["min_ms"] for n, s in stats.items()},
              "all_ms": samples, "speedup_vs_compiled_loop": speedup,
              "ratio_to_foreach_add": vs_floor, "max_grad_diff_vs_compiled_loop": max_diff}
    report.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
