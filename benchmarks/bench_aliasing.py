"""One duplicate in a long list: the in-place operators' alias planning.

The in-place operators act on their list in order, so a tensor listed twice is
updated twice; csrc/aliasing.h splits the list into runs without shared memory.
That planning used to compare each tensor with every tensor of its run once any
two overlapped: O(n^2), 1.2 s instead of 0.11 s for prox_l1_ on 50k tensors plus
one duplicate. This times, on lists of --tensors tensors of --size float32
elements (default 100k x 20), interleaved in one process (timing.interleaved,
a seeded random order per round) and reported as medians:

  no_dup    lst + [other]                      one more distinct tensor: one run
  dup_end   lst + [lst[0]]                     the issue's example: two runs
  dup_mid   lst[:n/2] + [lst[0]] + lst[n/2:]   two runs of about n/2

for regext.prox_l1_ and regext.add_penalty_grad_ (every parameter already holds
a .grad), and a per-tensor torch loop on the no_dup list for reference
(prox: regext.reference.prox_l1_reference; gradient: p.grad += l1*sign(p) +
l2*p/||p||). Goal: each dup list within 1.5x of no_dup. Before timing, each
regext call on each list is checked against the reference loop.

    python benchmarks/bench_aliasing.py [--tensors 100000] [--size 20] [--rounds 7]
        [--no-loop] [--quick] [--threads N] [--out DIR]
"""

import argparse
import os
import sys

import torch

import regext
from regext.reference import prox_l1_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ run as a script
import report  # noqa: E402
import timing  # noqa: E402

THRESHOLD, L1, L2 = 1e-4, 1e-4, 1e-3
GOAL = 1.5
LISTS = ("no_dup", "dup_end", "dup_mid")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=20, help="float32 elements per tensor")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-loop", action="store_true", help="skip the torch loop (slow)")
    parser.add_argument("--quick", action="store_true",
                        help="2,000 tensors, 3 rounds: a smoke run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write results.json here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tensors, args.rounds = 2000, 3
    return args


def make_lists(base, extra):
    """The three lists over the same tensors (see the module docstring)."""
    half = len(base) // 2
    return {"no_dup": base + [extra], "dup_end": base + [base[0]],
            "dup_mid": base[:half] + [base[0]] + base[half:]}


def new_tensors(n, size, seed):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(n + 1, size, generator=gen)
    grads = torch.randn(n + 1, size, generator=gen)
    tensors = []
    for i in range(n + 1):
        p = flat[i].clone().requires_grad_()  # own storage: no two tensors share memory
        p.grad = grads[i].clone()
        tensors.append(p)
    return tensors[:-1], tensors[-1]


def grad_loop(params):
    """p.grad += d(l1*||p||_1 + l2*||p||_2)/dp, one tensor at a time, in order."""
    with torch.no_grad():
        for p in params:
            p.grad.add_(L1 * p.sign() + L2 * p / torch.linalg.vector_norm(p))


def prox_loop(params):
    with torch.no_grad():
        prox_l1_reference(params, THRESHOLD)


def check(n, size):
    """Every regext call on every list against the reference loop on copies of
    the same data: prox bitwise, gradients within float32 rounding."""
    failures = []
    for name in LISTS:
        got = make_lists(*new_tensors(n, size, 1))[name]
        want = make_lists(*new_tensors(n, size, 1))[name]
        regext.prox_l1_(got, THRESHOLD)
        prox_loop(want)
        if not all(torch.equal(a, b) for a, b in zip(got, want)):
            failures.append(f"prox_l1_ {name}")
        regext.add_penalty_grad_(got, L1, L2)
        grad_loop(want)
        if not all(torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)
                   for a, b in zip(got, want)):
            failures.append(f"add_penalty_grad_ {name}")
    return failures


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    clock = timing.Clock(device)
    env = report.environment(device, "bench_aliasing", __file__, tensors=args.tensors,
                             size=args.size, threshold=THRESHOLD, l1=L1, l2=L2)
    print(f"{env['device_name']}, {env['threads']} threads, CPU kernels {env['cpu_capability']}, "
          f"load average {env['loadavg_start']}; torch {env['torch']}")
    print(f"{args.tensors} tensors of {args.size} float32 (+1: a duplicate or another tensor); "
          f"{args.rounds} interleaved rounds", flush=True)

    failures = check(args.tensors, args.size)
    print("checks against the reference loop: " + ("passed" if not failures
                                                     else "FAILED " + ", ".join(failures)),
          flush=True)

    lists = make_lists(*new_tensors(args.tensors, args.size, 0))
    calls = {}
    for name, lst in lists.items():
        calls[f"prox_l1_ {name}"] = lambda lst=lst: regext.prox_l1_(lst, THRESHOLD)
        calls[f"add_penalty_grad_ {name}"] = lambda lst=lst: regext.add_penalty_grad_(lst, L1, L2)
    if not args.no_loop:
        calls["prox torch_loop no_dup"] = lambda: prox_loop(lists["no_dup"])
        calls["grad torch_loop no_dup"] = lambda: grad_loop(lists["no_dup"])
    tasks = {name: (lambda: None, (lambda _, f=f: f()), lambda _: None)
             for name, f in calls.items()}
    if args.warmup:
        timing.interleaved(tasks, args.warmup, clock)
    samples = timing.interleaved(tasks, args.rounds, clock)
    stats = {name: timing.summarize(s) for name, s in samples.items()}
    med = {name: s["median_ms"] for name, s in stats.items()}

    print(f"\n{'variant':<28} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for name, s in samples.items():
        print(f"{name:<28} {med[name]:>10.1f} {min(s):>9.1f} {max(s):>9.1f}")
    ratios = {}
    print()
    for op in ("prox_l1_", "add_penalty_grad_"):
        for name in LISTS[1:]:
            ratio = med[f"{op} {name}"] / med[f"{op} no_dup"]
            ratios[f"{op} {name}"] = ratio
            print(f"{op} {name} / no_dup = {ratio:.2f} (goal <= {GOAL}): "
                  f"{'met' if ratio <= GOAL else 'NOT met'}")
    if not args.no_loop:
        for op, loop in (("prox_l1_", "prox torch_loop no_dup"),
                         ("add_penalty_grad_", "grad torch_loop no_dup")):
            print(f"{loop} / {op} no_dup = {med[loop] / med[f'{op} no_dup']:.1f}x")

    result = {"env": env, "rounds": args.rounds, "median_ms": med,
              "min_ms": {n: s["min_ms"] for n, s in stats.items()}, "all_ms": samples,
              "ratio_to_no_dup": ratios, "goal": GOAL, "failures": failures}
    report.write_json(args.out, result)
    if failures:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
