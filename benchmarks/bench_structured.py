"""Structured sparsity: the group lasso's proximal step and penalty, side by side.

The weights (2-D and up: what structured pruning groups) of ResNet-18 (21 tensors,
11.7M elements, many small) and GPT-2 small (50 tensors, 124M elements, memory-bound),
float32, with row groups (slices along dim 0, as torchao's Dim0Grouper: ResNet's
filters and fc outputs; for GPT-2's Hugging Face Conv1D weights, stored (in, out), and
its embeddings, input features and tokens) weighted by sqrt(group size). Every row is scaled by a random factor so that the step zeroes
some groups and shrinks the others. Variants, checked against a float64 reference
(regext.reference) before they are timed, then timed interleaved in one process
(timing.interleaved; each call starts from the same weights, restored untimed):

proximal step, threshold t = lr * reg_lambda:
  regext          regext.prox_group_l2_(ws, t, group="row", group_weight="sqrt_size")
  torchao         torchao.prototype.pat: apply_prox_to_param(w, ProxGroupLasso(reg_lambda),
                  Dim0Grouper, gamma=lr) per weight, as its PruneOptimizer.step does
                  (without the optimizer's own copy of each weight into its latent state)
  torch_loop      per weight: vector_norm over each row, the shrink factor, one mul_
  foreach_mul     torch._foreach_mul_(ws, 0.999): one read and one write of every
                  weight, the floor of any in-place step (the prox needs 1.5 of it:
                  one more read for the norms)
penalty, forward + backward:
  regext_row      fused_penalty(ws, l2=..., group="row", group_weight="sqrt_size").backward()
  regext_tensor   fused_penalty(ws, l2=...).backward()  (one group per tensor)
  torch_loop_row  sum of sqrt(size) * vector_norm(w.flatten(1), dim=1).sum(), .backward()

Goals (ratios of medians, this CPU): prox regext >= 5x faster than torchao on
ResNet-18 and >= 2x on GPT-2; prox regext / foreach_mul <= 1.6; fwd+bwd
regext_row / regext_tensor <= 1.2.

    pip install torchao            # optional: without it that variant is reported missing
    python benchmarks/bench_structured.py [--sets resnet18 gpt2_small] [--repeats 15]
        [--threads N] [--scale 1.0] [--out DIR]
"""

import argparse
import math
import os
import sys

import torch

import regext
from regext.reference import group_lasso_float64, prox_group_lasso_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ run as a script
import param_sets  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402

SETS = {"resnet18": param_sets.resnet18, "gpt2_small": param_sets.gpt2_small}
LR, REG_LAMBDA, L2 = 0.1, 0.1, 1e-4


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="scale the first dimension of every shape (quick runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write results.json, results.md, PNG here")
    return parser.parse_args(argv)


def weights(name, scale, seed=0):
    """The set's tensors of 2 or more dims, float32, each row scaled by U(0.1, 2)."""
    shapes = [s for s in SETS[name]() if len(s) >= 2]
    if scale != 1.0:
        shapes = [(max(1, int(round(s[0] * scale))),) + tuple(s[1:]) for s in shapes]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        w = torch.randn(shape, generator=gen) * 0.02
        rows = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=gen) * 1.9 + 0.1
        out.append(w * rows)
    return out


def torchao_prox():
    """torchao's per-parameter step, or None (with the reason printed) if unavailable."""
    try:
        from torchao.prototype.pat.group.dim import Dim0Grouper
        from torchao.prototype.pat.optim.group_lasso import ProxGroupLasso
        from torchao.prototype.pat.optim.prox_executor import apply_prox_to_param
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        print(f"torchao is not available ({type(e).__name__}: {e}); its variant is skipped")
        return None
    prox_map = ProxGroupLasso(REG_LAMBDA)
    kwargs = {"gamma": LR, "gamma_index_slope": 0.0, "disable_vmap": False,
              "is_svd_grouper": False, "zero_elts_are_counts": False}

    def step(ws):
        for w in ws:
            apply_prox_to_param(w, prox_map, Dim0Grouper, {}, kwargs)
    return step


def torch_loop_prox(ws, threshold):
    for w in ws:
        rows = w.flatten(1)
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        t = threshold * math.sqrt(rows.shape[1])
        scale = torch.where(norms <= t, 0.0, 1.0 - t / norms)
        rows.mul_(scale)


def prox_variants():
    threshold = LR * REG_LAMBDA
    out = {"regext": lambda ws: regext.prox_group_l2_(ws, threshold, group="row",
                                                      group_weight="sqrt_size"),
           "torch_loop": lambda ws: torch_loop_prox(ws, threshold),
           "foreach_mul": lambda ws: torch._foreach_mul_(ws, 0.999)}
    step = torchao_prox()
    if step is not None:
        out["torchao"] = step
    return out


def torch_loop_penalty(ws, l2):
    total = torch.zeros(())
    for w in ws:
        rows = w.flatten(1)
        total = total + l2 * math.sqrt(rows.shape[1]) * torch.linalg.vector_norm(rows, dim=1).sum()
    return total


