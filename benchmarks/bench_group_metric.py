"""The group lasso's proximal step in an optimizer's metric: the fused kernel against
the float64 torch-ops path it replaced and against the Euclidean group step.

Row groups (``group="row"``, ``group_weight="sqrt_size"``) of square float32 weights,
second moments of AdamW's magnitude (uniform in [0, 1e-4)), a threshold that zeroes a
few rows. Variants, timed interleaved in one process (timing.interleaved, a seeded
random order every round), reported as medians:

  fused       torch.ops.regext.prox_group_metric_ (one pass per group: read the
              weight and its second moment once, Newton's iterations in cache, write)
  reference   regext.reference.prox_group_metric_reference (float64 torch ops per
              tensor: the path prox_group_l2_(metric=...) took before the kernel)
  euclidean   regext.prox_group_l2_ (the Euclidean group step: no metric, no iteration)

Before timing, the fused result is checked against the reference: the same zeros and
within 1e-5 relative. Bandwidth: the fused step moves 12 bytes per element (reads the
weight and its moment, writes the weight).

    python benchmarks/bench_group_metric.py [--tensors 8] [--size 1024] [--repeats 7]
        [--threads 1] [--out DIR]
"""

import argparse
import os
import sys

import torch

import regext
from regext.reference import prox_group_metric_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ run as a script
import report  # noqa: E402
import timing  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024, help="rows and columns of each weight")
    parser.add_argument("--step", type=float, default=3.3e-4,
                        help="the group threshold step lr·l2 (times sqrt(row size) per row)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write results.json here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    clock = timing.Clock(device)
    gen = torch.Generator().manual_seed(0)
    shape = (args.size, args.size)
    weights = [0.05 * torch.randn(shape, generator=gen) for _ in range(args.tensors)]
    moments = [1e-4 * torch.rand(shape, generator=gen) for _ in range(args.tensors)]
    coefs = torch.tensor([[args.step, 0.0, 1.0, 1e-8]] * args.tensors, dtype=torch.float64)
    dims = [0] * args.tensors
    numel = sum(w.numel() for w in weights)
    env = report.environment(device, "bench_group_metric", __file__, tensors=args.tensors,
                             size=args.size, step=args.step, elements=numel)
    print(f"{env['device_name']}, {env['threads']} threads, load average "
          f"{env['loadavg_start']}; torch {env['torch']}")
    print(f"{args.tensors} float32 weights of {args.size}x{args.size}, row groups, "
          f"sqrt_size weights, step {args.step}", flush=True)

    fused = [w.clone() for w in weights]
    torch.ops.regext.prox_group_metric_(fused, moments, [], dims, coefs, True)
    want = [w.clone() for w in weights]
    prox_group_metric_reference(want, moments, [], dims, coefs, True)
    zero_rows = sum(int((f == 0).all(dim=1).sum()) for f in fused)
    check = all(torch.equal(f == 0, w == 0) for f, w in zip(fused, want)) and all(
        bool(((f.double() - w.double()).abs() <= 1e-5 * w.double().abs()).all())
        for f, w in zip(fused, want))
    print(f"fused against the float64 reference: "
          f"{'the same zeros, within 1e-5' if check else 'DIFFERS'}; "
          f"{zero_rows} of {args.tensors * args.size} rows zeroed", flush=True)

    def on_copies(fn):
        return (lambda: [w.clone() for w in weights], fn, lambda _: None)

    tasks = {
        "fused": on_copies(
            lambda xs: torch.ops.regext.prox_group_metric_(xs, moments, [], dims, coefs, True)),
        "reference": on_copies(
            lambda xs: prox_group_metric_reference(xs, moments, [], dims, coefs, True)),
        "euclidean": on_copies(
            lambda xs: regext.prox_group_l2_(xs, args.step, group="row",
                                             group_weight="sqrt_size")),
    }
    timing.interleaved(tasks, args.warmup, clock)
    samples = timing.interleaved(tasks, args.repeats, clock)
    med = {name: timing.summarize(s)["median_ms"] for name, s in samples.items()}
    gbps = 12 * numel / (med["fused"] * 1e-3) / 1e9
    print(f"\n{'variant':<10} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for name, s in samples.items():
        print(f"{name:<10} {med[name]:>10.1f} {min(s):>9.1f} {max(s):>9.1f}")
    print(f"\nreference / fused = {med['reference'] / med['fused']:.1f}x; "
          f"fused / euclidean = {med['fused'] / med['euclidean']:.1f}x; fused: {gbps:.2f} GB/s")
    result = {"env": env, "repeats": args.repeats, "median_ms": med, "all_ms": samples,
              "zero_rows": zero_rows, "check_against_float64_reference": check,
              "gbps_fused": gbps}
    report.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
