"""The proximal step in the optimizer's metric against the optimizer step it follows.

GPT-2-small-shaped parameters (124M float32 in 148 tensors) with gradients, one
torch.optim.AdamW (foreach) over them. Variants, timed interleaved in one process
(every round runs each once, in a seeded random order; timing.interleaved), reported
as medians:

  step                  opt.step()                     (AdamW foreach: the baseline)
  step+metric_prox      opt.step() with Penalty(l1).attach(opt, "prox") (metric="auto":
                        the fused prox_metric_ pass over each parameter and exp_avg_sq)
  step+euclidean_prox   the same with metric="euclidean" (the prox_l1_ kernel)
  metric_prox           the attached metric step alone (Penalty.prox_(lr, metric=opt))
  euclidean_prox        the Euclidean step alone (Penalty.prox_(lr))

Goal (issue 22): step+metric_prox <= 1.25x step. Bandwidth: metric_prox moves 12
bytes per float32 element (reads the parameter and its second moment, writes the
parameter), euclidean_prox 8, both against the copy ceiling (timing.measure_ceiling).
Before timing, one metric step is checked against the float64 reference of
regext.reference.prox_metric_reference built from the optimizer's state.

    python benchmarks/bench_metric_prox.py [--repeats 9] [--scale 1.0] [--threads N] [--out DIR]
"""

import argparse
import os
import sys

import torch

import regext
from regext.reference import prox_metric_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ run as a script
import param_sets  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402

GOAL = 1.25


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="scale the first dimension of every shape (quick runs)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--l1", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write results.json here")
    return parser.parse_args(argv)


def scaled(shapes, scale):
    if scale == 1.0:
        return shapes
    return [tuple(max(1, int(round(s[0] * scale))) if i == 0 else s[i] for i in range(len(s)))
            for s in shapes]


def check_against_reference(params, opt, pen, lr, l1):
    """One attached metric step against the float64 reference from the optimizer's
    state: within 5e-6 relative (the kernel's float32 fast path) and the same zeros."""
    before = [p.detach().double() for p in params]
    pen.prox_(lr, metric=opt)
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    rows = [[lr * l1, 0.0, (1 - beta2 ** float(opt.state[p]["step"])) ** -0.5, eps]
            for p in params]
    moments = [opt.state[p]["exp_avg_sq"] for p in params]
    with torch.no_grad():
        prox_metric_reference(before, moments, [], torch.tensor(rows, dtype=torch.float64))
    worst = max(((p.detach().double() - b).abs() - 5e-6 * b.abs()).max().item()
                for p, b in zip(params, before))
    return worst <= 0 and all(torch.equal(p == 0, b == 0) for p, b in zip(params, before))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    clock = timing.Clock(device)
    params = param_sets.make_params(scaled(param_sets.gpt2_small(), args.scale), device)
    for p, g in zip(params, param_sets.make_params([p.shape for p in params], device, seed=1)):
        p.grad = 0.05 * g.detach()
    numel = sum(p.numel() for p in params)
    env = report.environment(device, "bench_metric_prox", __file__, lr=args.lr, l1=args.l1,
                             tensors=len(params), elements=numel)
    print(f"{env['device_name']}, {env['threads']} threads, CPU kernels {env['cpu_capability']}, "
          f"load average {env['loadavg_start']}; torch {env['torch']}")
    print(f"{len(params)} tensors, {numel / 1e6:.1f}M elements; AdamW(lr={args.lr}, "
          f"foreach=True); l1={args.l1}", flush=True)

    opt = torch.optim.AdamW(params, lr=args.lr, foreach=True)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    pen = regext.Penalty(named, l1=args.l1)
    opt.step()  # the state exists from here on
    check = check_against_reference(params, opt, pen, args.lr, args.l1)
    print(f"metric step against the float64 reference from the optimizer state: "
          f"{'within 5e-6, the same zeros' if check else 'DIFFERS'}", flush=True)

    def attached(metric):
        return (lambda: pen.attach(opt, "prox", metric=metric),
                lambda _: opt.step(), lambda handle: handle.remove())

    def plain(fn):
        return (lambda: None, lambda _: fn(), lambda _: None)

    tasks = {"step": plain(opt.step),
             "step+metric_prox": attached("auto"),
             "step+euclidean_prox": attached("euclidean"),
             "metric_prox": plain(lambda: pen.prox_(args.lr, metric=opt)),
             "euclidean_prox": plain(lambda: pen.prox_(args.lr))}
    ceiling = timing.measure_ceiling(device, min(numel * 4, 1 << 30), 5, clock)
    timing.interleaved(tasks, args.warmup, clock)
    samples = timing.interleaved(tasks, args.repeats, clock)
    stats = {name: timing.summarize(s) for name, s in samples.items()}
    med = {name: s["median_ms"] for name, s in stats.items()}
    gbps = {"metric_prox": 12 * numel / (med["metric_prox"] * 1e-3) / 1e9,
            "euclidean_prox": 8 * numel / (med["euclidean_prox"] * 1e-3) / 1e9}

    print(f"\n{'variant':<20} {'median ms':>10} {'min ms':>9} {'max ms':>9}   vs step")
    for name, s in samples.items():
        print(f"{name:<20} {med[name]:>10.1f} {min(s):>9.1f} {max(s):>9.1f}   "
              f"{med[name] / med['step']:.3f}x")
    ratio = med["step+metric_prox"] / med["step"]
    ratio_euclid = med["step+euclidean_prox"] / med["step"]
    print(f"\nstep+metric_prox / step = {ratio:.3f} (goal <= {GOAL}): "
          f"{'met' if ratio <= GOAL else 'NOT met'}")
    print(f"step+euclidean_prox / step = {ratio_euclid:.3f}")
    for name, value in gbps.items():
        print(f"{name}: {value:.1f} GB/s ({100 * value / ceiling['gbps']:.0f}% of the copy "
              f"ceiling, {ceiling['gbps']:.1f} GB/s)")

    result = {"env": env, "repeats": args.repeats, "median_ms": med,
              "min_ms": {n: s["min_ms"] for n, s in stats.items()}, "all_ms": samples,
              "ratio_step_metric_prox": ratio, "ratio_step_euclidean_prox": ratio_euclid,
              "goal": GOAL, "gbps": gbps, "ceiling": ceiling,
              "check_against_float64_reference": check}
    report.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