def penalty_variants():
    return {"regext_row": lambda ws: regext.fused_penalty(ws, 0.0, L2, group="row",
                                                          group_weight="sqrt_size"),
            "regext_tensor": lambda ws: regext.fused_penalty(ws, 0.0, L2),
            "torch_loop_row": lambda ws: torch_loop_penalty(ws, L2)}


def check_prox(name, fn, originals):
    """Max relative difference to the float64 reference, and the fraction of rows zeroed."""
    ws = [w.clone() for w in originals]
    fn(ws)
    want = [w.double() for w in originals]
    if name == "foreach_mul":
        for w in want:
            w.mul_(0.999)
    else:
        prox_group_lasso_reference(want, [0] * len(want), LR * REG_LAMBDA, sqrt_size=True)
    err = max(((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
              for a, b in zip(ws, want))
    zero_rows = sum(int((w.flatten(1).abs().sum(1) == 0).sum()) for w in ws)
    return err, zero_rows / sum(w.shape[0] for w in ws)


def check_penalty(name, fn, originals):
    ws = [w.clone().requires_grad_() for w in originals]
    value = fn(ws)
    grads = torch.autograd.grad(value, ws)
    ref_ws = [w.double().requires_grad_() for w in originals]
    dims = [-1 if name == "regext_tensor" else 0] * len(ws)
    ref = group_lasso_float64(ref_ws, dims, 0.0, L2, sqrt_size=name != "regext_tensor")
    ref_grads = torch.autograd.grad(ref, ref_ws)
    err = abs(value.item() - ref.item()) / abs(ref.item())
    for g, r in zip(grads, ref_grads):
        err = max(err, ((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return err


def run_set(name, args, clock):
    originals = weights(name, args.scale)
    numel = sum(w.numel() for w in originals)
    print(f"\n{name}: {len(originals)} weights, {numel / 1e6:.1f}M elements, "
          f"{sum(w.shape[0] for w in originals)} row groups", flush=True)
    rows, checks = [], {}
    work = [w.clone() for w in originals]

    def restore():  # untimed: every timed call starts from the same weights
        with torch.no_grad():
            torch._foreach_copy_(work, originals)
        return work

    prox = prox_variants()
    for variant, fn in prox.items():
        err, zeroed = check_prox(variant, fn, originals)
        checks[f"prox/{variant}"] = {"max_rel_err_vs_float64": err, "rows_zeroed": zeroed}
        print(f"  check prox {variant:<12} max rel. error vs float64 {err:.1e}, "
              f"rows zeroed {100 * zeroed:.1f}%", flush=True)
        if err > 1e-5:
            raise SystemExit(f"{name}/{variant}: the proximal step is wrong ({err:.1e})")
    tasks = {v: (restore, (lambda ws, f=f: f(ws)), lambda _: None) for v, f in prox.items()}
    timing.interleaved(tasks, args.warmup, clock)
    samples = timing.interleaved(tasks, args.repeats, clock)
    for variant, s in samples.items():
        rows.append({"set": name, "phase": "prox", "variant": variant, **timing.summarize(s)})

    params = [w.clone().requires_grad_() for w in originals]
    pen = penalty_variants()
    for variant, fn in pen.items():
        err = check_penalty(variant, fn, originals)
        checks[f"fwd+bwd/{variant}"] = {"max_rel_err_vs_float64": err}
        print(f"  check fwd+bwd {variant:<14} max rel. error vs float64 {err:.1e}", flush=True)
        if err > 1e-4:
            raise SystemExit(f"{name}/{variant}: the penalty or its gradient is wrong ({err:.1e})")

    def backward(f):
        f(params).backward()
        for p in params:
            p.grad = None
    tasks = {v: (lambda: None, (lambda _, f=f: backward(f)), lambda _: None)
             for v, f in pen.items()}
    timing.interleaved(tasks, args.warmup, clock)
    samples = timing.interleaved(tasks, args.repeats, clock)
    for variant, s in samples.items():
        rows.append({"set": name, "phase": "fwd+bwd", "variant": variant, **timing.summarize(s)})
    return rows, checks, numel


def ratios(rows):
    med = {(r["set"], r["phase"], r["variant"]): r["median_ms"] for r in rows}
    out = {}
    for s in {r["set"] for r in rows}:
        if (s, "prox", "torchao") in med:
            out[f"{s}: torchao / regext (prox)"] = med[(s, "prox", "torchao")] / med[(s, "prox", "regext")]
        out[f"{s}: torch_loop / regext (prox)"] = med[(s, "prox", "torch_loop")] / med[(s, "prox", "regext")]
        out[f"{s}: regext / foreach_mul (prox)"] = med[(s, "prox", "regext")] / med[(s, "prox", "foreach_mul")]
        out[f"{s}: regext_row / regext_tensor (fwd+bwd)"] = (
            med[(s, "fwd+bwd", "regext_row")] / med[(s, "fwd+bwd", "regext_tensor")])
        out[f"{s}: torch_loop_row / regext_row (fwd+bwd)"] = (
            med[(s, "fwd+bwd", "torch_loop_row")] / med[(s, "fwd+bwd", "regext_row")])
    return out


COLUMNS = [("set", "set", "{}"), ("phase", "phase", "{}"), ("variant", "variant", "{}"),
           ("median ms", "median_ms", "{:.2f}"), ("min ms", "min_ms", "{:.2f}"),
           ("IQR ms", "iqr_ms", "{:.2f}")]

GOALS = {"resnet18: torchao / regext (prox)": (">=", 5.0),
         "gpt2_small: torchao / regext (prox)": (">=", 2.0),
         "resnet18: regext / foreach_mul (prox)": ("<=", 1.6),
         "gpt2_small: regext / foreach_mul (prox)": ("<=", 1.6),
         "resnet18: regext_row / regext_tensor (fwd+bwd)": ("<=", 1.2),
         "gpt2_small: regext_row / regext_tensor (fwd+bwd)": ("<=", 1.2)}


def goal_text(key, value):
    if key not in GOALS:
        return ""
    op, target = GOALS[key]
    met = value >= target if op == ">=" else value <= target
    return f"(goal {op} {target}: {'met' if met else 'NOT met'})"


def plot(rows, path, env):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = sorted({r["set"] for r in rows})
    fig, axes = plt.subplots(1, 2 * len(sets), figsize=(4.2 * 2 * len(sets), 3.9))
    for k, (s, phase) in enumerate((s, p) for s in sets for p in ("prox", "fwd+bwd")):
        ax = axes[k]
        sel = [r for r in rows if r["set"] == s and r["phase"] == phase]
        for i, r in enumerate(sel):
            if r["variant"] in report.YARDSTICKS:  # the floor: grey, hatched, named so
                ax.barh(i, r["median_ms"], **report.YARDSTICK_STYLE)
            else:
                ax.barh(i, r["median_ms"],
                        color="#d62728" if r["variant"].startswith("regext") else "#6baed6")
            ax.text(r["median_ms"], i, f" {r['median_ms']:.1f}", va="center", fontsize=8)
        ax.set_yticks(range(len(sel)))
        ax.set_yticklabels([report.display_name(r["variant"]) for r in sel], fontsize=8)
        ax.set_title(f"{s}: {phase} (median ms)", fontsize=9)
        ax.set_xlim(0, 1.2 * max(r["median_ms"] for r in sel))
    fig.suptitle("row-group lasso | " + report.chart_caption(env) + "\n(yardstick) foreach_mul: "
                 + report.YARDSTICKS["foreach_mul"], fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(out, result):
    """structured.png and results.md of a run (results.json holds `result`)."""
    env, rows, checks = result["env"], result["results"], result["checks"]
    lines = [f"{k}: {v:.2f} {goal_text(k, v)}" for k, v in result["ratios"].items()]
    chart = plot(rows, os.path.join(out, "structured.png"), env)
    md = [f"# Row-group lasso: proximal step and penalty ({env['device_name']})", "",
          f"- {env['threads']} torch threads, CPU kernels {env['cpu_capability']}, "
          f"torch {env['torch']}, python {env['python']}",
          f"- command: `{env['command']}`",
          f"- date: {env['date']}, commit {env.get('git_commit')}",
          f"- load average at start / end: {env['loadavg_start']} / {env['loadavg_end']}",
          f"- lr {LR}, reg_lambda {REG_LAMBDA} (threshold lr * reg_lambda * sqrt(row size)); "
          f"penalty l2 {L2}; float32", ""]
    md += (["![structured.png](structured.png)", ""] if chart else [])
    md += [report.format_table(rows, COLUMNS, markdown=True), ""]
    md += ["(yardstick) `foreach_mul`: " + report.YARDSTICKS["foreach_mul"] + ".", ""]
    md += ["Ratios of medians:", ""] + [f"- {line}" for line in lines] + [""]
    md += ["Checks before timing (max relative error against float64; rows zeroed):", ""]
    md += [f"- {k}: " + ", ".join(f"{kk} {vv:.2e}" for kk, vv in v.items())
           for k, v in checks.items()]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    clock = timing.Clock(device)
    env = report.environment(device, "bench_structured", __file__, lr=LR, reg_lambda=REG_LAMBDA,
                             l2=L2)
    print(f"{env['device_name']}, {env['threads']} threads, CPU kernels {env['cpu_capability']}, "
          f"load average {env['loadavg_start']}; torch {env['torch']}", flush=True)
    rows, checks = [], {}
    for name in args.sets:
        set_rows, set_checks, _ = run_set(name, args, clock)
        rows += set_rows
        checks.update({f"{name}/{k}": v for k, v in set_checks.items()})
    env["loadavg_end"] = timing.load_average()
    table = report.format_table(rows, COLUMNS)
    print("\n" + table)
    found = ratios(rows)
    lines = [f"{k}: {v:.2f} {goal_text(k, v)}" for k, v in found.items()]
    print("\n" + "\n".join(lines))
    result = {"env": env, "repeats": args.repeats, "results": rows, "checks": checks,
              "ratios": found}
    report.write_json(args.out, result)
    if args.out:
        write_outputs(args.out, result)
    return result


if __name__ == "__main__":
    main()
