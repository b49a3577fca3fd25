"""Per-call cost of regext on small inputs, beside torch's own one-call baselines
(issue 24). Interleaved: each round times every variant once, in a seeded random
order, on the same inputs; the table shows medians in microseconds and the ratio
to the baseline of the row, with the goal of each row.

    python benchmarks/bench_small_calls.py            # full (about 1 minute)
    python benchmarks/bench_small_calls.py --quick    # a few seconds
    python benchmarks/bench_small_calls.py --json out.json

One thread (torch.set_num_threads(1)): per-call cost, not kernel bandwidth. A
sample is a batch of calls timed together (the clock's own cost is ~0.1 us), so
medians are per call.
"""

import argparse
import json
import random
import statistics
import time

import torch
from torch import nn

import regext
import timing


def seed_loop(model, l1, l2):
    """The seed's loop: l1 * sum ||p||_1 + l2 * sum ||p||_2, then backward."""
    l1_term = sum(torch.norm(p, 1) for p in model.parameters())
    l2_term = sum(torch.norm(p, 2) for p in model.parameters())
    (l1 * l1_term + l2 * l2_term).backward()


def cases():
    """(row, goal text, goal ratio or None, {variant: fn}, baseline variant)."""
    torch.manual_seed(0)
    one = [torch.randn(16, requires_grad=True)]
    many = [torch.randn(64, requires_grad=True) for _ in range(500)]
    big = [torch.randn(65536)]
    for p in one:
        p.grad = torch.zeros_like(p)
    linear = nn.Linear(10, 1)
    pen = regext.Penalty(linear, 0.1, 0.2)
    opt = torch.optim.SGD(linear.parameters(), lr=0.0)  # lr 0: the weights stay put
    attached = regext.Penalty(linear, 0.1, 0.2)
    attached.attach(opt, "grad")
    grads_one = [p.grad for p in one]

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    def step_attached():
        opt.zero_grad(set_to_none=False)
        opt.step()

    def penalty_backward():
        linear.zero_grad(set_to_none=False)
        pen().backward()

    def fused_backward():
        linear.zero_grad(set_to_none=False)
        regext.fused_penalty(linear.parameters(), 0.1, 0.2).backward()

    def loop_backward():
        linear.zero_grad(set_to_none=False)
        seed_loop(linear, 0.1, 0.2)

    return [
        ("forward, 1 tensor of 16 (no_grad)", "<= 3x foreach_norm", 3.0,
         {"regext": no_grad(lambda: regext.fused_penalty(one, 0.1, 0.2)),
          "foreach_norm": no_grad(lambda: torch._foreach_norm(one))}, "foreach_norm"),
        ("forward, 1 tensor of 16 (grad mode)", "<= 3x foreach_norm", 3.0,
         {"regext": lambda: regext.fused_penalty(one, 0.1, 0.2),
          "foreach_norm": lambda: torch._foreach_norm(one)}, "foreach_norm"),
        ("forward, 500 tensors of 64 (no_grad)", "<= 0.35x foreach_norm", 0.35,
         {"regext": no_grad(lambda: regext.fused_penalty(many, 0.1, 0.2)),
          "foreach_norm": no_grad(lambda: torch._foreach_norm(many))}, "foreach_norm"),
        ("forward, 500 tensors of 64 (grad mode)", "<= 0.35x foreach_norm", 0.35,
         {"regext": lambda: regext.fused_penalty(many, 0.1, 0.2),
          "foreach_norm": lambda: torch._foreach_norm(many)}, "foreach_norm"),
        ("add_penalty_grad_, 1 tensor of 16", "<= 3x foreach_add_", 3.0,
         {"regext": lambda: regext.add_penalty_grad_(one, 0.1, 0.2),
          # no_grad: in grad mode adding a tensor that requires grad would make the
          # gradients require grad (an autograd graph), which no optimizer step does.
          "foreach_add_": no_grad(lambda: torch._foreach_add_(grads_one, one))},
         "foreach_add_"),
        ("forward, 1 tensor of 64K floats (no_grad)", "yardstick: x.sum()", None,
         {"regext": no_grad(lambda: regext.fused_penalty(big, 0.1, 0.2)),
          "x.sum() (yardstick)": lambda: big[0].sum()}, "x.sum() (yardstick)"),
        ("seed Linear(10, 1): penalty forward + backward", ">= 3x faster than the loop",
         1 / 3, {"fused_penalty": fused_backward, "Penalty()": penalty_backward,
                 "seed loop": loop_backward}, "seed loop"),
        ("seed Linear(10, 1): attached grad step vs Penalty()", "no slower than fused_penalty",
         None, {"attached step": step_attached, "fused_penalty": fused_backward},
         "fused_penalty"),
    ]


def measure(rounds, calls, seed=0):
    rng = random.Random(seed)
    results = []
    for row, goal_text, goal, variants, baseline in cases():
        samples = {name: [] for name in variants}
        for fn in variants.values():
            for _ in range(max(10, calls // 10)):
                fn()  # warm-up: caches, allocator, first-call paths
        for _ in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                fn = variants[name]
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append(1e6 * (time.perf_counter() - start) / calls)
        medians = {name: statistics.median(s) for name, s in samples.items()}
        ratio = medians[next(n for n in variants if n != baseline)] / medians[baseline]
        results.append({"row": row, "goal": goal_text, "goal_ratio": goal,
                        "median_us": medians, "baseline": baseline, "ratio": ratio})
    return results


def report(results):
    lines = [f"{'case':52} {'variant':22} {'median us':>10} {'ratio':>7}  goal"]
    for r in results:
        first = True
        for name, us in r["median_us"].items():
            ratio = us / r["median_us"][r["baseline"]]
            goal = ""
            if first:
                met = ""
                if r["goal_ratio"] is not None:
                    met = " (met)" if r["ratio"] <= r["goal_ratio"] else " (not met)"
                goal = r["goal"] + met
            lines.append(f"{r['row'] if first else '':52} {name:22} {us:10.2f} {ratio:7.2f}  {goal}")
            first = False
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (a few seconds)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds, calls = (5, 20) if args.quick else (21, 200)
    results = measure(rounds, calls)
    header = (f"{timing.cpu_model_name()} | regext CPU capability {regext.cpu_capability()} | torch "
              f"{torch.__version__} | 1 thread | {rounds} interleaved rounds of {calls} calls")
    print(header)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
